"""The local orchestrator's static live runners in-process (docs/protocol.md §10.5a): the runner list and
its checks, registration with one health check, the health poll, label routing, the admin route, and
that a static runner neither heartbeats nor expires. The runner is a small aiohttp app on loopback whose
``/health`` answers what the test sets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from byoc.dev.orchestrator import LocalOrchestrator
from byoc.dev.orchestrator.app import main
from byoc.dev.orchestrator.static_runners import StaticRunnerEntry, parse_config
from tests.runner_support import SECRET, call, orchestrator, register
from tests.support import serve_app

_APP = "live-video-to-video/demo"


class StaticRunner:
    """A live runner app: ``/health`` answers ``health_status`` (or never, when ``hang``); every other
    path records its headers and answers 200."""

    def __init__(self) -> None:
        self.health_status = 200
        self.hang = False
        self.health_checks = 0
        self.headers: list[dict[str, str]] = []
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._record)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.health_checks += 1
        if self.hang:
            await asyncio.Event().wait()
        return web.json_response({"status": "ok"}, status=self.health_status)

    async def _record(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"path": request.path})

    def entry(self, **fields: Any) -> dict[str, Any]:
        return {
            "label": "cam-a",
            "runner_url": self.url,
            "app": _APP,
            "capacity": 2,
            "health_url": "/health",
            **fields,
        }


def _entries(*entries: dict[str, Any]) -> tuple[StaticRunnerEntry, ...]:
    return parse_config(json.dumps({"runners": list(entries)}))


@contextlib.asynccontextmanager
async def static_setup(
    count: int = 1, make: Callable[[StaticRunner], list[dict[str, Any]]] | None = None, **settings: Any
) -> AsyncIterator[tuple[list[StaticRunner], LocalOrchestrator]]:
    runners = [StaticRunner() for _ in range(count)]
    async with contextlib.AsyncExitStack() as stack:
        for runner in runners:
            runner.url = await stack.enter_async_context(serve_app(runner.app()))
        entries = make(runners[0]) if make else [r.entry(label=f"cam-{i}") for i, r in enumerate(runners)]
        settings = {"live_runner_health_interval_s": 0.05, **settings}
        orch = await stack.enter_async_context(orchestrator(static_runners=_entries(*entries), **settings))
        yield runners, orch


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _discovered(http: aiohttp.ClientSession, orch: LocalOrchestrator) -> list[dict[str, Any]]:
    status, answer = await call(http, "GET", f"{orch.base_url}/discovery")
    assert status == 200
    runners: list[dict[str, Any]] = answer[0].get("runners", [])
    return runners


def _only_static(orch: LocalOrchestrator) -> Any:
    (runner,) = [r for r in orch.runners.runners.values() if r.static]
    return runner


# --- the runner list ------------------------------------------------------------------------------

_GOOD = {
    "label": "a",
    "runner_url": "http://127.0.0.1:9",
    "app": _APP,
    "health_url": "http://127.0.0.1:9/health",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label": None}, "runners[0]: label is required and must be trimmed"),
        ({"label": " a"}, "runners[0]: label is required and must be trimmed"),
        ({"label": 7}, "runners[0]: label must be a string"),
        ({"runner_url": "ftp://host/x"}, "runners[0]: invalid runner_url"),
        ({"runner_url": None, "health_url": "/health"}, "runners[0]: invalid runner_url"),
        ({"app": None}, "runners[0]: app must be trimmed"),
        ({"health_url": None}, "runners[0]: health_url is required"),
        ({"health_url": "health"}, "runners[0]: invalid health_url"),
        ({"health_url": "ftp://127.0.0.1/health"}, "runners[0]: invalid health_url"),
        ({"healthy_status_code": 99}, "runners[0]: healthy_status_code must be a valid HTTP status code"),
        ({"healthy_status_code": 600}, "runners[0]: healthy_status_code must be a valid HTTP status code"),
        ({"healthy_status_code": "200"}, "runners[0]: healthy_status_code must be an integer"),
        ({"routing": "host"}, 'runners[0]: routing must be "runner-id" or "label"'),
        ({"routing": "label", "label": "a/b"}, 'runners[0]: label cannot contain / when routing is "label"'),
        ({"capacity": "2"}, "runners[0]: json: cannot unmarshal string into Go struct field .capacity"),
        ({"capacity": -1}, "runners[0]: capacity must be >= 0"),
        ({"mode": "batch"}, 'runners[0]: mode must be "persistent" or "single-shot"'),
        ({"metadata": "x" * 1025}, "runners[0]: metadata must be at most 1024 bytes"),
    ],
)
def test_each_bad_entry_is_refused_naming_its_index(change: dict[str, Any], message: str) -> None:
    entry = {k: v for k, v in {**_GOOD, **change}.items() if v is not None}
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(json.dumps({"runners": [entry]}))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[]", "the runner list must be a JSON object"),
        ('{"runners": {}}', "the runner list must be a JSON object"),
        ("{", "invalid JSON"),
        ('{"runners": [7]}', r"runners\[0\]: must be an object"),
        (json.dumps({"runners": [_GOOD, {**_GOOD, "runner_url": "https://x"}]}), r"runners\[1\]: duplicate"),
    ],
)
def test_a_bad_document_is_refused(document: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(document)


def test_an_entry_is_normalized_like_a_heartbeat() -> None:
    (entry,) = parse_config(
        json.dumps({"runners": [{**_GOOD, "runner_url": "http://h:1/base/", "health_url": "/health"}]})
    )
    assert entry.health.url == "http://h:1/base/health"
    assert entry.health.status == 200
    assert (entry.info.capacity, entry.info.mode, entry.by_label) == (1, "persistent", False)
    (entry,) = parse_config(
        json.dumps(
            {"runners": [{**_GOOD, "routing": "label", "healthy_status_code": 204, "mode": "single_shot"}]}
        )
    )
    assert (entry.health.status, entry.info.mode, entry.by_label) == (204, "single-shot", True)


def test_the_orchestrator_will_not_start_with_a_bad_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "runners.json"
    config.write_text(json.dumps({"runners": [_GOOD, {**_GOOD, "label": "b", "health_url": ""}]}))
    with pytest.raises(SystemExit) as exited:
        main(["--port", "0", "--live-runner-config", str(config)])
    assert exited.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"--live-runner-config {config}: runners[1]: health_url is required")
    with pytest.raises(SystemExit):
        main(["--port", "0", "--live-runner-config", str(tmp_path / "missing.json")])
    assert "cannot read" in capsys.readouterr().err


# --- registration and the health poll ---------------------------------------------------------------


async def test_each_runner_is_checked_once_at_registration(http: aiohttp.ClientSession) -> None:
    def make(runner: StaticRunner) -> list[dict[str, Any]]:
        return [runner.entry(label="up"), runner.entry(label="down", healthy_status_code=204)]

    async with static_setup(make=make, live_runner_health_interval_s=3600) as ([runner], orch):
        assert runner.health_checks == 2
        by_label = {r.info.label: r for r in orch.runners.runners.values()}
        assert (by_label["up"].info.status, by_label["down"].info.status) == ("ready", "unavailable")
        assert all(r.runner_id.startswith("runner_") and r.o2r is None for r in by_label.values())
        (discovered,) = await _discovered(http, orch)
        assert discovered["url"] == f"{orch.base_url}/apps/{by_label['up'].runner_id}/session"
        assert (discovered["app"], discovered["capacity_available"]) == (_APP, 2)
        _, status = await call(http, "GET", f"{orch.base_url}/status")
        listed = {r["label"]: r for r in status["live_runners"]}
        assert listed["down"]["status"] == "unavailable"
        assert listed["up"]["static"] is True
        assert listed["up"]["health_url"] == f"{runner.url}/health"


async def _reserve_with_channel(
    http: aiohttp.ClientSession, runner: StaticRunner, route_url: str
) -> tuple[dict[str, Any], str]:
    """Reserve a session, send one request through its proxy, and make a channel with the callback the
    proxied request's headers name; the session's answer and the channel's name."""
    status, session = await call(http, "POST", f"{route_url}/session", {})
    assert status == 200, session
    assert (await call(http, "GET", f"{session['app_url']}/hello"))[0] == 200
    headers = runner.headers[-1]
    token = {"Livepeer-Session-Token": headers["Livepeer-Session-Token"]}
    wanted = {"channels": [{"name": "out", "mime_type": "video/MP2T"}]}
    control = headers["Livepeer-Session-Control"]
    status, made = await call(http, "POST", f"{control}/channels", wanted, **token)
    assert status == 200, made
    return session, made["channels"][0]["channel_name"]


@pytest.mark.parametrize("failure", ["status", "timeout"])
async def test_one_bad_health_answer_releases_every_session(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    caplog.set_level(logging.INFO, logger="byoc")
    async with static_setup() as ([runner], orch):
        static = _only_static(orch)
        route_url = f"{orch.base_url}/apps/{static.runner_id}"
        first, first_channel = await _reserve_with_channel(http, runner, route_url)
        _, second_channel = await _reserve_with_channel(http, runner, route_url)
        assert len(static.sessions) == 2
        channels_before = set(orch.trickle.channel_names())
        assert {first_channel, second_channel} <= channels_before
        if failure == "status":
            runner.health_status = 503
        else:
            runner.hang = True
        await _until(lambda: static.info.status == "unavailable")
        assert static.sessions == {}
        # the sessions' channels are gone, and no channel was ever made to tell the runner anything
        assert set(orch.trickle.channel_names()) == channels_before - {first_channel, second_channel}
        assert not any(name.endswith("-o2r") for name in orch.trickle.channel_names())
        assert (await call(http, "GET", f"{first['app_url']}/hello"))[0] == 404
        assert await _discovered(http, orch) == []
        assert (await call(http, "POST", f"{route_url}/session", {}))[0] == 404
        changes = [r.getMessage() for r in caplog.records if "health changed" in r.getMessage()]
        assert changes == [
            f"static live runner {static.runner_id} ({_APP}) health changed: unavailable "
            f"({runner.url}/health)"
        ]
        runner.health_status, runner.hang = 200, False
        await _until(lambda: static.info.status == "ready")
        assert len(await _discovered(http, orch)) == 1
        assert (await call(http, "POST", f"{route_url}/session", {}))[0] == 200


async def test_a_static_runner_cannot_heartbeat_or_unregister(http: aiohttp.ClientSession) -> None:
    async with static_setup() as (_, orch):
        static = _only_static(orch)
        body = {"runner_id": static.runner_id, "runner_url": "http://127.0.0.1:9", "app": _APP}
        url = f"{orch.base_url}/runners/heartbeat"
        status, text = await call(http, "POST", url, body, Authorization=SECRET)
        assert (status, text) == (401, "invalid heartbeat authorization\n")
        status, text = await call(http, "POST", url, body, Authorization=static.heartbeat_secret)
        assert (status, text) == (400, "static runner cannot heartbeat\n")
        unregister = f"{orch.base_url}/runners/{static.runner_id}/unregister"
        status, text = await call(http, "POST", unregister, Authorization=static.heartbeat_secret)
        assert (status, text) == (400, "static runner cannot unregister with heartbeat credentials\n")
        assert orch.runners.runners[static.runner_id] is static
        assert (static.info.runner_url, static.info.status) != ("http://127.0.0.1:9", "")


async def test_the_sweep_leaves_static_runners_alone(http: aiohttp.ClientSession) -> None:
    async with static_setup(heartbeat_interval_s=0.05, heartbeat_ttl_s=0.2) as (_, orch):
        static = _only_static(orch)
        dynamic = await register(http, orch, runner_id="d1")
        _, session = await call(http, "POST", f"{orch.base_url}/apps/{static.runner_id}/session", {})
        await _until(lambda: dynamic["runner_id"] not in orch.runners.runners)
        # the static runner was registered before the dynamic one: it is past the TTL too, yet stays
        assert orch.runners.runners[static.runner_id] is static
        assert list(static.sessions) == [session["session_id"]]
        assert [r["url"] for r in await _discovered(http, orch)] == [
            f"{orch.base_url}/apps/{static.runner_id}/session"
        ]


async def test_label_routing(http: aiohttp.ClientSession) -> None:
    def make(runner: StaticRunner) -> list[dict[str, Any]]:
        return [runner.entry(routing="label")]

    async with static_setup(make=make) as ([runner], orch):
        static = _only_static(orch)
        assert static.runner_id.startswith("runner_")
        (discovered,) = await _discovered(http, orch)
        assert discovered["url"] == f"{orch.base_url}/apps/cam-a/session"
        session, _ = await _reserve_with_channel(http, runner, f"{orch.base_url}/apps/cam-a")
        sid = session["session_id"]
        assert session["control_url"] == f"{orch.base_url}/apps/cam-a/session/{sid}"
        headers = runner.headers[-1]
        assert headers["Livepeer-Runner-Route"] == "cam-a"
        assert headers["Livepeer-Session-Control"] == f"{orch.base_url}/runner/cam-a/session/{sid}"
        assert (await call(http, "POST", f"{orch.base_url}/apps/{static.runner_id}/session", {}))[0] == 404
        token = {"Livepeer-Session-Token": headers["Livepeer-Session-Token"]}
        stop = f"{orch.base_url}/runner/cam-a/session/{sid}/stop"
        assert (await call(http, "POST", stop, **token))[0] == 204
        assert static.sessions == {}


async def test_the_admin_route_adds_and_updates_by_label(http: aiohttp.ClientSession) -> None:
    async with static_setup() as ([runner], orch):
        static = _only_static(orch)
        url = f"{orch.base_url}/registerLiveRunners"
        _, session = await call(http, "POST", f"{orch.base_url}/apps/{static.runner_id}/session", {})
        body = {"runners": [runner.entry(label="cam-0", capacity=5), runner.entry(label="cam-b")]}
        assert (await call(http, "POST", url, body))[0] == 401
        assert (await call(http, "POST", url, body, Authorization="wrong"))[0] == 401
        status, text = await call(http, "POST", url, {"runners": [{}]}, Authorization=SECRET)
        assert (status, text) == (400, "runners[0]: label is required and must be trimmed\n")
        status, answer = await call(http, "POST", url, body, Authorization=SECRET)
        assert status == 200, answer
        updated, added = answer["runners"]
        assert updated == {
            "runner_id": static.runner_id,
            "label": "cam-0",
            "app": _APP,
            "runner_url": runner.url,
            "mode": "persistent",
            "health_url": f"{runner.url}/health",
            "healthy_status_code": 200,
            "healthy": True,
        }
        assert added["runner_id"] not in (static.runner_id, "")
        assert added["healthy"] is True
        assert orch.runners.runners[static.runner_id] is static
        assert static.info.capacity == 5
        assert list(static.sessions) == [session["session_id"]]
        assert len(await _discovered(http, orch)) == 2


async def test_admin_route_is_off_without_a_secret(http: aiohttp.ClientSession) -> None:
    async with orchestrator(secret="") as orch:
        body = {"runners": [_GOOD]}
        assert (await call(http, "POST", f"{orch.base_url}/registerLiveRunners", body))[0] == 404


async def test_a_dynamic_runners_status_change_is_logged_once(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="byoc")
    async with orchestrator() as orch:
        secret = (await register(http, orch, runner_id="r1"))["heartbeat_secret"]
        body = {"runner_id": "r1", "runner_url": "http://127.0.0.1:9", "app": _APP, "status": "draining"}
        for _ in range(2):
            status, _ = await call(
                http, "POST", f"{orch.base_url}/runners/heartbeat", body, Authorization=secret
            )
            assert status == 200
        changes = [r.getMessage() for r in caplog.records if "status changed" in r.getMessage()]
        assert changes == [f"live runner r1 ({_APP}) status changed: ready -> draining"]
