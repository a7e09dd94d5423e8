"""The session limits that protect capacity under every protocol (docs/protocol.md §2.6): no input
segment for ``input_timeout_s``, no decoded video frame within ``first_frame_timeout_s``. Each runs a
container in-process with the default (BYOC) protocol, on loopback with a real trickle server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np

from byoc.dev.synthetic import publish_live
from byoc.dev.trickle_server import RunningTrickle
from byoc.serve.runtime import Runtime
from tests.integration.test_api import body_for, call, running
from tests.support import StreamHarness, make_segments

__all__: list[str] = []

SEGMENT_S = 0.5
"""How long each synthetic segment lasts (15 frames at 30 fps)."""
END_SLACK_S = 5.0
"""What a limit's end may take on a loaded machine beyond the limit itself (the drain, the DELETEs)."""


async def _until(check: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``check`` until it holds; returns when that was (time.monotonic)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if check():
                return time.monotonic()
            await asyncio.sleep(0.02)


async def _start(http: aiohttp.ClientSession, url: str, h: StreamHarness) -> None:
    status, answer, _ = await call(
        http, "POST", f"{url}/stream/start", json=body_for(h), headers={"X-Stream-Id": h.name}
    )
    assert status == 200, answer


def _final(h: StreamHarness) -> dict[str, Any]:
    """The stream's last event, which must be its final one."""
    assert h.events, "no event arrived"
    last: dict[str, Any] = h.events[-1]["event"]
    assert last["type"] == "stream_stopped", h.event_types()
    return last


def _random_segments(count: int, size: int = 4096) -> list[list[bytes]]:
    """Segments of random bytes: input that arrives but is not MPEG-TS and never decodes."""
    rng = np.random.default_rng(11)
    return [[rng.integers(0, 256, size, dtype=np.uint8).tobytes()] for _ in range(count)]


async def _ended(runtime: Runtime, h: StreamHarness, timeout_s: float) -> float:
    """Wait until the stream's session ended and gave its slot back; returns when (time.monotonic)."""
    at = await _until(lambda: runtime.sessions_active() == 0, timeout_s)
    await h.readers_done()  # the final event has been read
    return at


async def test_a_session_whose_input_stops_without_an_end_times_out_and_frees_its_slot(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    timeout_s = 1.0
    async with (
        StreamHarness(trickle, http, "quiet") as quiet,
        StreamHarness(trickle, http, "next") as following,
        running(max_sessions=1, input_timeout_s=timeout_s, first_frame_timeout_s=0) as (runtime, url),
    ):
        await runtime.wait_ready()
        await _start(http, url, quiet)
        # two segments, then nothing: the publisher neither ends the stream nor closes its channel
        published = (await quiet.publish(make_segments(2, frames=15)))[-1]
        ended = await _ended(runtime, quiet, timeout_s + END_SLACK_S)
        last = _final(quiet)
        assert last["reason"] == "input_timeout"
        assert "no input segment" in last["statistics"]["last_error"]
        assert last["statistics"]["input"]["segments"] == 2
        # the clock ran from the last segment's start, which was SEGMENT_S before it was complete
        assert ended - published >= timeout_s - SEGMENT_S
        await _start(http, url, following)  # the slot is free again at max_sessions=1
        assert runtime.sessions_active() == 1


async def test_a_session_that_keeps_receiving_input_does_not_time_out(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    timeout_s = 1.0
    segments = make_segments(6, frames=15)  # 3 s of input, a segment starting every half second
    assert len(segments) * SEGMENT_S > 2 * timeout_s
    async with (
        StreamHarness(trickle, http, "busy") as busy,
        running(input_timeout_s=timeout_s, first_frame_timeout_s=0) as (runtime, url),
    ):
        await runtime.wait_ready()
        await _start(http, url, busy)
        await busy.publish(segments)
        assert runtime.sessions_active() == 1, "the session ended while its input kept coming"
        await busy.input.close()  # the end of the stream ends the session
        await _ended(runtime, busy, END_SLACK_S)
        last = _final(busy)
        assert last["reason"] == "input_ended"
        assert last["statistics"]["input"]["segments"] == len(segments)


async def test_a_session_whose_input_never_decodes_ends_at_the_first_frame_deadline(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    timeout_s = 1.0
    async with (
        StreamHarness(trickle, http, "noise") as noise,
        running(input_timeout_s=timeout_s, first_frame_timeout_s=timeout_s) as (runtime, url),
    ):
        await runtime.wait_ready()
        began = time.monotonic()
        await _start(http, url, noise)
        # input keeps arriving, well within the input timeout, but none of it is video
        feeding = asyncio.create_task(publish_live(noise.input, _random_segments(40), segment_s=0.25))
        try:
            ended = await _ended(runtime, noise, timeout_s + END_SLACK_S)
        finally:
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
        last = _final(noise)
        assert last["reason"] == "first_frame_timeout"  # last_error: the decoder giving up at the end
        assert last["statistics"]["input"]["frames"] == 0
        assert last["statistics"]["input"]["segments"] >= 2
        assert ended - began >= timeout_s


async def test_a_session_given_no_input_ends_at_the_first_frame_deadline_without_an_input_timeout(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    timeout_s = 1.0
    async with (
        StreamHarness(trickle, http, "silent") as silent,
        running(input_timeout_s=0, first_frame_timeout_s=timeout_s) as (runtime, url),
    ):
        await runtime.wait_ready()
        began = time.monotonic()
        await _start(http, url, silent)
        ended = await _ended(runtime, silent, timeout_s + END_SLACK_S)
        assert _final(silent)["reason"] == "first_frame_timeout"
        assert ended - began >= timeout_s


async def test_a_session_with_video_passes_the_first_frame_deadline(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    timeout_s = 1.0
    segments = make_segments(5, frames=15)  # 2.5 s of video: past the deadline
    async with (
        StreamHarness(trickle, http, "video") as video,
        running(input_timeout_s=0, first_frame_timeout_s=timeout_s) as (runtime, url),
    ):
        await runtime.wait_ready()
        await _start(http, url, video)
        await video.publish(segments)
        assert runtime.sessions_active() == 1, "the session ended although it decoded video"
        await video.input.close()
        await _ended(runtime, video, END_SLACK_S)
        last = _final(video)
        assert last["reason"] == "input_ended"
        assert last["statistics"]["input"]["frames"] == 5 * 15
