"""Real-world input delivery: whole segments at once (burst), spread over the second, or in 1 KiB chunks.

A burst is early in stream time, not late: a session that keeps up outputs every frame however the
bytes of a segment arrive. Input that truly arrives late (a gateway catching up after a stall) loses
the frames that are past the latency budget, each one counted ``late``, and the newer ones flow.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import av
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.synthetic import publish_live
from byoc.dev.trickle_server import RunningTrickle
from byoc.session import Session
from byoc.spec import EndReason, SessionSettings
from tests.conftest import TEST_CLIENT_SETTINGS, assert_every_frame_accounted, spare_cpu, speed_can_be_judged
from tests.corpus import segments
from tests.support import StreamHarness

SETTINGS = SessionSettings(trickle=TEST_CLIENT_SETTINGS, status_interval_s=0.5, drain_timeout_s=3.0)
SEGMENT_S = 1.0  # the corpus cases used here are cut into 1 s segments


def _video_pts(data: bytes) -> list[int]:
    """The timestamps of every video frame in a TS byte string."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return [int(frame.pts or 0) for frame in container.decode(video=0)]


def _frame_count(parts: list[bytes]) -> int:
    return sum(len(_video_pts(part)) for part in parts)


async def _input_read(h: StreamHarness, count: int) -> None:
    """Wait until the session asks for input segment ``count`` (so it has every one before it)."""
    channel = h.channels.name("input")
    await h.server.wait_for_request(
        lambda r: r.method == "GET" and r.channel == channel and r.seq == str(count), timeout=30
    )


async def _run_session(
    h: StreamHarness,
    http: aiohttp.ClientSession,
    count: int,
    publish: Callable[[StreamHarness], Awaitable[object]],
) -> dict[str, Any]:
    """A passthrough session on ``h`` while ``publish`` sends its ``count`` input segments; returns the
    final statistics (from the ``stream_stopped`` event), once the output channel ended."""
    session = Session(h.spec(), PassthroughProcessor(), http, SETTINGS)
    run = asyncio.create_task(session.run())
    await session.wait_started()
    await publish(h)
    await _input_read(h, count)
    await h.input.close()
    assert await asyncio.wait_for(run, 30) == EndReason.INPUT_ENDED
    await h.readers_done(30)
    assert not h.reader_errors
    assert h.events[-1]["event"]["type"] == "stream_stopped"
    statistics: dict[str, Any] = h.events[-1]["event"]["statistics"]
    return statistics


def _live(parts: list[bytes], delivery: str) -> Callable[[StreamHarness], Awaitable[object]]:
    def publish(h: StreamHarness) -> Awaitable[object]:
        return publish_live(h.input, [[part] for part in parts], delivery=delivery, segment_s=SEGMENT_S)

    return publish


@pytest.mark.parametrize("case", ["h264-only", "h264-aac"])
@pytest.mark.parametrize("delivery", ["burst", "spread", "chunks"])
async def test_one_session_loses_no_frame_however_segments_arrive(
    trickle: RunningTrickle, http: aiohttp.ClientSession, case: str, delivery: str
) -> None:
    parts = segments(case)
    fed = _frame_count(parts)
    async with StreamHarness(trickle, http) as h:
        statistics = await _run_session(h, http, len(parts), _live(parts, delivery))
    assert_every_frame_accounted(statistics, fed=fed)
    assert sum(statistics["dropped"].values()) == 0, statistics["dropped"]
    out = _video_pts(h.output_bytes())
    assert len(out) == fed
    assert out == sorted(out)


@pytest.mark.parametrize("delivery", ["burst", "spread"])
async def test_eight_sessions_in_one_process_lose_no_frame(
    trickle: RunningTrickle, http: aiohttp.ClientSession, delivery: str
) -> None:
    parts = segments("h264-only")
    fed = _frame_count(parts)
    spare = spare_cpu()
    harnesses = [StreamHarness(trickle, http, f"s{n}") for n in range(8)]
    for h in harnesses:
        await h.__aenter__()
    try:
        finals = await asyncio.gather(
            *(_run_session(h, http, len(parts), _live(parts, delivery)) for h in harnesses)
        )
    finally:
        for h in harnesses:
            await h.__aexit__(None, None, None)
    for h, statistics in zip(harnesses, finals, strict=True):
        assert_every_frame_accounted(statistics, fed=fed)
        assert len(_video_pts(h.output_bytes())) == statistics["output"]["frames"]
    judged, reason = speed_can_be_judged(spare)
    if not judged:
        pytest.skip(reason)
    lost = {h.name: statistics["dropped"] for h, statistics in zip(harnesses, finals, strict=True)}
    assert all(sum(dropped.values()) == 0 for dropped in lost.values()), lost


async def test_a_catch_up_after_a_stall_drops_only_the_stale_frames(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    parts = segments("h264-only")
    per_segment = [len(_video_pts(part)) for part in parts]
    budget = SETTINGS.latency_budget_s
    stall_s = 2 * SEGMENT_S + budget  # segment 1 comes 1.5 s after it was due: all of it is stale

    async def stall_then_catch_up(h: StreamHarness) -> None:
        await publish_live(h.input, [[parts[0]]], delivery="burst", segment_s=SEGMENT_S)
        await asyncio.sleep(stall_s)  # the source's pace: the gateway stalls, then sends its backlog at once
        await publish_live(h.input, [[part] for part in parts[1:]], delivery="burst", realtime=False)

    async with StreamHarness(trickle, http) as h:
        statistics = await _run_session(h, http, len(parts), stall_then_catch_up)
    assert_every_frame_accounted(statistics, fed=sum(per_segment))
    dropped = statistics["dropped"]
    assert dropped["overflow"] == 0
    out = _video_pts(h.output_bytes())
    assert out == sorted(out)
    stale = _video_pts(parts[1])
    stale_out = [pts for pts in out if min(stale) <= pts <= max(stale)]
    assert dropped["late"] >= len(stale) - len(stale_out) > len(stale) // 2, (dropped, len(stale_out))
    assert out[-1] == max(_video_pts(parts[-1]))  # the newest frames flow
