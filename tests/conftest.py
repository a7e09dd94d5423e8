"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import av
import pytest

from byoc.dev.synthetic import pattern
from byoc.dev.trickle_server import RunningTrickle, serve_trickle
from byoc.logs import StreamIdFilter
from byoc.media.encoder import EncoderSettings, open_video_encoder
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.protocol import RetryPolicy

FAST_RETRY = RetryPolicy(max_retries=4, initial_delay_s=0.01, max_delay_s=0.05, max_elapsed_s=5.0)
TEST_CLIENT_SETTINGS = TrickleClientSettings(
    retry=FAST_RETRY, idle_read_timeout_s=5.0, preconnect_refresh_s=4.0, response_timeout_s=5.0
)


@pytest.fixture
async def trickle() -> AsyncIterator[RunningTrickle]:
    """A byoc trickle server on loopback (auto-create off, like the orchestrator's)."""
    async with serve_trickle() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A trickle client session with fast retries."""
    async with create_client_session(TEST_CLIENT_SETTINGS) as session:
        yield session


_STAGE_THREADS = ("decode-", "process-", "encode-")


@pytest.fixture(autouse=True)
def _stage_logs_name_their_stream(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every line a session's decoder, processing or encoder thread logs names its stream (not ``-``)."""
    stream_ids = StreamIdFilter()
    caplog.handler.addFilter(stream_ids)
    yield
    caplog.handler.removeFilter(stream_ids)
    anonymous = [
        f"{record.threadName}: {record.getMessage()}"
        for record in caplog.get_records("call")
        if (record.threadName or "").startswith(_STAGE_THREADS) and getattr(record, "stream_id", "-") == "-"
    ]
    assert not anonymous, f"stage log lines without a stream id: {anonymous}"


# --- a busy machine: accounting instead of pace, and speed judged only where there is spare CPU ------

SPEED_NEEDS_SPARE_CPU = 0.8
"""The share of the machine's CPUs that must be free before a test judges speed (answers per second,
latency percentiles); below it the test has already checked the behaviour and skips the speed part."""

_SPIN = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
    "print(time.process_time())\n"
)


def spare_cpu(seconds: float = 0.4) -> float:
    """The share of this machine's CPUs that one busy process per core gets right now: about 1.0 on an
    idle machine, about 0.5 while one other busy process per core runs beside the tests."""
    cores = os.cpu_count() or 1
    spinners = [
        subprocess.Popen([sys.executable, "-c", _SPIN, str(seconds)], stdout=subprocess.PIPE, text=True)
        for _ in range(cores)
    ]
    used = 0.0
    for spinner in spinners:
        out, _ = spinner.communicate(timeout=30)
        used += float(out)
    return min(1.0, used / (cores * seconds))


SPEED_NEEDS_FRAME_MS = 4.5
"""The CPU milliseconds in which the machine must encode and decode a 512x512 reference frame (byoc's
encoder settings) before a test judges speed. The speed figures assume about that: a slower machine, or
one whose CPUs are shared with neighbours (a free share, but slow), gets its behaviour checked only."""


def reference_frame_ms(frames: int = 30) -> float:
    """CPU milliseconds this machine takes now to encode and decode one 512x512 test frame."""
    encoder = open_video_encoder(EncoderSettings(width=512, height=512))
    decoder = av.CodecContext.create("h264", "r")
    pictures = [av.VideoFrame.from_ndarray(pattern(i, 512, 512), format="rgb24") for i in range(frames)]
    pictures = [picture.reformat(format="yuv420p") for picture in pictures]
    began = time.process_time()
    for index, picture in enumerate(pictures):
        picture.pts = index * 3000
        for packet in encoder.encode(picture):
            decoder.decode(packet)
    return (time.process_time() - began) * 1000 / frames


def speed_can_be_judged(spare: float) -> tuple[bool, str]:
    """Whether a test may assert speed with ``spare`` of the CPUs free (and the machine as fast as it
    is now), and the reason when not."""
    if spare < SPEED_NEEDS_SPARE_CPU:
        return False, (
            f"speed not judged: {spare:.0%} of the CPUs were free (needs {SPEED_NEEDS_SPARE_CPU:.0%}); "
            "the behaviour was checked"
        )
    frame_ms = reference_frame_ms()
    if frame_ms > SPEED_NEEDS_FRAME_MS:
        return False, (
            f"speed not judged: a reference frame took {frame_ms:.1f} ms of CPU (needs at most "
            f"{SPEED_NEEDS_FRAME_MS:g} ms); the behaviour was checked"
        )
    return True, ""


def assert_every_frame_accounted(statistics: Mapping[str, Any], fed: int | None = None) -> int:
    """A session's final statistics (``stream_stopped``) add up: every frame that reached it went out
    or was dropped for a counted reason; with ``fed``, exactly that many frames reached it. Returns the
    number of frames that reached it."""
    out = statistics["output"]["frames"]
    dropped = dict(statistics["dropped"])
    assert set(dropped) <= set(DROP_REASONS), f"unknown drop reasons: {set(dropped) - set(DROP_REASONS)}"
    reached = out + sum(dropped.values())
    refused_before_decode = sum(dropped.get(reason, 0) for reason in _DROPPED_BEFORE_INPUT)
    assert statistics["input"]["frames"] + refused_before_decode == reached, (
        f"frames lost without a count: {statistics['input']['frames']} in, {out} out, dropped {dropped}"
    )
    if fed is not None:
        assert reached == fed, f"{fed} frames fed, {out} out and {dropped} dropped"
    return int(reached)


_DROPPED_BEFORE_INPUT = ("rate_cap", "timestamps")
"""Drop reasons for frames the decoder refuses before they count as input (``input.frames``)."""

DROP_REASONS = ("late", "overflow", "processor", *_DROPPED_BEFORE_INPUT)
"""Every reason a session counts a dropped frame under: ``late`` and ``overflow`` (byoc.media.queues),
``processor`` (``process`` returned None), and the decoder's refusals."""
