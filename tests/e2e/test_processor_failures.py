"""Processors that exit or crash, in ``byoc serve`` as a real subprocess: what they leave in the log."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import aiohttp
import pytest

from byoc.dev.trickle_server import RunningTrickle
from tests.e2e.serve import ServeProcess
from tests.e2e.test_serve import start
from tests.support import StreamHarness, make_segments

pytestmark = pytest.mark.e2e


async def test_an_exit_in_process_ends_only_its_session_with_the_error_recorded(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    segments = make_segments(2, frames=15)
    async with ServeProcess("tests.misbehaving:Exiting") as serve, contextlib.AsyncExitStack() as stack:
        await serve.wait_ready(http)
        names = ("SystemExit", "KeyboardInterrupt", "healthy")
        exiting, interrupted, healthy = [
            await stack.enter_async_context(StreamHarness(trickle, http, name.lower())) for name in names
        ]
        for h, params in ((exiting, {"raise": "SystemExit"}), (interrupted, {"raise": "KeyboardInterrupt"})):
            assert await start(http, serve, h, **params) == 200
        assert await start(http, serve, healthy) == 200
        await asyncio.gather(*(h.publish(segments[:1]) for h in (exiting, interrupted, healthy)))
        for h, error in ((exiting, "SystemExit: exit from frame 0"), (interrupted, "KeyboardInterrupt")):
            await h.readers_done()
            final = h.events[-1]["event"]
            assert (final["type"], final["reason"]) == ("stream_stopped", "processor_error")
            assert final["statistics"]["last_error"] == error
            assert final["statistics"]["errors"] == {"process": 1}
            line = await serve.wait_for_log(f"processing ended: {error}")
            assert "ERROR" in line
            assert f"[{h.name}]" in line
        # the container and the other session go on
        await healthy.publish(segments[1:])
        async with http.get(f"{serve.url}/stream/status", params={"stream_id": "healthy"}) as response:
            assert response.status == 200
            assert (await response.json())["output"]["frames"] > 0
        async with http.get(f"{serve.url}/health") as response:
            assert response.status == 200
        serve.signal(signal.SIGTERM)
        assert await serve.wait_exit() == 0, serve.log
        await healthy.readers_done()
    assert healthy.events[-1]["event"]["reason"] == "shutdown"
    assert healthy.events[-1]["event"]["statistics"]["errors"] == {}


async def test_a_segfault_in_a_processor_leaves_its_stack_in_the_log(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with ServeProcess("tests.misbehaving:Crashing") as serve, StreamHarness(trickle, http) as h:
        await serve.wait_ready(http)
        assert await start(http, serve, h) == 200
        with contextlib.suppress(Exception):  # the container dies while the input is being published
            await h.publish(make_segments(1, frames=5))
        assert await serve.wait_exit() == -signal.SIGSEGV
        await serve.kill()  # reads the rest of its stderr
    assert "Fatal Python error: Segmentation fault" in serve.log
    crashed_in = [line for line in serve.lines if "tests/misbehaving.py" in line]
    assert crashed_in, serve.log[-3000:]
    assert crashed_in[0].endswith("in process")  # the processor's own frame, innermost first
