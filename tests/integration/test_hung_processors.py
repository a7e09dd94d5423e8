"""Processors that never return, against the runtime in-process over real loopback HTTP: the watchdog
ends their sessions, frees their slots, counts the threads it leaves behind and turns /health unready."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from byoc.dev.trickle_server import RunningTrickle
from byoc.processor import Processor
from tests.integration.test_api import body_for, call, running
from tests.misbehaving import HangingAsync, HangingStart
from tests.processors import Hanging
from tests.support import StreamHarness, make_segments

SLACK_S = 5.0
"""What a busy machine may add to a timeout before the session has ended."""


async def health_until(http: aiohttp.ClientSession, url: str, status: int, abandoned: int) -> dict[str, Any]:
    """Poll /health until it answers ``status`` with ``abandoned`` threads left behind."""
    async with asyncio.timeout(10):
        while True:
            answer, body, _ = await call(http, "GET", f"{url}/health")
            if (answer, body["abandoned_threads"]) == (status, abandoned):
                return body
            await asyncio.sleep(0.05)


async def no_sessions_listed(http: aiohttp.ClientSession, url: str) -> None:
    """Poll /stream/status until it lists no session: an ended session is listed until its threads
    were joined, a moment after its channels were DELETEd."""
    async with asyncio.timeout(SLACK_S):
        while (await call(http, "GET", f"{url}/stream/status"))[1]["sessions"]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("hanging", [Hanging, HangingAsync], ids=["sync", "async"])
async def test_a_hung_process_ends_its_session_frees_its_slot_and_is_counted(
    trickle: RunningTrickle, http: aiohttp.ClientSession, hanging: type[Processor]
) -> None:
    processor: Any = hanging()
    timeout_s = 1.0
    settings: dict[str, Any] = {"max_sessions": 1, "process_timeout_s": timeout_s, "max_abandoned_threads": 1}
    try:
        async with running(processor, **settings) as (runtime, url):
            await runtime.wait_ready()
            # at max-sessions 1, the second start runs only if the first hung session freed its slot
            for left_behind, name in enumerate(("a", "b"), start=1):
                async with StreamHarness(trickle, http, name) as h:
                    status, body, _ = await call(http, "POST", f"{url}/stream/start", json=body_for(h))
                    assert status == 200, body
                    began = time.monotonic()
                    await h.publish(make_segments(1, frames=10))
                    await h.readers_done(timeout_s + SLACK_S)  # ended: its channels are DELETEd
                    took = time.monotonic() - began
                final = h.events[-1]["event"]
                assert (final["type"], final["reason"]) == ("stream_stopped", "processor_hung")
                assert "process() did not return within 1s" in final["statistics"]["last_error"]
                assert final["statistics"]["errors"]["hung"] == 1
                assert took < timeout_s + SLACK_S
                await no_sessions_listed(http, url)
                await health_until(http, url, 200 if left_behind == 1 else 503, abandoned=left_behind)
            # two threads left behind, one allowed: unready, and starts are refused with the reason
            health = await health_until(http, url, 503, abandoned=2)
            assert health["state"] == "ERROR"
            assert "2 threads are stuck in the processor" in health["error"]
            async with StreamHarness(trickle, http, "c") as h:
                status, body, _ = await call(http, "POST", f"{url}/stream/start", json=body_for(h))
            assert (status, "stuck in the processor" in body["error"]) == (503, True)
            processor.release.set()  # the hooks return at last: nothing is stuck any more
            await health_until(http, url, 200, abandoned=0)
    finally:
        processor.release.set()


async def test_a_hung_on_start_is_refused_and_leaves_nothing_behind(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    processor = HangingStart()
    timeout_s = 1.0
    try:
        async with running(processor, max_sessions=1, start_timeout_s=timeout_s) as (runtime, url):
            await runtime.wait_ready()
            async with StreamHarness(trickle, http, "a") as h:
                began = time.monotonic()
                status, body, headers = await call(http, "POST", f"{url}/stream/start", json=body_for(h))
                took = time.monotonic() - began
                assert status == 503, body
                assert "on_start() did not return within 1s" in body["error"]
                assert "Retry-After" in headers
                assert took < timeout_s + SLACK_S
                assert (await call(http, "GET", f"{url}/stream/status"))[1]["sessions"] == []
                health = await health_until(http, url, 200, abandoned=1)
                assert health["sessions"] == 0
                await h.readers_done()  # the channels it would have published are DELETEd
                assert not h.server.has_channel(h.channels.name("output"))
                assert not h.server.has_channel(h.channels.name("events"))
            assert h.events[-1]["event"]["reason"] == "processor_hung"
            processor.release.set()
            await health_until(http, url, 200, abandoned=0)
            async with StreamHarness(trickle, http, "b") as h:  # max-sessions 1: the slot is free
                status, body, _ = await call(http, "POST", f"{url}/stream/start", json=body_for(h))
                assert status == 200, body
    finally:
        processor.release.set()


async def test_a_stop_is_answered_within_its_bound_while_the_session_cannot_drain(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    """A stop waits for the session's final event only up to ``stop_answer_timeout_s``: a processor
    stuck in process() holds the drain up, not the answer."""
    processor = Hanging()
    bound_s = 1.0
    settings: dict[str, Any] = {
        "process_timeout_s": 0,
        "drain_timeout_s": 30.0,
        "stop_answer_timeout_s": bound_s,
    }
    try:
        async with running(processor, **settings) as (runtime, url):
            await runtime.wait_ready()
            async with StreamHarness(trickle, http, "s1") as h:
                status, body, _ = await call(http, "POST", f"{url}/stream/start", json=body_for(h))
                assert status == 200, body
                await h.publish(make_segments(1, frames=10))
                status_url = f"{url}/stream/status?stream_id=s1"
                async with asyncio.timeout(10):  # a decoded frame is on its way into the hung hook
                    while True:
                        if (await call(http, "GET", status_url))[1]["input"]["frames"] >= 1:
                            break
                        await asyncio.sleep(0.05)
                began = time.monotonic()
                status, body, _ = await call(
                    http, "POST", f"{url}/stream/stop", headers={"X-Stream-Id": "s1"}
                )
                took = time.monotonic() - began
                assert (status, body["status"]) == (200, "stopping")
                assert took < bound_s + SLACK_S
                assert "stream_stopped" not in h.event_types()  # the hung hook still holds the drain
                processor.release.set()
                await h.readers_done(SLACK_S)
            assert h.event_types()[-1] == "stream_stopped"
    finally:
        processor.release.set()
