"""Conformance: media made by a third-party encoder (tests/corpus.py), through a live session.

Every case of the corpus goes through a :class:`Session` over a loopback trickle server and either
works — every video frame that went in came out or was dropped for a counted reason, the sound lasts
as long as it went in, every output segment decodes on its own, starts with PAT/PMT and an IDR, and
the timestamps only go up — or ends the session with one ``stream_stopped`` event naming the cause.

A delivery is how the input's bytes reach the session: ``spread`` over each segment's duration (as a
live encoder writes them), ``burst`` (each whole segment at once, a segment's duration apart) or
``trickle`` (1 KiB at a time, spread over the segment's duration).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import io
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import av
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.session import Session
from byoc.spec import EndReason, SessionSettings
from byoc.trickle.protocol import RETENTION
from byoc.trickle.publisher import TricklePublisher
from tests.conftest import (
    SPEED_NEEDS_SPARE_CPU,
    TEST_CLIENT_SETTINGS,
    assert_every_frame_accounted,
    spare_cpu,
)
from tests.corpus import CASES, Case, segments
from tests.support import PSI_PIDS, StreamHarness, decode, first_ts_pid, first_video_is_keyframe

SETTINGS = SessionSettings(trickle=TEST_CLIENT_SETTINGS, status_interval_s=0.5, drain_timeout_s=3.0)

TRICKLE_CHUNK = 1024
SPREAD_CHUNKS_PER_S = 30  # one write per frame of a 30 fps stream

AUDIO_TOLERANCE_S = 0.15
NOT_LOAD = ("processor", "rate_cap", "timestamps")
"""Drop reasons that have nothing to do with the machine keeping up."""


class Delivery(enum.StrEnum):
    SPREAD = "spread"
    BURST = "burst"
    TRICKLE = "trickle"


class Outcome(enum.Enum):
    WORKS = "works"
    """Every frame accounted for, exactly as many as a reference decoder finds in the input."""
    DAMAGED = "damaged"
    """One segment is damaged: its frames may be lost, none of the others."""
    ENDS = "ends"
    """The session ends with one clear reason."""


@dataclass(frozen=True)
class Expect:
    outcome: Outcome = Outcome.WORKS
    damaged: int | None = None
    """For DAMAGED: the index of the damaged segment."""
    reason: EndReason = EndReason.INPUT_ENDED
    error: str = ""
    """For ENDS: words the final event's ``last_error`` must contain."""


EXPECT: dict[str, Expect] = {
    "truncated-segment": Expect(Outcome.DAMAGED, damaged=1),
    "random-segment": Expect(Outcome.DAMAGED, damaged=1),
    "audio-only": Expect(Outcome.ENDS, reason=EndReason.MEDIA_ERROR, error="no video"),
    # FFmpeg gives up on bytes that are not MPEG-TS only once they end: the input has ended by then
    "random-bytes": Expect(
        Outcome.ENDS, reason=EndReason.INPUT_ENDED, error="cannot read the input as MPEG-TS"
    ),
}

BURST = ("h264-aac", "resolution-switch", "single-packets", "truncated-segment")
TRICKLE = ("h264-aac", "bframes", "pts-wrap", "random-segment", "audio-only")
"""The cases that also run with burst or byte-trickle delivery (all of them run spread)."""

RUNS = [
    pytest.param(name, delivery, id=f"{name}-{delivery}")
    for delivery in Delivery
    for name in CASES
    if delivery is Delivery.SPREAD or name in (BURST if delivery is Delivery.BURST else TRICKLE)
]


@dataclass(frozen=True)
class Reference:
    frames: int
    audio_s: float


def _decoded(data: bytes) -> Reference:
    """The video frames FFmpeg decodes from ``data``, and the seconds of sound from the first of them on
    (sound before the first picture has nothing to go with)."""
    frames, first_video, sounds = 0, None, []
    with av.open(io.BytesIO(data), mode="r") as container:
        streams = [*container.streams.video[:1], *container.streams.audio[:1]]
        for packet in container.demux(streams):
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    frames += 1
                    if first_video is None and frame.time is not None:
                        first_video = frame.time
                elif isinstance(frame, av.AudioFrame):
                    sounds.append((frame.time or 0.0, frame.samples / frame.sample_rate))
    start = first_video or 0.0
    return Reference(frames, sum(length for at, length in sounds if at + length > start))


def reference(case: Case, skip: Collection[int] = ()) -> Reference:
    """What FFmpeg alone decodes from the case (without the segments ``skip``): each part on its own."""
    if case.parts and case.post is None:
        found = [reference(part) for part in case.parts]
        return Reference(sum(r.frames for r in found), sum(r.audio_s for r in found))
    made = segments(case)
    return _decoded(b"".join(s for index, s in enumerate(made) if index not in skip))


def _chunks(segment: bytes, delivery: Delivery, seconds: float) -> list[bytes]:
    if delivery is Delivery.BURST or not segment:
        return [segment] if segment else []
    if delivery is Delivery.TRICKLE:
        size = TRICKLE_CHUNK
    else:
        size = -(-len(segment) // max(1, round(seconds * SPREAD_CHUNKS_PER_S)))
    return [segment[at : at + size] for at in range(0, len(segment), size)]


async def deliver(
    publisher: TricklePublisher, made: Sequence[bytes], delivery: Delivery, duration: float
) -> None:
    """Publish the segments in real time, ``duration`` seconds for all of them."""
    loop = asyncio.get_running_loop()
    per_segment = duration / len(made)
    start = loop.time()
    for index, segment in enumerate(made):
        chunks = _chunks(segment, delivery, per_segment)
        async with publisher.segment() as out:
            for part, chunk in enumerate(chunks):
                due = start + (index + part / len(chunks)) * per_segment
                await asyncio.sleep(max(0.0, due - loop.time()))
                await out.write(chunk)


def _output_audio_s(data: bytes) -> float:
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            return 0.0
        return sum(f.samples / f.sample_rate for f in container.decode(audio=0))


def _assert_output(h: StreamHarness, statistics: dict[str, Any]) -> None:
    """Every output segment decodes on its own and starts with PAT/PMT and an IDR; timestamps rise."""
    assert h.output, "no output"
    for segment in h.output:
        assert first_ts_pid(segment.data) in PSI_PIDS, f"segment {segment.seq} does not start with PSI"
        assert first_video_is_keyframe(segment.data), f"segment {segment.seq} does not start with an IDR"
        frames, _ = decode(segment.data)
        assert frames, f"segment {segment.seq} has no decodable frame"
    frames, _ = decode(h.output_bytes())
    assert len(frames) == statistics["output"]["frames"]
    pts = [f.pts for f in frames]
    assert all(a < b for a, b in itertools.pairwise(pts)), "output timestamps do not rise"
    assert {(f.width, f.height) for f in frames} == {(512, 512)}


def _assert_no_avoidable_drops(statistics: dict[str, Any], delivery: Delivery) -> None:
    dropped = {reason: n for reason, n in statistics["dropped"].items() if n}
    assert not {reason: dropped[reason] for reason in NOT_LOAD if reason in dropped}
    if dropped and delivery is not Delivery.TRICKLE:
        spare = spare_cpu()
        assert spare < SPEED_NEEDS_SPARE_CPU, f"{dropped} dropped with {spare:.0%} of the CPUs free"


async def run_case(
    trickle: RunningTrickle,
    http: aiohttp.ClientSession,
    case: Case,
    delivery: Delivery,
    stream: str = "s1",
) -> tuple[StreamHarness, EndReason]:
    """The case through a passthrough session; the harness (with what it read) and the end reason."""
    made = segments(case)
    async with StreamHarness(trickle, http, stream) as h:
        session = Session(h.spec(), PassthroughProcessor(), http, SETTINGS)
        run = asyncio.create_task(session.run())
        await session.wait_started()
        feeding = asyncio.create_task(deliver(h.input, made, delivery, case.duration))
        done, _ = await asyncio.wait(
            {run, feeding}, timeout=case.duration + 20, return_when="FIRST_COMPLETED"
        )
        if feeding in done:
            feeding.result()
            await h.input.close()  # the end of the stream
        reason = await asyncio.wait_for(run, 20)
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        await h.readers_done()
    return h, reason


@pytest.mark.parametrize(("name", "delivery"), RUNS)
async def test_case_through_a_session(
    trickle: RunningTrickle, http: aiohttp.ClientSession, name: str, delivery: Delivery
) -> None:
    case = CASES[name]
    expect = EXPECT.get(name, Expect())
    h, reason = await run_case(trickle, http, case, delivery)
    assert not h.reader_errors
    final = h.events[-1]["event"]
    assert final["type"] == "stream_stopped"
    assert [e["event"]["type"] for e in h.events].count("stream_stopped") == 1
    assert final["reason"] == str(reason) == str(expect.reason), final.get("statistics", {}).get("last_error")
    statistics = final["statistics"]

    if expect.outcome is Outcome.ENDS:
        assert expect.error in (statistics["last_error"] or ""), statistics["last_error"]
        assert statistics["output"]["frames"] == 0
        return

    _assert_output(h, statistics)
    if expect.outcome is Outcome.DAMAGED:
        reached = assert_every_frame_accounted(statistics)
        assert expect.damaged is not None
        assert reference(case, skip=(expect.damaged,)).frames <= reached <= _source_frames(case)
        return
    expected = kept = reference(case)
    skipped = _skipped_input(h, len(segments(case)))
    assert statistics["trickle"]["skipped_segments"] == len(skipped)
    if skipped:
        # The session's reader fell behind the server's retention, which only segments of a few
        # milliseconds allow (on a busy machine): only the frames and sound of those it was told it
        # skipped may be missing.
        assert case.duration / len(segments(case)) * RETENTION < 0.1, f"segments {sorted(skipped)} skipped"
        kept = reference(case, skip=skipped)
        assert kept.frames <= assert_every_frame_accounted(statistics) <= expected.frames
    else:
        assert_every_frame_accounted(statistics, expected.frames)
    _assert_no_avoidable_drops(statistics, delivery)
    audio_s = _output_audio_s(h.output_bytes())
    assert kept.audio_s - AUDIO_TOLERANCE_S <= audio_s <= expected.audio_s + AUDIO_TOLERANCE_S, (
        f"{expected.audio_s:.3f} s in, {audio_s:.3f} s out"
    )


def _skipped_input(h: StreamHarness, published: int) -> set[int]:
    """The input segments no GET of the session's found at the server."""
    channel = h.channels.name("input")
    found = {
        # the first GET asks for the current seq (-2): 0, as the session starts before the input
        max(0, int(r.seq))
        for r in h.server.requests
        if (r.method, r.channel, r.status) == ("GET", channel, 200) and r.seq is not None and r.seq != "next"
    }
    return set(range(published)) - found


BAD_NEIGHBOURS = ("audio-only", "random-bytes", "truncated-segment", "random-segment")


async def test_bad_input_leaves_other_sessions_alone(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    """Sessions fed what ends them or damages their input, side by side with one fed good media: that
    one keeps every frame and all its sound, and every session ends with one final event."""
    names = ("h264-aac", *BAD_NEIGHBOURS)
    runs = await asyncio.gather(
        *(
            run_case(trickle, http, CASES[name], Delivery.SPREAD, stream=f"s{i}")
            for i, name in enumerate(names)
        )
    )
    for name, (h, reason) in zip(names, runs, strict=True):
        assert reason == EXPECT.get(name, Expect()).reason, name
        assert [e["event"]["type"] for e in h.events].count("stream_stopped") == 1, name
    good, _ = runs[0]
    statistics = good.events[-1]["event"]["statistics"]
    _assert_output(good, statistics)
    expected = reference(CASES["h264-aac"])
    assert_every_frame_accounted(statistics, expected.frames)
    assert abs(_output_audio_s(good.output_bytes()) - expected.audio_s) <= AUDIO_TOLERANCE_S


def _source_frames(case: Case) -> int:
    return reference(dataclasses.replace(case, post=None)).frames
