"""``byoc serve --protocol live-runner`` against a fault-injecting orchestrator on loopback
(docs/protocol.md §10): registration by heartbeat, the sessions the orchestrator lists, O2R releases, the
no-input timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.errors import ChannelGone
from byoc.serve.config import Settings
from byoc.serve.gpu import GpuMonitor
from byoc.serve.protocols.live_runner import parse_go_duration
from byoc.serve.runtime import Runtime
from byoc.trickle.subscriber import TrickleSubscriber
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.fake_live_orchestrator import RUNNER_ID, FakeLiveOrchestrator, fake_live_orchestrator
from tests.integration.test_api import running
from tests.processors import SlowToStop
from tests.unit.test_gpu import GIB, MIB, one_gpu

LOGGER = "byoc.serve.protocols.live_runner"


@asynccontextmanager
async def live_runner(
    trickle: RunningTrickle,
    http: aiohttp.ClientSession,
    *,
    orchestrator: dict[str, Any] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[FakeLiveOrchestrator, Runtime, str]]:
    async with fake_live_orchestrator(trickle, http, **(orchestrator or {})) as orch:
        options = {"protocol": "live-runner", "orchestrator_url": orch.url, "orch_secret": "orch-secret"}
        async with running(**{**options, **settings}) as (runtime, base):
            yield orch, runtime, base


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Until ``check()`` holds (state of the runtime under test, read as its API thread would)."""
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


async def registered(runtime: Runtime, orch: FakeLiveOrchestrator) -> None:
    await orch.wait_for(lambda: any(call.status == 200 for call in orch.heartbeats()))
    await eventually(lambda: runtime.health_view().registration == "registered")


@dataclass
class Client:
    """A session as its client sees it: the runner's answer and the events it publishes."""

    answer: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def event_types(self) -> list[str]:
        return [str(event["event"].get("type")) for event in self.events]

    async def ended(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        assert self.reader is not None
        await asyncio.wait_for(self.reader, timeout)


async def start_session(
    http: aiohttp.ClientSession,
    base: str,
    orch: FakeLiveOrchestrator,
    sid: str,
    params: dict[str, Any] | None = None,
) -> Client:
    """Reserve ``sid`` on the orchestrator and start it on the runner as the orchestrator's proxy would."""
    await orch.reserve(sid)
    headers = {
        "Livepeer-Session-Id": sid,
        "Livepeer-Session-Token": f"token-{sid}",
        "Livepeer-Session-Control": orch.session_control(sid),
        "Livepeer-Runner-Route": RUNNER_ID,
    }
    async with http.post(f"{base}/stream/start", json={"params": params or {}}, headers=headers) as response:
        answer = await response.json()
        assert response.status == 200, answer
    client = Client(answer)
    client.reader = asyncio.create_task(_read_events(http, answer["events_url"], client.events))
    return client


async def _read_events(http: aiohttp.ClientSession, url: str, events: list[dict[str, Any]]) -> None:
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=TEST_CLIENT_SETTINGS) as subscriber:
        try:
            async for segment in subscriber:
                events.append(json.loads(await segment.read()))
        except ChannelGone:
            pass  # the channels were removed once the session ended


def paths(orch: FakeLiveOrchestrator, sid: str) -> list[tuple[str, str]]:
    prefix = f"/runner/{RUNNER_ID}/session/{sid}"
    return [(call.method, call.path[len(prefix) :]) for call in orch.calls if call.path.startswith(prefix)]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("1m30s", 90.0), ("250ms", 0.25), ("1h0m0.5s", 3600.5), ("0", 0.0), ("1.5m", 90.0)],
)
def test_go_durations_are_parsed(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-5s", "5 s", "s", "5x", None, 5])
def test_what_is_not_a_go_duration_is_none(text: object) -> None:
    assert parse_go_duration(text) is None


async def test_registers_with_the_orchestrator_secret_then_beats_with_the_heartbeat_secret(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    # a 5 s default would need 15 s for the four beats that the answer's 150 ms allow in well under 10 s
    async with live_runner(
        trickle, http, orchestrator={"interval": "150ms", "ttl": "3s"}, max_sessions=3, capability_name="inv"
    ) as (orch, runtime, base):
        await orch.wait_for(lambda: len(orch.heartbeats()) >= 4, timeout=10)
        first, *later = orch.heartbeats()
        assert first.authorization == "orch-secret"
        assert {call.authorization for call in later} == {"hb-secret-1"}
        assert first.body["runner_url"] == base
        assert first.body["app"] == "live-video-to-video/inv"
        assert (first.body["mode"], first.body["status"], first.body["capacity"]) == (
            "persistent",
            "ready",
            3,
        )
        assert first.body["session_ids"] == []
        assert len(first.body["metadata"].encode()) <= 1024
        assert all(call.body["runner_id"] == RUNNER_ID for call in later)
        assert orch.registrations == 1
        assert runtime.health_view().registration == "registered"


async def test_a_forgotten_runner_registers_again_with_the_orchestrator_secret(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with live_runner(trickle, http, orchestrator={"interval": "200ms"}) as (orch, runtime, _):
        await registered(runtime, orch)
        orch.forget()
        await orch.wait_for(lambda: orch.registrations == 2)
        statuses = [(call.authorization, call.status) for call in orch.heartbeats()]
        refused = statuses.index(("hb-secret-1", 404))
        # at once: the heartbeat after the 404 registers again, without another interval's wait
        assert statuses[refused + 1] == ("orch-secret", 200)
        await orch.wait_for(lambda: orch.heartbeats()[-1].authorization == "hb-secret-2")


async def test_a_refused_secret_is_one_clear_error(
    trickle: RunningTrickle, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    async with live_runner(trickle, http, orchestrator={"secret": "another"}) as (orch, runtime, _):
        await orch.wait_for(lambda: len(orch.heartbeats()) == 1)
        await eventually(lambda: runtime.health_view().registration == "refused")
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert "refused the secret (401)" in errors[0]
        assert "orch-secret" not in caplog.text
        assert [call.status for call in orch.heartbeats()] == [401]


async def test_a_session_the_orchestrator_no_longer_lists_ends(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with live_runner(trickle, http, orchestrator={"interval": "200ms"}) as (orch, runtime, base):
        await registered(runtime, orch)
        kept = await start_session(http, base, orch, "kept")
        dropped = await start_session(http, base, orch, "dropped")
        await orch.wait_for(lambda: set(orch.heartbeats()[-1].body["session_ids"]) == {"kept", "dropped"})
        orch.drop("dropped")  # no O2R event: only the heartbeat's session_ids tell
        await dropped.ended()
        assert dropped.events[-1]["event"]["type"] == "stream_stopped"
        await eventually(lambda: runtime.sessions_active() == 1)
        assert kept.reader is not None
        assert not kept.reader.done()
        await orch.wait_for(lambda: orch.heartbeats()[-1].body["session_ids"] == ["kept"])


async def test_a_released_session_stops_at_once(trickle: RunningTrickle, http: aiohttp.ClientSession) -> None:
    # a heartbeat a minute away: only the O2R event can end the session within the test
    async with live_runner(trickle, http, orchestrator={"interval": "1m"}) as (orch, runtime, base):
        await registered(runtime, orch)
        client = await start_session(http, base, orch, "s1")
        assert paths(orch, "s1") == [("POST", "/channels")]
        await orch.release("s1")
        await client.ended()
        assert client.event_types()[-1] == "stream_stopped"
        assert client.events[-1]["event"]["reason"] == "stopped"
        await eventually(lambda: runtime.sessions_active() == 0)
        assert len(orch.heartbeats()) == 1


async def test_a_session_without_input_ends_and_gives_its_slot_back(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with live_runner(trickle, http, input_timeout_s=1.0) as (orch, runtime, base):
        await registered(runtime, orch)
        idle = await start_session(http, base, orch, "idle")
        await idle.ended()
        assert idle.events[-1]["event"]["reason"] == "input_timeout"
        await orch.wait_for(lambda: ("POST", "/stop") in paths(orch, "idle"))
        assert paths(orch, "idle") == [("POST", "/channels"), ("DELETE", "/channels"), ("POST", "/stop")]
        assert "idle" not in orch.session_ids
        assert not any(name.startswith("idle-") for name in trickle.server.channel_names())


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Livepeer-Session-Control", "http://169.254.169.254/runner/x/session/s1"),
        ("Livepeer-Session-Control", "file:///etc/passwd"),
        ("Livepeer-Session-Token", ""),
        ("Livepeer-Session-Id", "has space"),
    ],
)
async def test_a_start_without_the_orchestrators_headers_is_refused(
    trickle: RunningTrickle, http: aiohttp.ClientSession, header: str, value: str
) -> None:
    async with live_runner(trickle, http) as (orch, runtime, base):
        await registered(runtime, orch)
        headers = {
            "Livepeer-Session-Id": "s1",
            "Livepeer-Session-Token": "token-s1",
            "Livepeer-Session-Control": orch.session_control("s1"),
            header: value,
        }
        async with http.post(f"{base}/stream/start", json={"params": {}}, headers=headers) as response:
            answer = await response.json()
        assert response.status == 400, answer
        assert answer["field"] == header
        assert paths(orch, "s1") == []
        assert runtime.sessions_active() == 0


async def test_capacity_follows_admission_and_the_gpu_is_described(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    nvml = one_gpu(used=80 * GIB - 100 * MIB, total=80 * GIB)  # less free than the 512 MiB headroom
    async with fake_live_orchestrator(trickle, http, interval="150ms") as orch:
        settings = Settings(
            host="127.0.0.1",
            port=0,
            protocol="live-runner",
            orchestrator_url=orch.url,
            orch_secret=orch.secret,
            max_sessions=2,
        )
        runtime = Runtime(settings, processor=PassthroughProcessor(), gpu=GpuMonitor(nvml))
        stop = asyncio.Event()
        serving = asyncio.create_task(runtime.serve(shutdown=stop.wait()))
        try:
            await orch.wait_for(lambda: len(orch.heartbeats()) >= 1)
            first = orch.heartbeats()[0].body
            # admission would refuse and nothing runs: hidden, rather than offered as O's minimum of 1
            assert (first["status"], first["capacity"]) == ("unavailable", 1)
            assert first["gpu"] == {"id": "0", "name": "NVIDIA H100 80GB HBM3", "vram_mb": 80 * 1024}
            nvml.devices[0].used = 1 * GIB
            await orch.wait_for(lambda: orch.heartbeats()[-1].body["status"] == "ready")
            assert orch.heartbeats()[-1].body["capacity"] == 2
        finally:
            stop.set()
            await asyncio.wait_for(serving, 15)


@contextlib.contextmanager
def heartbeats_on_a_thread() -> Iterator[tuple[str, list[float]]]:
    """An orchestrator answering heartbeats (every 100 ms, no O2R) from a loop and thread of its own, so
    that it answers while the test's loop — the runtime's main loop — is blocked. Yields its URL and the
    times the heartbeats arrived."""
    arrived: list[float] = []

    async def heartbeat(request: web.Request) -> web.StreamResponse:
        await request.read()
        arrived.append(time.monotonic())
        answer = {"runner_id": RUNNER_ID, "heartbeat_interval": "100ms", "heartbeat_ttl": "1s"}
        return web.json_response({**answer, "heartbeat_secret": "hb", "session_ids": []})

    async def serve() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_post("/runners/heartbeat", heartbeat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="orchestrator", daemon=True)
    thread.start()
    runner, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}", arrived
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_the_heartbeat_goes_on_while_the_main_loop_is_blocked() -> None:
    with heartbeats_on_a_thread() as (url, arrived):
        async with running(protocol="live-runner", orchestrator_url=url, orch_secret="orch-secret") as (
            runtime,
            _,
        ):
            await eventually(lambda: runtime.health_view().registration == "registered")
            began = time.monotonic()
            time.sleep(2.0)  # noqa: ASYNC251 -- deliberately stalls the main loop, as a blocking call would
            ended = time.monotonic()
            during = [moment for moment in arrived if began < moment < ended]
            # every 100 ms there would be about 20; a heartbeat on the main loop would send none
            assert len(during) >= 3, (len(during), len(arrived))


async def test_a_static_runner_serves_without_registering_and_stays_healthy_while_it_drains(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    """Listed by the operator, the runner never heartbeats; the orchestrator polls /health and would
    release every session on one answer that is not 200, so a drain answers 200 and says so."""
    async with (
        fake_live_orchestrator(trickle, http) as orch,
        running(
            SlowToStop("2"),
            protocol="live-runner-static",
            allowed_channel_hosts=("127.0.0.1",),  # where the orchestrator's callbacks and channels are
            drain_timeout_s=8.0,
        ) as (runtime, base),
    ):
        await runtime.wait_ready()
        client = await start_session(http, base, orch, "s1")
        runtime.request_drain()
        seen: list[tuple[int, str]] = []

        async def drained_but_healthy() -> bool:
            async with http.get(f"{base}/health") as response:
                seen.append((response.status, (await response.json())["status"]))
            return seen[-1][1] == "draining"

        async with asyncio.timeout(10):
            while not await drained_but_healthy():  # noqa: ASYNC110 - polled over HTTP, as an orchestrator does
                await asyncio.sleep(0.02)
        assert seen[-1] == (200, "draining")
        assert all(status == 200 for status, _ in seen)
        await client.ended()
        assert client.events[-1]["event"]["type"] == "stream_stopped"
        await orch.wait_for(lambda: ("POST", "/stop") in paths(orch, "s1"))
    assert orch.heartbeats() == []  # no registration, no unregister
    assert not any(call.path.endswith("/unregister") for call in orch.calls)
