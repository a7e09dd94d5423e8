"""The local orchestrator in-process, against a fake container that records what it receives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from byoc.dev.orchestrator import Capability
from byoc.dev.trickle_server import RequestRecord
from byoc.trickle import StreamChannels
from tests.runner_support import SECRET, orchestrator
from tests.support import serve_app


class FakeContainer:
    """Answers /stream/start|params|stop like a container; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.start_status = 200
        self.url = ""
        self._seen = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers), await request.read()))
        async with self._seen:
            self._seen.notify_all()
        if request.path == "/stream/start" and self.start_status != 200:
            return web.json_response({"error": "refused by the container"}, status=self.start_status)
        return web.json_response({"status": "ok"})

    async def wait_for(self, path: str) -> tuple[str, dict[str, str], bytes]:
        async with asyncio.timeout(10), self._seen:
            await self._seen.wait_for(lambda: any(r[0] == path for r in self.requests))
        return next(r for r in self.requests if r[0] == path)


@pytest.fixture
async def container() -> AsyncIterator[FakeContainer]:
    fake = FakeContainer()
    app = web.Application()
    for path in ("/stream/start", "/stream/params", "/stream/stop"):
        app.router.add_post(path, fake.handle)
    async with serve_app(app) as url:
        fake.url = url
        yield fake


async def post(http: aiohttp.ClientSession, url: str, body: bytes, **headers: str) -> tuple[int, Any]:
    async with http.post(url, data=body, headers=headers, skip_auto_headers=["Content-Type"]) as response:
        text = await response.read()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text.decode()


async def test_registration_like_go_livepeer(http: aiohttp.ClientSession) -> None:
    async with orchestrator() as orch:
        url = orch.base_url
        good = json.dumps({"name": "m", "url": "http://c:8000", "capacity": 2, "price_per_unit": 0}).encode()
        assert await post(http, f"{url}/capability/register", good, Authorization="Bearer " + SECRET) == (
            400,
            "invalid authorization",
        )
        async with http.post(f"{url}/capability/register", data=good, headers={"Authorization": SECRET}) as r:
            assert (r.status, await r.text(), r.content_type) == (200, "ok", "application/json")
        assert orch.registry.capabilities["m"].capacity == 2
        fractional = json.dumps(
            {"name": "m2", "url": "http://c", "capacity": 1, "price_per_unit": 0.5}
        ).encode()
        status, text = await post(http, f"{url}/capability/register", fractional, Authorization=SECRET)
        assert status == 400
        assert "price_per_unit" in text
        # unregister: the raw name is the body; always "ok"
        assert await post(http, f"{url}/capability/unregister", b"m", Authorization=SECRET) == (200, "ok")
        assert await post(http, f"{url}/capability/unregister", b"never-there", Authorization=SECRET) == (
            200,
            "ok",
        )
        assert "m" not in orch.registry.capabilities


async def test_start_update_stop_send_what_go_livepeer_sends(
    http: aiohttp.ClientSession, container: FakeContainer
) -> None:
    capability = Capability(name="my-model", url="", capacity=1, token="tok")
    async with orchestrator() as orch:
        capability.url = container.url
        orch.registry.add(capability)
        body = b'{"model_id": "my-model", "params": {"prompt": "a cat"}, "stream_id": "s1", "source": "none"}'
        status, answer = await post(http, f"{orch.base_url}/live-video-to-video", body)  # no Content-Type
        assert status == 200
        channels, trickle = StreamChannels("s1"), f"{orch.base_url}/ai/trickle/"
        assert answer == {"stream_id": "s1", **channels.gateway_urls(trickle)}  # the gateway's view
        _, headers, raw = await container.wait_for("/stream/start")
        start = json.loads(raw)
        assert start == channels.start_body(trickle, {"prompt": "a cat"})  # the container's view
        assert headers["X-Stream-Id"] == "s1"
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer tok"
        assert sorted(orch.trickle.channel_names()) == sorted(channels.names().values())
        assert capability.load == 1
        # the control channel gets go-livepeer's keep-alive at once
        control = channels.name("control")
        await orch.trickle.wait_for_request(lambda r: r.method == "POST" and r.channel == control)
        assert orch.trickle.segment_data(control, 0) == b'{"keep": "alive"}'
        # a capacity of 1 is full now
        status, answer = await post(http, f"{orch.base_url}/live-video-to-video", b'{"model_id": "my-model"}')
        assert status == 503
        assert "capacity" in answer["error"]
        # update: the raw body, as JSON, to /stream/params
        status, _ = await post(http, f"{orch.base_url}/live-video-to-video/s1/update", b'{"prompt": "a dog"}')
        _, headers, raw = await container.wait_for("/stream/params")
        assert (status, raw, headers["X-Stream-Id"], headers["Content-Type"]) == (
            200,
            b'{"prompt": "a dog"}',
            "s1",
            "application/json",
        )
        # stop: plain text without Content-Type, then every channel is closed and capacity freed
        status, _ = await post(http, f"{orch.base_url}/live-video-to-video/s1/stop", b"")
        assert status == 200
        _, headers, raw = await container.wait_for("/stream/stop")
        assert (raw, "Content-Type" in headers, headers["X-Stream-Id"]) == (b"stream ended", False, "s1")
        assert orch.trickle.channel_names() == []
        assert capability.load == 0


async def test_a_container_error_is_returned_and_everything_undone(
    http: aiohttp.ClientSession, container: FakeContainer
) -> None:
    container.start_status = 500
    async with orchestrator() as orch:
        capability = Capability(name="m", url=container.url, capacity=3)
        orch.registry.add(capability)
        status, answer = await post(
            http, f"{orch.base_url}/live-video-to-video", b'{"model_id": "m", "data": true}'
        )
        assert (status, answer) == (500, {"error": "refused by the container"})
        start = json.loads((await container.wait_for("/stream/start"))[2])
        # the data channel was asked for, and created
        assert start == StreamChannels(start["gateway_request_id"], data=True).start_body(
            f"{orch.base_url}/ai/trickle/"
        )
        assert orch.trickle.channel_names() == []  # ...and closed again, with all the others
        assert capability.load == 0
        assert orch.streams == {}


async def test_bad_requests_and_unknown_models(http: aiohttp.ClientSession) -> None:
    async with orchestrator() as orch:
        url = f"{orch.base_url}/live-video-to-video"
        assert (await post(http, url, b"not json"))[0] == 400
        assert (await post(http, url, b'{"params": {}}'))[0] == 400
        assert (await post(http, url, b'{"model_id": "m", "source": "webcam"}'))[0] == 400
        assert (await post(http, url, b'{"model_id": "m", "duration_s": -1}'))[0] == 400
        status, answer = await post(http, url, b'{"model_id": "nobody"}')
        assert (status, "no container is registered" in answer["error"]) == (503, True)
        assert (await post(http, f"{url}/nope/stop", b""))[0] == 404


async def test_the_gateway_readers_start_at_the_next_segment(
    http: aiohttp.ClientSession, container: FakeContainer
) -> None:
    """Like go-livepeer's gateway, the readers of output and events ask for seq -1 first: what the
    container published before they subscribed is not read."""
    async with orchestrator(containers=(Capability(name="m", url=container.url, capacity=1),)) as orch:
        body = b'{"model_id": "m", "stream_id": "s1", "source": "none"}'
        assert (await post(http, f"{orch.base_url}/live-video-to-video", body))[0] == 200
        channels = StreamChannels("s1")
        for role in ("output", "events"):
            name = channels.name(role)

            def first_get(record: RequestRecord, name: str = name) -> bool:
                return record.method == "GET" and record.channel == name

            assert (await orch.trickle.wait_for_request(first_get)).seq == "-1", role
        assert (await post(http, f"{orch.base_url}/live-video-to-video/s1/stop", b""))[0] == 200
