"""The local orchestrator in front of a live runner: the session proxy, and the ``/live-video-to-video``
curl loop run on a runner's session. The runner is a small aiohttp app that records what it gets and
makes its channels with the session callbacks, as a live runner does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from byoc.dev.orchestrator import LocalOrchestrator
from tests.runner_support import call, o2r_reader, orchestrator, register
from tests.support import serve_app

_CHANNELS = (
    ("in", "video/MP2T"),
    ("out", "video/MP2T"),
    ("control", "application/json"),
    ("events", "application/json"),
)


class FakeRunner:
    """A live runner app under ``/base``: echoes, streams, and starts streams by making channels."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.start_status = 200
        self.answer_urls = True
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/base/live-video-to-video", self._start)
        app.router.add_get("/base/stream", self._stream)
        app.router.add_route("*", "/base/{tail:.*}", self._echo)
        return app

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body))
        answer = {
            "method": request.method,
            "path": request.path,
            "query": request.rel_url.raw_query_string,
            "body": body.decode(),
        }
        return web.json_response(answer, status=418, headers={"X-Runner": "yes"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first\n")
        await asyncio.Event().wait()  # until the orchestrator cuts the request
        return response

    async def _start(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers), await request.read()))
        if self.start_status != 200:
            return web.json_response({"error": "refused"}, status=self.start_status)
        wanted = {"channels": [{"name": name, "mime_type": mime} for name, mime in _CHANNELS]}
        token = {"Livepeer-Session-Token": request.headers["Livepeer-Session-Token"]}
        async with aiohttp.ClientSession() as http:
            control = request.headers["Livepeer-Session-Control"]
            async with http.post(f"{control}/channels", json=wanted, headers=token) as response:
                made = {c["name"]: c["url"] for c in (await response.json())["channels"]}
        if not self.answer_urls:
            return web.json_response({"status": "started"})
        return web.json_response(
            {
                "publish_url": made["in"],
                "subscribe_url": made["out"],
                "control_url": made["control"],
                "events_url": made["events"],
            }
        )


@contextlib.asynccontextmanager
async def runner_and_orchestrator(
    http: aiohttp.ClientSession, capacity: int = 1
) -> AsyncIterator[tuple[FakeRunner, LocalOrchestrator, dict[str, Any]]]:
    runner = FakeRunner()
    async with serve_app(runner.app()) as url, orchestrator() as orch:
        runner.url = url
        registration = await register(http, orch, runner_id="r1", runner_url=f"{url}/base", capacity=capacity)
        yield runner, orch, registration


async def test_the_proxy_forwards_requests_with_the_session_headers(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (runner, orch, _):
        _, session = await call(http, "POST", f"{orch.base_url}/apps/r1/session", {})
        sid = session["session_id"]
        forged = {"Livepeer-Session-Token": "forged", "X-Client": "c"}
        url = URL(f"{session['app_url']}/echo/a%20b?x=1&y=%2F", encoded=True)  # sent as written
        async with http.put(url, data=b"payload", headers=forged) as response:
            assert response.status == 418
            assert response.headers["X-Runner"] == "yes"
            answer = await response.json()
        assert answer == {"method": "PUT", "path": "/base/echo/a b", "query": "x=1&y=%2F", "body": "payload"}
        _, headers, _ = runner.requests[-1]
        assert headers["X-Client"] == "c"
        assert headers["Livepeer-Runner-Route"] == "r1"
        assert headers["Livepeer-Session-Id"] == sid
        assert headers["Livepeer-Session-Token"] == orch.runners.runners["r1"].session_token(sid)
        assert headers["Livepeer-Session-Control"] == f"{orch.base_url}/runner/r1/session/{sid}"
        assert (await call(http, "GET", f"{orch.base_url}/apps/r1/session/nope/app/echo"))[0] == 404


async def test_a_runner_that_does_not_answer_is_502(http: aiohttp.ClientSession) -> None:
    async with orchestrator() as orch:
        await register(http, orch, runner_id="r1", runner_url="http://127.0.0.1:9")  # discard port: refused
        _, session = await call(http, "POST", f"{orch.base_url}/apps/r1/session", {})
        status, text = await call(http, "GET", f"{session['app_url']}/x")
        assert status == 502
        assert text


async def test_a_release_cuts_the_sessions_proxied_requests(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (_, orch, _):
        _, session = await call(http, "POST", f"{orch.base_url}/apps/r1/session", {})
        async with http.get(f"{session['app_url']}/stream") as response:
            assert await response.content.readline() == b"first\n"
            assert (await call(http, "POST", f"{session['control_url']}/stop"))[0] == 204
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async with asyncio.timeout(10):
                    assert await response.content.read() == b""


async def test_the_curl_loop_runs_a_stream_on_a_live_runner(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (runner, orch, registration):
        async with o2r_reader(registration["o2r"]["url"], http) as o2r:
            start = {"model_id": "demo", "stream_id": "s1", "params": {"prompt": "a cat"}}
            status, answer = await call(http, "POST", f"{orch.base_url}/live-video-to-video", start)
            assert status == 200, answer
            trickle = f"{orch.base_url}/ai/trickle/"
            assert answer == {
                "stream_id": "s1",
                "publish_url": f"{trickle}s1-in",
                "subscribe_url": f"{trickle}s1-out",
                "control_url": f"{trickle}s1-control",
                "events_url": f"{trickle}s1-events",
            }
            path, headers, body = runner.requests[-1]
            assert path == "/base/live-video-to-video"
            assert json.loads(body) == {
                "gateway_request_id": "s1",
                "model_id": "demo",
                "stream_id": "s1",
                "params": {"prompt": "a cat"},
            }
            assert headers["Livepeer-Session-Id"] == "s1"  # the stream id is the session id
            assert o2r.events() == [("reserved", "s1")]
            # the gateway's side: synthetic input, control keep-alive
            await orch.trickle.wait_for_request(lambda r: r.method == "POST" and r.channel == "s1-in", 20)
            await orch.trickle.wait_for_request(
                lambda r: r.method == "POST" and r.channel == "s1-control", 20
            )
            # full, and a taken stream id
            assert (await call(http, "POST", f"{orch.base_url}/live-video-to-video", {"model_id": "demo"}))[
                0
            ] == 503
            assert (await call(http, "POST", f"{orch.base_url}/live-video-to-video", start))[0] == 409
            # an update goes to the control channel
            update = f"{orch.base_url}/live-video-to-video/s1/update"
            assert (await call(http, "POST", update, {"prompt": "a dog"}))[0] == 200
            written = [orch.trickle.segment_data("s1-control", seq) for seq in range(8)]
            assert b'{"prompt": "a dog"}' in written
            assert (await call(http, "POST", update, b"[1]"))[0] == 400
            # the stop releases the session: the runner is told, the channels go
            assert (await call(http, "POST", f"{orch.base_url}/live-video-to-video/s1/stop"))[0] == 200
            await o2r.wait(lambda r: ("released", "s1") in r.events())
        assert not [name for name in orch.trickle.channel_names() if name.startswith("s1")]
        _, status_page = await call(http, "GET", f"{orch.base_url}/status")
        [ended] = status_page["ended"]
        assert (ended["stream_id"], ended["end_reason"], ended["runner_id"]) == ("s1", "stopped", "r1")
        assert status_page["live_runners"][0]["sessions"] == []


async def test_a_stream_ends_when_the_runner_releases_its_session(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (_, orch, _):
        start = {"model_id": "demo", "stream_id": "s2", "source": "none"}
        assert (await call(http, "POST", f"{orch.base_url}/live-video-to-video", start))[0] == 200
        stream = orch.streams["s2"]
        token = {"Livepeer-Session-Token": orch.runners.runners["r1"].session_token("s2")}
        assert (await call(http, "POST", f"{orch.base_url}/runner/r1/session/s2/stop", **token))[0] == 204
        async with asyncio.timeout(10):
            await stream.wait_ended()
        assert stream.end_reason == "session released"


async def test_a_refused_start_releases_the_session(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (runner, orch, registration):
        async with o2r_reader(registration["o2r"]["url"], http) as o2r:
            runner.start_status = 500
            status, answer = await call(
                http, "POST", f"{orch.base_url}/live-video-to-video", {"model_id": "demo"}
            )
            assert (status, answer) == (500, {"error": "refused"})
            runner.start_status, runner.answer_urls = 200, False
            status, answer = await call(
                http, "POST", f"{orch.base_url}/live-video-to-video", {"model_id": "demo"}
            )
            assert status == 502
            assert "publish_url" in answer["error"]
            await o2r.wait(lambda r: [event for event, _ in r.events()] == ["reserved", "released"] * 2)
        assert orch.runners.runners["r1"].sessions == {}
        assert orch.trickle.channel_names() == [registration["o2r"]["channel_name"]]
        assert not orch.streams


async def test_models_nobody_serves_are_still_503(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (_, orch, _):
        status, answer = await call(
            http, "POST", f"{orch.base_url}/live-video-to-video", {"model_id": "other"}
        )
        assert status == 503
        assert "other" in answer["error"]


async def test_single_shot_runners_take_one_session_per_request(http: aiohttp.ClientSession) -> None:
    runner = FakeRunner()
    async with serve_app(runner.app()) as url, orchestrator() as orch:
        registration = await register(
            http, orch, runner_id="r1", runner_url=f"{url}/base", mode="single-shot"
        )
        _, [entry] = await call(http, "GET", f"{orch.base_url}/discovery")
        assert entry["runners"][0]["url"] == f"{orch.base_url}/apps/r1/app"
        assert (await call(http, "POST", f"{orch.base_url}/apps/r1/session", {}))[0] == 400
        async with o2r_reader(registration["o2r"]["url"], http) as o2r:
            status, answer = await call(http, "POST", f"{orch.base_url}/apps/r1/app/echo", b"one")
            assert (status, answer["path"], answer["body"]) == (418, "/base/echo", "one")
            sid = runner.requests[-1][1]["Livepeer-Session-Id"]
            await o2r.wait(lambda r: r.events() == [("reserved", sid), ("released", sid)])
        assert orch.runners.runners["r1"].sessions == {}


async def test_a_persistent_runner_has_no_single_shot_route(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (_, orch, _):
        assert await call(http, "GET", f"{orch.base_url}/apps/r1/app/echo") == (
            400,
            "runner is not single-shot\n",
        )


async def test_session_proxies_live_as_long_as_their_session(http: aiohttp.ClientSession) -> None:
    async with runner_and_orchestrator(http) as (runner, orch, _):
        _, session = await call(http, "POST", f"{orch.base_url}/apps/r1/session", {})
        sid = session["session_id"]
        base = f"{orch.base_url}/runner/r1/session/{sid}/proxy"
        token = {"Livepeer-Session-Token": orch.runners.runners["r1"].session_token(sid)}
        assert (await call(http, "POST", base, {}))[0] == 401
        status, default = await call(http, "POST", base, **token)  # no body: the app itself
        assert status == 200
        assert default["url"] == f"{orch.base_url}/run/{default['proxy_id']}"
        status, answer = await call(http, "GET", f"{default['url']}/echo?q=1")
        assert (status, answer["path"], answer["query"]) == (418, "/base/echo", "q=1")
        assert runner.requests[-1][1]["Livepeer-Session-Id"] == sid
        status, other = await call(
            http, "POST", base, {"target_url": f"{runner.url}/base/echo/deeper"}, **token
        )
        assert status == 200
        assert (await call(http, "GET", f"{other['url']}/x"))[1]["path"] == "/base/echo/deeper/x"
        elsewhere = runner.url.replace("127.0.0.1", "localhost")
        for bad in ({"target_url": f"{elsewhere}/base"}, {"target_url": "/relative"}, {"target_url": 5}):
            assert (await call(http, "POST", base, bad, **token))[0] == 400
        assert (await call(http, "POST", f"{session['control_url']}/stop"))[0] == 204
        assert await call(http, "GET", f"{default['url']}/echo") == (404, "live runner proxy not found\n")


async def test_runners_registered_with_proxy_get_proxy_urls(http: aiohttp.ClientSession) -> None:
    runner = FakeRunner()
    async with serve_app(runner.app()) as url, orchestrator() as orch:
        await register(http, orch, runner_id="p1", runner_url=f"{url}/base", proxy=True)
        await register(http, orch, runner_id="s1", runner_url=f"{url}/base", proxy=True, mode="single-shot")
        _, session = await call(http, "POST", f"{orch.base_url}/apps/p1/session", {})
        assert session["app_url"].startswith(f"{orch.base_url}/run/")
        assert session["control_url"] == f"{orch.base_url}/apps/p1/session/{session['session_id']}"
        assert (await call(http, "GET", f"{session['app_url']}/echo"))[1]["path"] == "/base/echo"
        _, [entry] = await call(http, "GET", f"{orch.base_url}/discovery")
        urls = {r["mode"]: r["url"] for r in entry["runners"]}
        assert urls["single-shot"] == f"{orch.base_url}/run/s1"
        status, answer = await call(http, "POST", f"{urls['single-shot']}/echo", b"x")
        assert (status, answer["body"]) == (418, "x")
        assert runner.requests[-1][1]["Livepeer-Runner-Route"] == "s1"
        assert orch.runners.runners["s1"].sessions == {}
