"""Where the container may connect to: a start's channel URLs are checked against the allowed hosts and
the container's own API (docs/protocol.md §2.9), and trickle requests never follow redirects (§4.4).
Real loopback HTTP throughout."""

from __future__ import annotations

import logging
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from byoc.dev.trickle_server import RunningTrickle
from byoc.errors import TrickleError
from byoc.serve.runtime import Runtime
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.integration.test_api import body_for, call, running
from tests.support import FakeOrchestrator, StreamHarness, serve_app


async def start(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {"X-Stream-Id": body["gateway_request_id"]}
    status, answer, _ = await call(http, "POST", f"{url}/stream/start", json=body, headers=headers)
    return status, answer


async def assert_refused(
    http: aiohttp.ClientSession, runtime: Runtime, url: str, body: dict[str, Any], field: str, words: str
) -> None:
    """The start gets 400 naming ``field`` and saying ``words``, and leaves no session behind."""
    status, answer = await start(http, url, body)
    assert (status, answer.get("field")) == (400, field), answer
    assert words in answer["error"], answer
    assert runtime.sessions_active() == 0
    assert (await call(http, "GET", f"{url}/stream/status"))[1] == {"sessions": []}


ADVERTISED = "http://byoc.internal:9000"


def reads_of(trickle: RunningTrickle, h: StreamHarness) -> list[str]:
    """Requests the container made for the channels it reads (the harness only reads the others)."""
    wanted = {h.channels.names()["input"], h.channels.names()["control"]}
    return [f"{r.method} {r.channel}" for r in trickle.server.requests if r.channel in wanted]


@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0"])
async def test_channel_urls_naming_the_container_itself_are_refused(
    trickle: RunningTrickle, http: aiohttp.ClientSession, listen: str
) -> None:
    async with (
        StreamHarness(trickle, http) as h,
        running(host=listen, allowed_channel_hosts=("*",), capability_url=ADVERTISED) as (runtime, url),
    ):
        await runtime.wait_ready()
        port = runtime.port
        own = [
            ("subscribe_url", f"http://127.0.0.1:{port}/stream/stop"),
            ("events_url", f"http://localhost:{port}/stream/start"),
            ("control_url", f"http://LOCALHOST.:{port}/x"),
            ("publish_url", f"http://[::1]:{port}/x"),
            ("publish_url", f"http://127.1:{port}/x"),
            ("subscribe_url", f"http://2130706433:{port}/x"),
            ("subscribe_url", f"http://[::ffff:127.0.0.1]:{port}/x"),
            ("events_url", f"http://0.0.0.0:{port}/x"),
            ("data_url", "http://BYOC.internal:9000/stream/stop"),  # where the orchestrator calls it
        ]
        if listen == "0.0.0.0":  # any local address: the machine's own name too
            own.append(("control_url", f"http://{socket.gethostname()}:{port}/x"))
        for field, bad in own:
            await assert_refused(http, runtime, url, body_for(h, **{field: bad}), field, "own API")
        assert reads_of(trickle, h) == []
        assert (await start(http, url, body_for(h)))[0] == 200  # the same stream on its real channels


async def test_hosts_outside_the_allowed_list_are_refused_before_any_request(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    allowed = (f"127.0.0.1:{trickle.port}", "orchestrator.example")
    async with StreamHarness(trickle, http) as h, running(allowed_channel_hosts=allowed) as (runtime, url):
        await runtime.wait_ready()
        elsewhere = {
            "subscribe_url": f"http://127.0.0.1:{trickle.port + 1}/ai/trickle/{h.name}",  # another port
            "control_url": h.url("control").replace("127.0.0.1", "localhost"),  # another name
            "data_url": "http://169.254.169.254/latest/meta-data/",
            "events_url": "http://[fd00::1]:8935/ai/trickle/x",
        }
        for field, bad in elsewhere.items():
            await assert_refused(http, runtime, url, body_for(h, **{field: bad}), field, "not an allowed")
        assert reads_of(trickle, h) == []
        assert (await start(http, url, body_for(h)))[0] == 200


async def test_by_default_channels_must_be_on_the_registered_orchestrators_host(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    orchestrator = FakeOrchestrator()
    async with (
        serve_app(orchestrator.app()) as orchestrator_url,
        StreamHarness(trickle, http, "on-localhost") as other,
        StreamHarness(trickle, http, "on-orchestrator") as h,
    ):
        on_localhost = {
            key: value.replace("127.0.0.1", "localhost") if key.endswith("_url") else value
            for key, value in body_for(other).items()
        }
        settings: dict[str, Any] = {"orchestrator_url": orchestrator_url, "orch_secret": orchestrator.secret}
        async with running(**settings) as (runtime, url):  # registered with 127.0.0.1
            await runtime.wait_ready()
            await assert_refused(http, runtime, url, on_localhost, "subscribe_url", "127.0.0.1")
            assert (await start(http, url, body_for(h)))[0] == 200
        async with running() as (runtime, url):  # not registered: any host but its own
            await runtime.wait_ready()
            assert (await start(http, url, on_localhost))[0] == 200


class Redirector:
    """Answers every request with a redirect to ``target``, which records what reaches it."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.target = ""
        self.reached: list[str] = []

    def redirect_app(self) -> web.Application:
        async def redirect(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=self.status, headers={"Location": self.target + request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        return app

    def target_app(self) -> web.Application:
        async def reached(request: web.Request) -> web.Response:
            self.reached.append(f"{request.method} {request.path}")
            return web.Response(headers={"Lp-Trickle-Seq": "0"}, text="followed")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", reached)
        return app


@pytest.mark.parametrize("status", [302, 307])
async def test_trickle_requests_never_follow_redirects(http: aiohttp.ClientSession, status: int) -> None:
    redirector = Redirector(status)
    async with serve_app(redirector.target_app()) as target, serve_app(redirector.redirect_app()) as base:
        redirector.target = target
        subscriber = TrickleSubscriber(f"{base}/ch", session=http, settings=TEST_CLIENT_SETTINGS)
        with pytest.raises(TrickleError, match=str(status)):
            await subscriber.next_segment()
        await subscriber.aclose()
        publisher = TricklePublisher(f"{base}/ch", session=http, settings=TEST_CLIENT_SETTINGS)
        with pytest.raises(TrickleError, match=str(status)):
            await publisher.write_segment(b"segment bytes")
        await publisher.close()  # DELETE: redirected too
    assert redirector.reached == []


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ({"host": "0.0.0.0"}, True),
        ({"host": "0.0.0.0", "token": "t0ken"}, False),
        ({"host": "0.0.0.0", "allowed_channel_hosts": ("orchestrator.example",)}, False),
        ({"host": "127.0.0.1"}, False),
    ],
)
async def test_any_host_on_an_open_api_is_warned_about_at_start(
    caplog: pytest.LogCaptureFixture, settings: dict[str, Any], warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="byoc.serve.runtime")
    async with running(**settings) as (runtime, _):
        await runtime.wait_ready()
    lines = [r.getMessage() for r in caplog.records if "--allowed-channel-hosts" in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines
