"""Thread ownership: sessions change only on the main loop, whichever thread or channel asks.

The API thread hands commands to the main loop and reads snapshots (docs/architecture.md); a parameter
update is checked the same way over HTTP and over the control channel; errors that the session's
threads report concurrently are all counted, in its status and in the metrics alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.serve.config import Settings
from byoc.serve.runtime import Runtime
from byoc.session import Session
from byoc.session.events import params_digest
from byoc.spec import StreamSpec
from tests.support import StreamHarness, decode, make_segments


@contextlib.asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[tuple[Runtime, str]]:
    runtime = Runtime(Settings(host="127.0.0.1", port=0, **settings), processor=PassthroughProcessor())
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.serve(shutdown=stop.wait()))
    await runtime.wait_listening()
    try:
        await runtime.wait_ready()
        yield runtime, f"http://127.0.0.1:{runtime.port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def errors_total(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """``byoc_errors_total`` by type, as /metrics reports it."""
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        sample.labels["type"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "byoc_errors"
        for sample in family.samples
        if sample.name == "byoc_errors_total"
    }


async def first_event(h: StreamHarness, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first event the stream published that ``matches``, waiting up to 10 s for it to arrive."""
    async with asyncio.timeout(10):
        while True:
            for event in h.events:
                if matches(event["event"]):
                    return dict(event["event"])
            await asyncio.sleep(0.01)  # polls a condition; the order of events is not assumed


@pytest.mark.parametrize("bad", [500, 0, "fast"], ids=["above-120", "zero", "string"])
async def test_a_bad_max_fps_is_refused_over_the_control_channel_as_over_http(
    trickle: RunningTrickle, http: aiohttp.ClientSession, bad: object
) -> None:
    async with StreamHarness(trickle, http) as h, running() as (_, url):
        status, _ = await call(http, "POST", f"{url}/stream/start", json=h.start_body({"max_fps": 15}))
        assert status == 200
        # over HTTP: a 400 naming the field
        status, answer = await call(
            http, "POST", f"{url}/stream/params", json={"max_fps": bad}, headers={"X-Stream-Id": h.name}
        )
        assert (status, answer["field"]) == (400, "params.max_fps")
        # over the control channel: refused too, reported to the gateway, counted as an error
        control = h.channels.name("control")
        await h.server.wait_for_request(lambda r: r.method == "GET" and r.channel == control)
        await h.control.write_segment(json.dumps({"max_fps": bad}).encode())
        event = await first_event(h, lambda e: str(e.get("type", "")).startswith("params_"))
        assert (event["type"], event.get("field")) == ("params_rejected", "params.max_fps")
        status, stats = await call(http, "GET", f"{url}/stream/status?stream_id={h.name}")
        assert (stats["params"], stats["errors"]) == ({"max_fps": 15}, {"params": 1})
        assert (await errors_total(http, url))["params"] == 1
        # the cap stays: every other frame of the 30 fps input
        await h.publish(make_segments(1))
        await h.input.close()
        await h.readers_done()
    frames, _ = decode(h.output_bytes())
    assert [f.index for f in frames] == list(range(0, 30, 2))
    final = h.events[-1]["event"]
    assert (final["type"], final["statistics"]["dropped"]["rate_cap"]) == ("stream_stopped", 15)


async def test_updates_over_the_control_channel_are_bounded_in_size_as_over_http(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    limit = 1024
    async with StreamHarness(trickle, http) as h, running(max_params_bytes=limit) as (_, url):
        status, _ = await call(http, "POST", f"{url}/stream/start", json=h.start_body({"prompt": "a"}))
        assert status == 200
        control = h.channels.name("control")
        await h.server.wait_for_request(lambda r: r.method == "GET" and r.channel == control)
        # each update alone fits; the second would take what the stream keeps past the limit
        await h.control.write_segment(json.dumps({"a": "x" * 600}).encode())
        applied = await first_event(h, lambda e: e.get("type") == "params_updated")
        assert applied["params"]["bytes"] < limit
        await h.control.write_segment(json.dumps({"b": "y" * 600}).encode())
        event = await first_event(h, lambda e: e.get("type") == "params_rejected")
        assert event["field"] == "params"
        status, stats = await call(http, "GET", f"{url}/stream/status?stream_id={h.name}")
        assert (stats["params"], stats["errors"]) == ({"prompt": "a", "a": "x" * 600}, {"params": 1})
        await h.input.close()
        await h.readers_done()


async def test_errors_reported_from_four_threads_at_once_are_all_counted(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    per_thread, threads = 20_000, 4
    async with StreamHarness(trickle, http) as h, running() as (runtime, url):
        assert (await call(http, "POST", f"{url}/stream/start", json=h.start_body()))[0] == 200
        session = runtime.manager.get(h.name)
        # What the decoder, processing and encoder threads and the event loop each call on an error
        # (their on_error hook), here from four threads at once, switching threads as often as possible.
        report = session._error
        start = threading.Barrier(threads)

        def hammer() -> None:
            start.wait()
            for _ in range(per_thread):
                report("process")

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            await asyncio.gather(*(asyncio.to_thread(hammer) for _ in range(threads)))
        finally:
            sys.setswitchinterval(interval)
        _, stats = await call(http, "GET", f"{url}/stream/status?stream_id={h.name}")
        metrics = await errors_total(http, url)
    assert stats["errors"]["process"] == metrics["process"] == per_thread * threads
    assert sum(stats["errors"].values()) == sum(metrics.values())


async def test_params_updates_over_http_are_applied_on_the_main_loop(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    """Session.update_params refuses to run off the session's loop, so a 200 proves the hand-over."""
    async with StreamHarness(trickle, http) as h, running() as (runtime, url):
        assert (await call(http, "POST", f"{url}/stream/start", json=h.start_body({"max_fps": 15})))[0] == 200
        for update in ({"max_fps": 10}, {"prompt": "a cat"}):
            status, answer = await call(
                http, "POST", f"{url}/stream/params", json=update, headers={"X-Stream-Id": h.name}
            )
            assert (status, answer) == (200, {"status": "updated", "stream_id": h.name})
        # without an id: the only session
        status, answer = await call(http, "POST", f"{url}/stream/params", json={"strength": 0.5})
        assert (status, answer["stream_id"]) == (200, h.name)
        _, stats = await call(http, "GET", f"{url}/stream/status?stream_id={h.name}")
        assert stats["params"] == {"max_fps": 10, "prompt": "a cat", "strength": 0.5}
        assert stats["errors"] == {}
        assert sum((await errors_total(http, url)).values()) == 0  # no 500 was counted as "http"
        event = await first_event(h, lambda e: e.get("type") == "params_updated")
        assert event["params"] == params_digest({"max_fps": 10})  # the update's digest, never the update
        assert runtime.sessions_active() == 1


async def test_a_session_refuses_updates_from_other_threads(http: aiohttp.ClientSession) -> None:
    session = Session(
        StreamSpec("s1", None, None, params={"max_fps": 15}, max_fps=15.0), PassthroughProcessor(), http
    )
    with pytest.raises(RuntimeError, match="off the session's event loop"):
        await asyncio.to_thread(session.update_params, {"max_fps": 5})
    stats = session.statistics()
    assert (stats.params, stats.errors) == ({"max_fps": 15}, {})
    assert session.update_params({"max_fps": 5}) is True  # on its loop
    assert session.update_params({"max_fps": -1}) is False
    stats = session.statistics()
    assert (stats.params, stats.errors) == ({"max_fps": 5}, {"params": 1})


def test_the_api_does_not_import_the_runtime() -> None:
    """The API knows the runtime only through byoc.serve.api.Control."""
    code = "import sys, byoc.serve.api; print(sorted(m for m in sys.modules if m.startswith('byoc.serve')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "byoc.serve.api" in loaded
    for module in ("byoc.serve.runtime", "byoc.serve.control", "byoc.serve.manager"):
        assert module not in loaded
