"""One live session end to end over real loopback HTTP, with real PyAV media."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import threading

import aiohttp
import av
import numpy as np
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.synthetic import pattern
from byoc.dev.trickle_server import RunningTrickle
from byoc.media.encoder import EncoderSettings
from byoc.processor import load_processor
from byoc.session import Session
from byoc.spec import EndReason, SessionSettings
from byoc.trickle import StreamChannels
from tests.conftest import TEST_CLIENT_SETTINGS, assert_every_frame_accounted
from tests.processors import Failing, FailingSometimes, Hanging, Recording, SendingBadEvents
from tests.support import (
    PSI_PIDS,
    StreamHarness,
    decode,
    first_ts_pid,
    first_video_is_keyframe,
    garbage_video_segment,
    make_segments,
)

SETTINGS = SessionSettings(trickle=TEST_CLIENT_SETTINGS, status_interval_s=0.5, drain_timeout_s=3.0)


@pytest.fixture(scope="module")
def three_segments() -> list[list[bytes]]:
    return make_segments(3)


def _threads_of(stream_id: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(f"-{stream_id}")]


def _session_tasks(stream_id: str) -> list[str]:
    """Tasks the session created (its own, and its trickle clients') that are still alive."""
    mine = (f"{stream_id}:", "trickle-preconnect", "trickle-post")
    channels = tuple(f"/{name} " for name in StreamChannels(stream_id).names().values())
    return [
        t.get_name()
        for t in asyncio.all_tasks()
        if not t.done()
        and t.get_name().startswith(mine)
        and (":" in t.get_name() or any(c in t.get_name() for c in channels))
    ]


async def _run(session: Session) -> asyncio.Task[EndReason]:
    task = asyncio.create_task(session.run())
    await session.wait_started()
    return task


async def test_passthrough_keeps_every_frame_in_order(
    trickle: RunningTrickle, http: aiohttp.ClientSession, three_segments: list[list[bytes]]
) -> None:
    async with StreamHarness(trickle, http) as h:
        session = Session(h.spec(), PassthroughProcessor(), http, SETTINGS)
        run = await _run(session)
        await h.publish(three_segments)
        await h.input.close()  # end of stream: the session drains and ends by itself
        assert await asyncio.wait_for(run, 10) == EndReason.INPUT_ENDED
        await h.readers_done()

    frames, audio = decode(h.output_bytes())
    assert [f.index for f in frames] == list(range(90))  # none lost, none repeated, in order
    assert all((f.width, f.height) == (512, 512) for f in frames)
    assert [f.pts for f in frames] == [900_000 + 3000 * i for i in range(90)]  # timestamps pass through
    assert audio == []
    assert len(h.output) == 3
    for segment in h.output:
        assert first_ts_pid(segment.data) in PSI_PIDS
        assert first_video_is_keyframe(segment.data)
    stats = session.statistics()
    assert (stats.frames_in, stats.frames_out, stats.frames_dropped) == (90, 90, 0)
    assert stats.latency_ms["p50"] is not None


async def test_output_has_the_requested_resolution(
    trickle: RunningTrickle, http: aiohttp.ClientSession, three_segments: list[list[bytes]]
) -> None:
    async with StreamHarness(trickle, http) as h:
        session = Session(
            h.spec(width=256, height=256, params={"width": 256, "height": 256}),
            PassthroughProcessor(),
            http,
            SETTINGS,
        )
        run = await _run(session)
        await h.publish(three_segments[:1])
        await h.input.close()
        await asyncio.wait_for(run, 10)
        await h.readers_done()
    frames, _ = decode(h.output_bytes())
    assert len(frames) == 30
    assert {(f.width, f.height) for f in frames} == {(256, 256)}
    assert [f.index for f in frames] == list(range(30))


async def test_invert_inverts_the_pixels(
    trickle: RunningTrickle, http: aiohttp.ClientSession, three_segments: list[list[bytes]]
) -> None:
    async with StreamHarness(trickle, http) as h:
        run = await _run(Session(h.spec(), load_processor("invert"), http, SETTINGS))
        await h.publish(three_segments[:1])
        await h.input.close()
        await asyncio.wait_for(run, 10)
        await h.readers_done()
    frames, _ = decode(h.output_bytes(), inverted=True)
    assert [f.index for f in frames] == list(range(30))
    for frame in frames[::10]:
        assert frame.index is not None
        original = pattern(frame.index, 512, 512).astype(np.int16)
        output = frame.rgb.astype(np.int16)
        assert np.abs(output - (255 - original)).mean() < 12  # close to the inverted picture
        assert np.abs(output - original).mean() > 60  # far from the original one


async def test_slow_processor_drops_frames_but_stays_live(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    segments = make_segments(6, frames=15)  # 0.5 s segments
    processor = load_processor("load", {"ms": "60"})  # twice the 33 ms frame interval
    processor.setup()
    settings = SessionSettings(trickle=TEST_CLIENT_SETTINGS, encoder=EncoderSettings(segment_s=0.5))
    async with StreamHarness(trickle, http) as h:
        run = await _run(Session(h.spec(), processor, http, settings))
        input_ends = await h.publish(segments)
        await h.input.close()
        await asyncio.wait_for(run, 10)
        await h.readers_done()
    # A pipeline that queued every frame would fall 90 x 27 ms = 2.4 s further behind by the last
    # segment; one that drops the frames it cannot take stays within a frame or two of live.
    delays = [out.ended_at - end for out, end in zip(h.output, input_ends, strict=False)]
    assert len(delays) >= 5
    assert delays[-1] - delays[1] < 1.0
    frames, _ = decode(h.output_bytes())
    indices = [f.index for f in frames if f.index is not None]
    assert indices == sorted(indices)
    stats = h.events[-1]["event"]["statistics"]
    assert stats["input"]["frames"] == 90
    assert stats["output"]["frames"] == len(frames) < 90
    assert stats["output"]["frames"] + sum(stats["dropped"].values()) == 90  # every frame accounted for
    assert stats["dropped"]["late"] > 0  # the newest due frame won over the ones it could not take


async def test_frames_a_processor_fails_on_are_counted(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http) as h:
        session = Session(h.spec(), FailingSometimes(), http, SETTINGS)
        run = await _run(session)
        await h.publish(make_segments(2, frames=15))
        await h.input.close()
        assert await asyncio.wait_for(run, 10) == EndReason.INPUT_ENDED
        await h.readers_done()
    statistics = h.events[-1]["event"]["statistics"]
    assert statistics["errors"]["process"] == 10  # frames 2, 5, ..., 29
    assert statistics["dropped"]["processor"] == 10
    assert_every_frame_accounted(statistics, 30)


async def test_an_event_that_is_not_json_fails_its_frame_not_the_session(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http) as h:
        session = Session(h.spec(), SendingBadEvents(), http, SETTINGS)
        run = await _run(session)
        await h.publish(make_segments(2, frames=15))
        await h.input.close()
        assert await asyncio.wait_for(run, 10) == EndReason.INPUT_ENDED
        published = [h.channels.name("events"), h.channels.name("output")]
        assert [channel for channel in published if h.server.has_channel(channel)] == []
        await h.readers_done()
    custom = [e["event"]["index"] for e in h.events if e["event"].get("type") == "custom"]
    assert custom == [i for i in range(30) if i % 3 != 2]
    statistics = h.events[-1]["event"]["statistics"]
    assert (statistics["errors"]["process"], statistics["dropped"]["processor"]) == (10, 10)
    assert_every_frame_accounted(statistics, 30)


async def test_corrupt_segment_costs_frames_not_the_session(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    good = make_segments(4, frames=15)
    truncated = good[2][: len(good[2]) // 2]  # half a segment: the rest never arrives
    async with StreamHarness(trickle, http) as h:
        session = Session(h.spec(), PassthroughProcessor(), http, SETTINGS)
        run = await _run(session)
        await h.publish([*good[:2], garbage_video_segment(), truncated, good[3]])
        await h.input.close()
        assert await asyncio.wait_for(run, 10) == EndReason.INPUT_ENDED
        await h.readers_done()
    frames, _ = decode(h.output_bytes())
    indices = [f.index for f in frames if f.index is not None]
    assert indices[:30] == list(range(30))  # everything before the damage
    assert indices[-15:] == list(range(45, 60))  # the segment after it came out whole
    assert session.statistics().errors.get("decode", 0) > 0


@pytest.mark.parametrize("audio", ["aac", "opus"])
async def test_input_audio_becomes_opus(
    trickle: RunningTrickle, http: aiohttp.ClientSession, audio: str
) -> None:
    segments = make_segments(2, audio=audio)
    async with StreamHarness(trickle, http) as h:
        # a latency budget no frame can exceed: every frame must come out however busy the machine
        settings = dataclasses.replace(SETTINGS, latency_budget_s=60.0)
        run = await _run(Session(h.spec(), PassthroughProcessor(), http, settings))
        await h.publish(segments)
        await h.input.close()
        await asyncio.wait_for(run, 10)
        await h.readers_done()
    frames, audio_codecs = decode(h.output_bytes())
    assert audio_codecs == ["opus"]
    assert [f.index for f in frames] == list(range(60))
    with av.open(io.BytesIO(h.output_bytes()), mode="r") as container:
        samples = sum(int(frame.samples) for frame in container.decode(audio=0))
    assert samples > 1.5 * 48_000  # most of the two seconds of sound
    for segment in h.output:
        assert first_video_is_keyframe(segment.data)


async def test_hooks_params_data_and_events(trickle: RunningTrickle, http: aiohttp.ClientSession) -> None:
    processor = Recording()
    segments = make_segments(2, frames=15)
    async with StreamHarness(trickle, http, data=True) as h:
        session = Session(h.spec(params={"drop_every": 0}), processor, http, SETTINGS)
        run = await _run(session)
        await h.publish(segments[:1])
        session.update_params({"drop_every": 5})  # as /stream/params would
        await h.control.write_segment(b'{"keep":"alive"}')
        await h.publish(segments[1:])
        await h.input.close()
        await asyncio.wait_for(run, 10)
        await h.readers_done()
    assert [hook for hook, _ in processor.calls] == ["on_start", "on_params", "on_stop"]
    assert h.data_lines == [{"first_frame": 0, "params": {"drop_every": 0}}]
    types = h.event_types()
    assert types[0] == "status"
    for expected in (
        "receive_first_ingest_segment",
        "send_first_processed_segment",
        "params_updated",
        "custom",
    ):
        assert expected in types
    assert types[-1] == "stream_stopped"
    frames, _ = decode(h.output_bytes())
    # Frames after the update at multiples of 5 were dropped by the processor, none before.
    indices = [f.index for f in frames]
    assert set(range(15)) <= set(indices)
    assert not {20, 25} & set(indices)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("stop", EndReason.STOPPED),
        ("input_eos", EndReason.INPUT_ENDED),
        ("input_404", EndReason.INPUT_GONE),
        ("control_eos", EndReason.CONTROL_ENDED),
        ("control_404", EndReason.CONTROL_GONE),
        ("output_404", EndReason.OUTPUT_GONE),
        ("processor_error", EndReason.PROCESSOR_ERROR),
        ("deadline", EndReason.DEADLINE),
    ],
)
async def test_every_end_condition_cleans_up(
    trickle: RunningTrickle,
    http: aiohttp.ClientSession,
    three_segments: list[list[bytes]],
    case: str,
    expected: EndReason,
) -> None:
    async with StreamHarness(trickle, http) as h:
        overrides = {
            "input_404": {"subscribe_url": h.url("input") + "-missing"},
            "control_404": {"control_url": h.url("control") + "-missing"},
            "output_404": {"publish_url": h.url("output") + "-missing"},
        }.get(case, {})
        processor = Failing() if case == "processor_error" else PassthroughProcessor()
        settings = SessionSettings(
            trickle=TEST_CLIENT_SETTINGS,
            status_interval_s=0.5,
            drain_timeout_s=3.0,
            max_consecutive_errors=2,
            max_duration_s=0.8 if case == "deadline" else None,
        )
        session = Session(h.spec(**overrides), processor, http, settings)
        run = asyncio.create_task(session.run())
        feeding = asyncio.create_task(h.publish(three_segments))
        output, control, events = (h.channels.name(role) for role in ("output", "control", "events"))
        if case == "stop":
            await h.server.wait_for_request(lambda r: r.method == "POST" and r.channel == output)
            session.stop()
        elif case == "input_eos":
            await feeding
            await h.input.close()
        elif case == "control_eos":
            await h.server.wait_for_request(lambda r: r.method == "GET" and r.channel == control)
            h.server.close_channel(control)
        reason = await asyncio.wait_for(run, 10)
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        published = [events] if case == "output_404" else [events, output]
        deleted = [channel for channel in published if not h.server.has_channel(channel)]
        h.server.close_channel(output)  # (when the session published elsewhere)
        await h.readers_done()
    assert reason == expected
    assert h.events[-1]["event"]["type"] == "stream_stopped"
    assert h.events[-1]["event"]["reason"] == str(expected)
    assert deleted == published
    assert _session_tasks("s1") == []
    for thread in _threads_of("s1"):
        pytest.fail(f"thread {thread} is still running")


async def test_hung_processor_cannot_block_the_end(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    processor = Hanging()
    settings = SessionSettings(trickle=TEST_CLIENT_SETTINGS, drain_timeout_s=0.5)
    try:
        async with StreamHarness(trickle, http) as h:
            session = Session(h.spec(), processor, http, settings)
            run = asyncio.create_task(session.run())
            await h.publish(make_segments(1, frames=10))
            session.stop()
            assert await asyncio.wait_for(run, 5) == EndReason.STOPPED
            await h.readers_done()
        assert "drain timed out" in (session.statistics().last_error or "")
        assert h.events[-1]["event"]["type"] == "stream_stopped"
        assert not h.server.has_channel(h.channels.name("output"))
    finally:
        processor.release.set()


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs two cores")
async def test_sessions_share_one_processor_but_not_state(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    processor = Recording()
    segments = make_segments(1, frames=15)
    async with StreamHarness(trickle, http, "a") as a, StreamHarness(trickle, http, "b") as b:
        runs = [await _run(Session(h.spec(), processor, http, SETTINGS)) for h in (a, b)]
        await asyncio.gather(a.publish(segments), b.publish(segments))
        await asyncio.gather(a.input.close(), b.input.close())
        await asyncio.wait_for(asyncio.gather(*runs), 10)
        await asyncio.gather(a.readers_done(), b.readers_done())
    for h in (a, b):
        frames, _ = decode(h.output_bytes())
        assert [f.index for f in frames] == list(range(15))
    assert sorted(processor.calls) == sorted(
        [("on_start", "a"), ("on_stop", "a"), ("on_start", "b"), ("on_stop", "b")]
    )


async def test_max_fps_caps_the_output_rate(trickle: RunningTrickle, http: aiohttp.ClientSession) -> None:
    async with StreamHarness(trickle, http) as h:
        session = Session(
            h.spec(max_fps=15.0, params={"max_fps": 15}), PassthroughProcessor(), http, SETTINGS
        )
        run = await _run(session)
        await h.publish(make_segments(1))
        await h.input.close()
        await asyncio.wait_for(run, 10)
        await h.readers_done()
    frames, _ = decode(h.output_bytes())
    assert [f.index for f in frames] == list(range(0, 30, 2))  # every other frame of 30 fps
    assert session.statistics().dropped["rate_cap"] == 15


async def test_trickle_recoveries_are_counted_not_errors(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http) as h:
        faults = h.server.faults
        faults.fail_next(2, status=503, method="GET", channel="s1")  # input GETs refused, then retried
        faults.cut_get("s1", after_bytes=5000)  # one input segment body breaks off and is read again
        faults.cut_post("s1-out", after_bytes=1000)  # one output segment breaks off; the next goes on
        session = Session(h.spec(), PassthroughProcessor(), http, SETTINGS)
        run = await _run(session)
        await h.publish(make_segments(3, frames=15))
        await h.input.close()
        assert await asyncio.wait_for(run, 10) == EndReason.INPUT_ENDED
        await h.readers_done()
    assert faults.pending() == 0
    counts = {"retries": 2, "restarts": 1, "broken_segments": 1, "skipped_segments": 0}
    stats = session.statistics()
    assert stats.as_dict()["trickle"] == counts
    assert "trickle" not in stats.errors  # recovered from: not an error
    # ... but the output segment that broke off is lost to the gateway, and counted as such
    assert (stats.output_lost.segments, stats.output_lost.frames) == ({"broken": 1}, {"broken": 15})
    assert stats.errors == {"output": 1}
    assert stats.frames_in == 45  # the restarted input segment lost nothing
    assert h.events[-1]["event"]["statistics"]["trickle"] == counts
    status = [e["event"] for e in h.events if e["event"]["type"] == "status"]
    assert status
    assert set(status[0]["trickle"]) == set(counts)
