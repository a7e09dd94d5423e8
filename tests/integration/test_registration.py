"""Capability registration against a fake go-livepeer orchestrator on loopback HTTP (docs/protocol.md §1)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest

from byoc.dev.children import free_port
from byoc.errors import ByocError, ConfigError
from byoc.serve.config import Settings
from byoc.serve.protocols.byoc import CapabilityInfo, Registrar
from tests.integration.test_api import running
from tests.support import FakeOrchestrator, serve_app, serving_orchestrator

SECRET = "orch-S3cret/+= with space"
NAME = "my-filter"
LOGGER = "byoc.serve.protocols.byoc"
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class FakeSleep:
    """Records every delay; a delay equal to ``block_at`` waits for :meth:`release`, others return at once."""

    def __init__(self, block_at: float | None = None) -> None:
        self.delays: list[float] = []
        self.block_at = block_at
        self._entered: asyncio.Queue[float] = asyncio.Queue()
        self._tickets: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self._entered.put_nowait(delay)
        if delay == self.block_at:
            await self._tickets.get()
        else:
            await asyncio.sleep(0)

    def release(self) -> None:
        self._tickets.put_nowait(None)

    async def next_call(self) -> float:
        async with asyncio.timeout(2):
            return await self._entered.get()


@pytest.fixture
async def orch() -> AsyncIterator[FakeOrchestrator]:
    async with serving_orchestrator(SECRET) as fake:
        yield fake


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Starts background tasks and cancels whatever is left of them when the test ends (even failing)."""
    tasks: list[asyncio.Task[None]] = []

    def start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(coro))
        return tasks[-1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def capability(**overrides: Any) -> CapabilityInfo:
    values: dict[str, Any] = {
        "name": NAME,
        "url": "http://runner:8000/api/",
        "description": "demo",
        "capacity": 3,
    }
    return CapabilityInfo(**(values | overrides))


def registrar(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, *, secret: str = SECRET, **kwargs: Any
) -> Registrar:
    cap = kwargs.pop("capability", None) or capability()
    kwargs.setdefault("heartbeat_interval_s", 0.0)  # the tests that count sleeps turn it on themselves
    return Registrar(client, orch.url + "/", secret, cap, **kwargs)


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def run_briefly(task: Callable[[], Any]) -> None:
    async with asyncio.timeout(3):
        await task()


# --- one registration ----------------------------------------------------------------------------


async def test_register_sends_exact_body_raw_secret_and_no_trailing_slashes(
    client: aiohttp.ClientSession, orch: FakeOrchestrator
) -> None:
    seen: list[str] = []  # /health is told of every state (byoc.serve.listener answers from them)
    reg = registrar(
        client,
        orch,
        capability=capability(price_per_unit=7, price_scaling=1000, currency="eth"),
        on_state=lambda state: seen.append(str(state)),
    )
    assert reg.state == "unregistered"
    await reg.register_once()

    assert reg.state == "registered"
    assert seen == ["registering", "registered"]
    assert reg.last_error is None
    [request] = orch.requests
    assert request.path == "/capability/register"  # not //capability/register from the trailing slash
    assert request.headers["Authorization"] == SECRET  # byte for byte, no "Bearer "
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.body)
    assert body == {
        "name": NAME,
        "url": "http://runner:8000/api",
        "capacity": 3,
        "price_per_unit": 7,
        "price_scaling": 1000,
        "currency": "eth",
        "description": "demo",
    }
    assert [type(body[k]) for k in ("capacity", "price_per_unit", "price_scaling")] == [int, int, int]
    assert orch.registered[NAME]["url"] == "http://runner:8000/api"


def test_capability_info_normalises_and_validates() -> None:
    assert capability(url="https://runner:8000///").url == "https://runner:8000"
    for bad in (
        {"price_per_unit": 0.5},
        {"capacity": True},
        {"capacity": -1},
        {"price_scaling": 0},
        {"url": "runner:8000"},
        {"name": ""},
    ):
        with pytest.raises(ConfigError):
            capability(**bad)


async def test_constructor_rejects_unusable_settings(client: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigError, match="http"):
        Registrar(client, "orch:8935", SECRET, capability())
    with pytest.raises(ConfigError, match="line break") as caught:
        Registrar(client, "https://orch:8935", "abc\ndef", capability())
    assert "abc" not in str(caught.value)


async def test_from_settings_registers_what_the_settings_say(
    client: aiohttp.ClientSession, orch: FakeOrchestrator
) -> None:
    settings = Settings(
        orchestrator_url=orch.url + "/",
        orch_secret=SECRET,
        capability_name="from-settings",
        capability_url="http://runner:9000/",
        max_sessions=5,
        price_per_unit=2,
        reregister_interval_s=0.0,
    )
    reg = Registrar.from_settings(client, settings)
    await reg.register_once()
    assert orch.requests[0].headers["Authorization"] == SECRET
    assert orch.registered["from-settings"] | {"description": ""} == {
        "name": "from-settings",
        "url": "http://runner:9000",
        "capacity": 5,
        "price_per_unit": 2,
        "price_scaling": 1,
        "currency": "wei",
        "description": "",
    }
    with pytest.raises(ConfigError):
        Registrar.from_settings(client, Settings())


async def test_a_bearer_token_is_registered_so_the_orchestrator_sends_it(
    client: aiohttp.ClientSession, orch: FakeOrchestrator
) -> None:
    # go-livepeer adds "Authorization: Bearer <token>" to its calls only when the capability was
    # registered with that token; without it every start would get byoc's 401 (docs/protocol.md §3.3).
    settings = Settings(
        orchestrator_url=orch.url,
        orch_secret=SECRET,
        capability_name="with-token",
        capability_url="http://runner:9000",
        token="stream-token-1",
    )
    reg = Registrar.from_settings(client, settings)
    await reg.register_once()
    assert orch.registered["with-token"]["token"] == "stream-token-1"
    assert "stream-token-1" not in repr(reg.capability)


# --- refusal ---------------------------------------------------------------------------------------


async def test_wrong_secret_is_a_config_error_and_run_gives_up_with_one_error_line(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    wrong = "Bearer " + SECRET  # the classic mistake
    with pytest.raises(ConfigError, match="refused the secret") as caught:
        await registrar(client, orch, secret=wrong).register_once()
    assert "invalid authorization" in str(caught.value)
    assert SECRET not in str(caught.value)

    caplog.clear()
    sleep = FakeSleep()
    seen: list[str] = []
    reg = registrar(client, orch, secret=wrong, sleep=sleep, on_state=lambda state: seen.append(str(state)))
    await run_briefly(lambda: reg.run(lambda: True))
    assert reg.state == "refused"
    assert seen == ["registering", "refused"]
    assert sleep.delays == []
    assert len(orch.registers()) == 2
    [error] = records(caplog, logging.ERROR)
    assert "invalid authorization" in error.getMessage()
    assert SECRET not in error.getMessage()
    assert reg.last_error is not None
    assert SECRET not in reg.last_error


async def test_type_mismatch_400_is_a_refusal_that_quotes_the_orchestrator(
    client: aiohttp.ClientSession, orch: FakeOrchestrator
) -> None:
    cap = capability()
    object.__setattr__(cap, "price_per_unit", 0.5)  # slip past validation to see O's strict parsing
    with pytest.raises(ConfigError, match="refused the registration") as caught:
        await registrar(client, orch, capability=cap).register_once()
    assert "Error registering capability" in str(caught.value)
    assert NAME not in orch.registered


# --- retries ---------------------------------------------------------------------------------------


async def test_5xx_is_retried_with_growing_delays_and_rate_limited_warnings(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    orch.fail_next = 11
    sleep = FakeSleep()
    reg = registrar(client, orch, sleep=sleep, reregister_interval_s=0)
    await run_briefly(lambda: reg.run(lambda: True))

    assert sleep.delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    assert len(orch.registers()) == 12
    assert reg.state == "registered"
    assert reg.last_error is None
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2  # the first failure and the tenth
    assert "503" in warnings[0].getMessage()
    assert any("registered capability" in r.getMessage() for r in records(caplog, logging.INFO))


async def test_dropped_connections_are_retried(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    orch.drop_next = 2
    sleep = FakeSleep()
    reg = registrar(client, orch, sleep=sleep, reregister_interval_s=0, capability=capability(currency="USD"))
    await run_briefly(lambda: reg.run(lambda: True))

    assert sleep.delays == [0.5, 1.0]
    assert len(orch.registers()) == 3
    assert reg.state == "registered"
    [warning] = records(caplog, logging.WARNING)
    assert "price feed" in warning.getMessage()  # the hint for an exotic currency
    assert "P19" not in warning.getMessage()  # no internal note number in what the operator reads


async def test_register_once_raises_a_retryable_byoc_error_on_5xx(
    client: aiohttp.ClientSession, orch: FakeOrchestrator
) -> None:
    orch.fail_next = 1
    reg = registrar(client, orch)
    with pytest.raises(ByocError, match="503") as caught:
        await reg.register_once()
    assert not isinstance(caught.value, ConfigError)
    assert reg.state == "unreachable"
    assert reg.last_error is not None
    assert "503" in reg.last_error


# --- periodic re-registration ----------------------------------------------------------------------


async def test_reregisters_only_while_idle_and_cancellation_propagates(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, spawn: Spawn
) -> None:
    idle = True
    sleep = FakeSleep(block_at=30.0)
    reg = registrar(client, orch, sleep=sleep, reregister_interval_s=30.0)
    task = spawn(reg.run(lambda: idle))

    assert await sleep.next_call() == 30.0
    assert len(orch.registers()) == 1
    assert reg.state == "registered"

    idle = False
    sleep.release()
    assert await sleep.next_call() == 30.0
    assert len(orch.registers()) == 1  # sessions running: O's load counter must not be reset

    idle = True
    sleep.release()
    assert await sleep.next_call() == 30.0
    assert len(orch.registers()) == 2

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_after_a_failed_reregistration_running_sessions_hold_the_next_one_off(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, spawn: Spawn
) -> None:
    answers = iter([True, False, False, True])  # idle at the periodic check, then busy twice, then idle
    seen: list[str] = []

    def is_idle() -> bool:
        seen.append(str(reg.state))
        return next(answers, True)

    sleep = FakeSleep(block_at=30.0)
    reg = registrar(client, orch, sleep=sleep)
    task = spawn(reg.run(is_idle))
    assert await sleep.next_call() == 30.0

    orch.fail_next = 1
    sleep.release()
    assert [await sleep.next_call() for _ in range(4)] == [0.5, 1.0, 2.0, 30.0]
    # failed: unreachable; the heartbeat answered while sessions ran: pending; then registered again
    assert seen == ["registered", "unreachable", "pending", "pending"]
    assert len(orch.registers()) == 3  # none while the sessions ran (P1)
    assert reg.state == "registered"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_refusal_during_reregistration_ends_run(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, spawn: Spawn
) -> None:
    sleep = FakeSleep(block_at=30.0)
    reg = registrar(client, orch, sleep=sleep)
    task = spawn(reg.run(lambda: True))
    assert await sleep.next_call() == 30.0
    orch.secret = "restarted-with-another-secret"
    sleep.release()
    await run_briefly(lambda: task)
    assert reg.state == "refused"


async def test_heartbeats_between_registrations_never_register(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, spawn: Spawn
) -> None:
    sleep = FakeSleep(block_at=5.0)
    reg = registrar(client, orch, sleep=sleep, heartbeat_interval_s=5.0, reregister_interval_s=30.0)
    task = spawn(reg.run(lambda: True))
    for _ in range(5):
        assert await sleep.next_call() == 5.0
        sleep.release()
    assert await sleep.next_call() == 5.0
    assert len(orch.registers()) == 1  # five heartbeats: no registration
    assert reg.state == "registered"
    sleep.release()  # 30 s since the registration: register again
    assert await sleep.next_call() == 5.0
    assert len(orch.registers()) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def registration_in_health(http: aiohttp.ClientSession, url: str, wanted: str) -> None:
    """Poll ``/health`` until its ``registration`` is ``wanted`` (a generous timeout: a busy machine)."""
    seen = None
    try:
        async with asyncio.timeout(20):
            while seen != wanted:
                async with http.get(f"{url}/health") as response:
                    seen = (await response.json()).get("registration")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"/health never said registration {wanted!r} (last {seen!r})") from None


async def test_health_reports_an_orchestrator_outage_and_registration_follows_its_return(
    client: aiohttp.ClientSession,
) -> None:
    port = free_port()
    before, after = FakeOrchestrator(SECRET), FakeOrchestrator(SECRET)  # a restart forgets everything
    settings: dict[str, Any] = {
        "orchestrator_url": f"http://127.0.0.1:{port}",
        "orch_secret": SECRET,
        "capability_name": NAME,
        "heartbeat_interval_s": 0.2,
        "reregister_interval_s": 3600.0,  # an outage must not wait for the idle re-registration
    }
    async with running(**settings) as (runtime, url):
        await runtime.wait_ready()
        async with serve_app(before.app(), port):
            await registration_in_health(client, url, "registered")
            assert NAME in before.registered
        await registration_in_health(client, url, "unreachable")
        async with serve_app(after.app(), port):
            await registration_in_health(client, url, "registered")
            assert after.registered[NAME]["name"] == NAME
            assert all(r.authorization == SECRET for r in after.registers())


# --- unregister ------------------------------------------------------------------------------------


async def test_unregister_sends_the_raw_name(client: aiohttp.ClientSession, orch: FakeOrchestrator) -> None:
    reg = registrar(client, orch)
    await reg.register_once()
    assert NAME in orch.registered
    await reg.unregister()

    request = orch.requests[-1]
    assert request.path == "/capability/unregister"
    assert request.body == NAME.encode()  # not JSON
    assert request.headers["Authorization"] == SECRET
    assert NAME not in orch.registered
    assert reg.state == "unregistered_on_shutdown"


@pytest.mark.parametrize("failure", ["dropped", "refused_port", "hang"])
async def test_unregister_swallows_failures(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    reg = registrar(client, orch, request_timeout_s=0.2)
    await reg.register_once()
    if failure == "dropped":
        orch.drop_unregister = True
    elif failure == "hang":
        orch.hang_unregister = True
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            free_port = sock.getsockname()[1]
        reg = Registrar(client, f"http://127.0.0.1:{free_port}", SECRET, capability(), request_timeout_s=0.2)

    async with asyncio.timeout(2):
        await reg.unregister()
    assert reg.state != "unregistered_on_shutdown"
    [warning] = records(caplog, logging.WARNING)
    assert "could not unregister" in warning.getMessage()


# --- the secret stays secret -----------------------------------------------------------------------


async def test_secret_never_appears_in_logs_errors_or_reprs(
    client: aiohttp.ClientSession, orch: FakeOrchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    orch.fail_next, orch.drop_next, orch.echo_auth_next = 1, 1, 1
    sleep = FakeSleep()
    reg = registrar(client, orch, sleep=sleep, reregister_interval_s=0)
    await run_briefly(lambda: reg.run(lambda: True))
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert reg.state == "registered"

    orch.echo_auth_next = 1
    with pytest.raises(ByocError) as caught:
        await reg.register_once()
    assert "<secret>" in str(caught.value)  # the echoed header was redacted

    orch.drop_unregister = True
    await reg.unregister()
    wrong = registrar(client, orch, secret="an0ther-secret", sleep=sleep)
    await run_briefly(lambda: wrong.run(lambda: True))

    texts = [caplog.text, repr(reg), str(reg), repr(reg.capability), repr(wrong), str(caught.value)]
    texts += [r.getMessage() for r in caplog.records] + [str(reg.last_error), str(wrong.last_error)]
    assert records(caplog, logging.WARNING)
    assert records(caplog, logging.ERROR)
    for text in texts:
        assert SECRET not in text
        assert "an0ther-secret" not in text
    assert NAME in repr(reg)
