"""The container's HTTP API over real loopback HTTP, with the runtime running in-process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.processor import Processor
from byoc.serve.config import Settings
from byoc.serve.gpu import GpuMonitor
from byoc.serve.runtime import Runtime
from tests.conftest import assert_every_frame_accounted
from tests.support import StreamHarness, decode, make_segments


@contextlib.asynccontextmanager
async def running(
    processor: Processor | None = None, *, gpu: GpuMonitor | None = None, **settings: Any
) -> AsyncIterator[tuple[Runtime, str]]:
    settings = {"host": "127.0.0.1", "port": 0, **settings}
    runtime = Runtime(Settings(**settings), processor=processor or PassthroughProcessor(), gpu=gpu)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.serve(shutdown=stop.wait()))
    await runtime.wait_listening()
    try:
        yield runtime, f"http://127.0.0.1:{runtime.port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def body_for(h: StreamHarness, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "gateway_request_id": h.name,
        "subscribe_url": h.url("subscribe"),
        "publish_url": h.url("publish"),
        "control_url": h.url("control"),
        "events_url": h.url("events"),
        "params": None,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.request(method, url, **kwargs) as response:
        body = await response.json(content_type=None) if response.content_length != 0 else {}
        return response.status, body, dict(response.headers)


BAD_STARTS: list[tuple[str, bytes | dict[str, Any], int, str | None]] = [
    # (what is wrong, body change or raw body, expected status, field named in the answer)
    ("malformed JSON", b"{not json", 400, "body"),
    ("not an object", b"[1, 2]", 400, "body"),
    ("missing control_url", {"control_url": ...}, 400, "control_url"),
    ("missing events_url", {"events_url": ...}, 400, "events_url"),
    ("control_url not a string", {"control_url": 5}, 400, "control_url"),
    ("non-http URL", {"subscribe_url": "file:///etc/passwd"}, 400, "subscribe_url"),
    ("params is a list", {"params": [1]}, 400, "params"),
    ("only a width", {"params": {"width": 256}}, 400, "params.height"),
    ("odd width", {"params": {"width": 255, "height": 256}}, 400, "params.width"),
    ("huge height", {"params": {"width": 256, "height": 100000}}, 400, "params.height"),
    ("boolean width", {"params": {"width": True, "height": 256}}, 400, "params.width"),
    ("bad max_fps", {"params": {"max_fps": -3}}, 400, "params.max_fps"),
    ("same stream twice", {}, 409, None),
]


async def test_bad_requests_get_clear_errors_and_never_touch_running_sessions(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with (
        StreamHarness(trickle, http, "live") as live,
        StreamHarness(trickle, http, "other") as other,
        running(max_sessions=2) as (runtime, url),
    ):
        await runtime.wait_ready()
        status, _, _ = await call(http, "POST", f"{url}/stream/start", json=body_for(live))
        assert status == 200
        feeding = asyncio.create_task(live.publish(make_segments(2, frames=15)))
        for what, change, expected, field in BAD_STARTS:
            headers = {"X-Stream-Id": "live" if expected == 409 else "other"}
            if isinstance(change, bytes):
                kwargs: dict[str, Any] = {"data": change}
            else:
                kwargs = {"json": body_for(live if expected == 409 else other, **change)}
            status, answer, _ = await call(http, "POST", f"{url}/stream/start", headers=headers, **kwargs)
            assert status == expected, what
            assert answer.get("error"), what
            if field:
                assert answer["field"] == field, what
        # params: not an object, unknown stream; stop: unknown stream is fine
        assert (
            await call(http, "POST", f"{url}/stream/params", data=b"[]", headers={"X-Stream-Id": "live"})
        )[0] == 400
        status, answer, _ = await call(
            http, "POST", f"{url}/stream/params", json={}, headers={"X-Stream-Id": "nope"}
        )
        assert (status, "nope" in answer["error"]) == (404, True)
        assert (await call(http, "POST", f"{url}/stream/stop", data=b"bye", headers={"X-Stream-Id": "nope"}))[
            0
        ] == 200
        status, answer, _ = await call(http, "GET", f"{url}/stream/status?stream_id=nope")
        assert status == 404
        # a body over the limit
        status, answer, _ = await call(
            http,
            "POST",
            f"{url}/stream/params",
            data=b"x" * (11 * 1024 * 1024),
            headers={"X-Stream-Id": "live"},
        )
        assert status == 413
        await feeding
        await live.input.close()
        await live.readers_done()
        # the running session never noticed: it read its input to the end, and every frame went out or
        # was dropped for a counted reason (on a busy machine the encoder may fall behind real time)
        assert live.events[-1]["event"]["reason"] == "input_ended"
        statistics = live.events[-1]["event"]["statistics"]
        assert_every_frame_accounted(statistics, 30)
        assert (statistics["errors"], statistics["last_error"]) == ({}, None)
        totals = runtime.frame_totals()
        assert totals.frames_out + sum(totals.dropped.values()) == 30
        frames, _ = decode(live.output_bytes())
        assert len(frames) == totals.frames_out == statistics["output"]["frames"]


async def test_bearer_token_guards_stream_routes_only(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http) as h, running(token="t0ken") as (runtime, url):
        await runtime.wait_ready()
        status, _, headers = await call(http, "POST", f"{url}/stream/start", json=body_for(h))
        assert (status, headers.get("WWW-Authenticate")) == (401, "Bearer")
        assert (
            await call(
                http, "POST", f"{url}/stream/start", json=body_for(h), headers={"Authorization": "t0ken"}
            )
        )[0] == 401
        assert (await call(http, "GET", f"{url}/health"))[0] == 200  # never 401 elsewhere
        assert (await call(http, "GET", f"{url}/version"))[0] == 200
        ok = {"Authorization": "Bearer t0ken", "X-Stream-Id": h.name}
        assert (await call(http, "POST", f"{url}/stream/start", json=body_for(h), headers=ok))[0] == 200
        assert (await call(http, "POST", f"{url}/stream/stop", data=b"done", headers=ok))[0] == 200


class SlowSetup(Processor):
    def __init__(self) -> None:
        self.release = threading.Event()

    def setup(self) -> None:
        self.release.wait(10)


async def test_health_follows_loading_serving_and_draining(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    processor = SlowSetup()
    async with StreamHarness(trickle, http) as h, running(processor) as (runtime, url):
        status, body, _ = await call(http, "GET", f"{url}/health")
        assert (status, body["state"]) == (503, "LOADING")
        status, body, headers = await call(http, "POST", f"{url}/stream/start", json=body_for(h))
        assert (status, "loading" in body["error"], "Retry-After" in headers) == (503, True, True)
        processor.release.set()
        await runtime.wait_ready()
        status, body, _ = await call(http, "GET", f"{url}/health")
        assert (status, body["status"], body["state"], body["capacity"]) == (200, "ok", "IDLE", 4)
        assert (await call(http, "POST", f"{url}/stream/start", json=body_for(h)))[0] == 200
        status, body, _ = await call(http, "GET", f"{url}/health")
        assert (body["state"], body["sessions"]) == ("OK", 1)
        metrics = await (await http.get(f"{url}/metrics")).text()
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        assert families["byoc_sessions_active"].samples[0].value == 1
        runtime.request_drain()  # a drain without a signal
        status, body, _ = await call(http, "GET", f"{url}/health")
        assert (status, body["state"]) == (503, "DRAINING")


async def test_ai_runner_style_health(http: aiohttp.ClientSession) -> None:
    async with running(health_style="ai-runner") as (runtime, url):
        await runtime.wait_ready()
        assert (await call(http, "GET", f"{url}/health"))[:2] == (200, {"status": "IDLE"})


async def test_live_video_to_video_maps_onto_sessions(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http, "lv") as h, running() as (runtime, url):
        await runtime.wait_ready()
        body = {
            "subscribe_url": h.url("subscribe"),
            "publish_url": h.url("publish"),
            "control_url": h.url("control"),
            "events_url": h.url("events"),
            "model_id": "my-model",
            "stream_id": "lv",
            "params": {"width": 256, "height": 256},
        }
        status, answer, _ = await call(http, "POST", f"{url}/live-video-to-video", json=body)
        assert (status, answer["stream_id"]) == (200, "lv")
        status, answer, _ = await call(http, "GET", f"{url}/stream/status?stream_id=lv")
        assert (status, answer["width"], answer["height"]) == (200, 256, 256)
        missing = {k: v for k, v in body.items() if k != "publish_url"} | {"stream_id": "lv2"}
        status, answer, _ = await call(http, "POST", f"{url}/live-video-to-video", json=missing)
        assert (status, answer["field"]) == (400, "publish_url")


async def test_params_and_stop_fall_back_to_the_body_and_to_the_only_session(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http, "only") as h, running() as (runtime, url):
        await runtime.wait_ready()
        assert (await call(http, "POST", f"{url}/stream/start", json=body_for(h)))[0] == 200
        status, answer, _ = await call(http, "POST", f"{url}/stream/params", json={"prompt": "a cat"})
        assert (status, answer["stream_id"]) == (200, "only")
        status, answer, _ = await call(
            http, "POST", f"{url}/stream/stop", json={"gateway_request_id": "only"}
        )
        assert (status, answer["status"]) == (200, "stopping")
        await h.readers_done()
        # the final event names the parameters by their digest; /stream/status had them in full
        digest = hashlib.sha256(b'{"prompt":"a cat"}').hexdigest()[:16]
        assert h.events[-1]["event"]["statistics"]["params"] == {"sha256": digest, "bytes": 18}
