"""Audio as gateways send it, through a whole session: AAC, Opus, MP3 and MP2 in, Opus out.

The inputs are ffmpeg-made (tests/corpus.py), with the tone gated into a 30 ms beep twice a second so
that the audio carries its own time marks: a beep's onset in the output must sit where it sat in the
input (the video's timestamps pass through unchanged), which is the audio/video offset kept. Output
audio is measured from the output's own packets, per output segment, against the decoded audio of the
input segment whose frames that output segment carries (an input segment longer than ``segment_s`` —
ffmpeg made one such for MP3 — comes out as several output segments, measured together).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
from dataclasses import dataclass, field
from fractions import Fraction

import aiohttp
import av
import numpy as np
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.corpus import later
from byoc.dev.trickle_server import RunningTrickle
from byoc.processor import SessionContext
from byoc.session import Session
from byoc.spec import EndReason, SessionSettings
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.corpus import CASES, Case, segments
from tests.support import StreamHarness, first_video_is_keyframe

# A latency budget far beyond the stream's length: no frame is ever late, so every video frame comes out
# however busy the machine is (the pipeline holds the input back instead). What is judged here is audio.
SETTINGS = SessionSettings(
    trickle=TEST_CLIENT_SETTINGS, status_interval_s=0.5, drain_timeout_s=3.0, latency_budget_s=60.0
)
OPUS_FRAME = 1800
"""One 20 ms Opus frame, in 90 kHz ticks: the tolerance of every audio figure below."""
TOLERANCE = OPUS_FRAME + 1  # one tick for rounding 48 kHz sample counts to 90 kHz
BEEPS = "aeval='val(ch)*lt(mod(t\\,0.5)\\,0.03)':c=same,aformat=channel_layouts=mono"
"""The tone only in the first 30 ms of every half second: the onsets are the audio's time marks."""
CODECS = ["h264-aac", "aac-44k-mono", "opus", "mp3", "mp2"]


def _beeping(name: str) -> Case:
    case = CASES[name]
    return dataclasses.replace(case, name=f"{name}-beeps", extra=(*case.extra, "-af", BEEPS))


def _chunks(segment: bytes, parts: int) -> list[bytes]:
    """A segment cut on TS packet boundaries into ``parts`` chunks, published one per frame interval."""
    packets = len(segment) // 188
    cuts = [188 * (packets * i // parts) for i in range(parts + 1)]
    return [segment[a:b] for a, b in itertools.pairwise(cuts) if b > a]


@dataclass
class Media:
    """What one TS byte string holds: video PTS, audio packets, and the audio decoded on its own."""

    video: list[int] = field(default_factory=list)
    audio_packets: list[tuple[int, int, int]] = field(default_factory=list)
    """(pts, dts, duration) in 90 kHz ticks."""
    audio_frames: list[tuple[int, int]] = field(default_factory=list)
    """(pts in 90 kHz ticks, duration in 90 kHz ticks) of every decoded audio frame."""
    codecs: list[str] = field(default_factory=list)


def _read(data: bytes) -> Media:
    media = Media()
    with av.open(io.BytesIO(data), mode="r") as container:
        media.codecs = [s.codec_context.name for s in container.streams.audio]
        for packet in container.demux():
            if not packet.size or packet.pts is None:
                continue
            if packet.stream.type == "video":
                media.video.append(int(packet.pts))
            elif packet.stream.type == "audio":
                dts = packet.dts if packet.dts is not None else packet.pts
                media.audio_packets.append((int(packet.pts), int(dts), int(packet.duration or 0)))
    if media.codecs:
        with av.open(io.BytesIO(data), mode="r") as container:
            for frame in container.decode(audio=0):
                assert frame.pts is not None
                assert frame.time_base == Fraction(1, 90000)
                media.audio_frames.append((int(frame.pts), round(frame.samples * 90000 / frame.sample_rate)))
    return media


_FULL_SCALE = {"s16": 32768.0, "s32": 2147483648.0}


def _onsets(data: bytes) -> list[float]:
    """When each beep starts, in seconds of PTS: the first loud sample after at least 0.3 s of quiet."""
    onsets: list[float] = []
    last_loud: float | None = None
    with av.open(io.BytesIO(data), mode="r") as container:
        for frame in container.decode(audio=0):
            assert frame.pts is not None
            assert frame.time_base is not None
            samples = frame.to_ndarray().astype(np.float64)
            if not frame.format.is_planar:
                samples = samples.reshape(frame.samples, -1).T
            level = np.abs(samples).max(axis=0) / _FULL_SCALE.get(frame.format.name.rstrip("p"), 1.0)
            start = float(frame.pts * frame.time_base)
            for i in np.flatnonzero(level > 0.05):  # the tone's amplitude is 1/8
                t = start + i / frame.sample_rate
                if last_loud is None or t - last_loud > 0.3:
                    onsets.append(t)
                last_loud = t
    return onsets


def _audio_ticks(media: Media, after: int | None = None) -> int:
    """The decoded audio of ``media``, in 90 kHz ticks; without the frames that end by ``after``."""
    return sum(d for pts, d in media.audio_frames if after is None or pts + d > after)


async def _run_session(
    trickle: RunningTrickle, http: aiohttp.ClientSession, inputs: list[bytes], frames_per_segment: int
) -> tuple[StreamHarness, Session]:
    async with StreamHarness(trickle, http) as h:
        session = Session(h.spec(), PassthroughProcessor(), http, SETTINGS)
        run = asyncio.create_task(session.run())
        await session.wait_started()
        await h.publish([_chunks(segment, frames_per_segment) for segment in inputs])
        await h.input.close()
        assert await asyncio.wait_for(run, 15) == EndReason.INPUT_ENDED
        await h.readers_done()
    assert h.reader_errors == []
    return h, session


@pytest.mark.parametrize("name", CODECS)
async def test_gateway_audio_comes_out_whole_in_sync_and_in_order(
    trickle: RunningTrickle, http: aiohttp.ClientSession, name: str
) -> None:
    case = _beeping(name)
    inputs = segments(case)
    h, session = await _run_session(trickle, http, inputs, case.rate)

    ins = [_read(segment) for segment in inputs]
    outs = [_read(segment.data) for segment in h.output]
    first_video = ins[0].video[0]

    # Every video frame comes out, with its timestamp, in segments that each start with an IDR.
    assert [pts for media in outs for pts in media.video] == [pts for media in ins for pts in media.video]
    assert all(first_video_is_keyframe(segment.data) for segment in h.output)
    assert all(media.codecs == ["opus"] for media in outs)

    # Audio DTS strictly increase, within every output segment and across them.
    dts = [d for media in outs for _, d, _ in media.audio_packets]
    assert dts, "no audio came out"
    assert all(b > a for a, b in itertools.pairwise(dts)), "audio DTS do not strictly increase"

    # Per output segment, as much audio as the input segment(s) its frames came from; audio older than
    # the first video frame has nothing to go with and is not sent.
    owner = {pts: i for i, media in enumerate(ins) for pts in media.video}
    groups: dict[int, list[int]] = {}
    for k, media in enumerate(outs):
        groups.setdefault(owner[media.video[0]], []).append(k)
    assert sorted(groups) == list(range(len(ins)))
    report = []
    for i, members in groups.items():
        expected = _audio_ticks(ins[i], first_video if i == 0 else None)
        got = sum(d for k in members for _, _, d in outs[k].audio_packets)
        report.append((i, members, expected / 90000, got / 90000))
    for i, members, expected_s, got_s in report:
        assert abs(got_s - expected_s) * 90000 <= TOLERANCE, (
            f"input segment {i} (output {members}): {expected_s:.4f} s of audio in, {got_s:.4f} s out; "
            f"(input segment, output segments, seconds in, seconds out): {report}"
        )

    # The audio/video offset is the input's: every beep starts where it started in the input.
    onsets_in = [t for t in _onsets(b"".join(inputs)) if t * 90000 >= first_video]
    onsets_out = _onsets(h.output_bytes())
    assert len(onsets_in) >= 2 * len(inputs) - 1
    assert len(onsets_out) == len(onsets_in), f"beeps in at {onsets_in}, out at {onsets_out}"
    for t_in, t_out in zip(onsets_in, onsets_out, strict=True):
        assert abs(t_out - t_in) * 90000 <= TOLERANCE, f"a beep at {t_in:.4f} s in came out at {t_out:.4f} s"

    stats = session.statistics()
    assert "encode" not in stats.errors
    assert "audio_encode" not in stats.errors
    assert stats.frames_out == sum(len(media.video) for media in ins)
    audio = stats.as_dict()["audio"]
    assert audio["packets_out"] == len(dts)


LEFT_BEEPS = "aformat=channel_layouts=stereo,aeval='val(ch)*lt(mod(t\\,0.5)\\,0.03)*eq(ch\\,0)':c=same"
"""The beeps of :data:`BEEPS` in the left channel only; the right one silent."""


def _channel_peaks(data: bytes) -> list[float]:
    """The loudest sample of each audio channel, as a fraction of full scale."""
    peaks: np.ndarray | None = None
    with av.open(io.BytesIO(data), mode="r") as container:
        for frame in container.decode(audio=0):
            samples = np.abs(frame.to_ndarray().astype(np.float64))
            if not frame.format.is_planar:
                samples = samples.reshape(frame.samples, -1).T
            level = samples.max(axis=1) / _FULL_SCALE.get(frame.format.name.rstrip("p"), 1.0)
            peaks = level if peaks is None else np.maximum(peaks, level)
    assert peaks is not None
    return [float(peak) for peak in peaks]


async def test_stereo_audio_keeps_each_channel_apart(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    """48 kHz stereo AAC in (what the Opus encoder takes once its two planes are interleaved): a beep
    only in the left channel comes out only in the left channel, where it went in."""
    case = dataclasses.replace(
        CASES["h264-aac"], name="h264-aac-left-beeps", extra=(*CASES["h264-aac"].extra, "-af", LEFT_BEEPS)
    )
    inputs = segments(case)
    assert _channel_peaks(b"".join(inputs))[1] == 0.0
    h, _ = await _run_session(trickle, http, inputs, case.rate)
    left, right = _channel_peaks(h.output_bytes())
    assert left > 0.1  # the tone's amplitude is 1/8
    assert right < 0.01
    first_video = _read(inputs[0]).video[0]
    onsets_in = [t for t in _onsets(b"".join(inputs)) if t * 90000 >= first_video]
    onsets_out = _onsets(h.output_bytes())
    assert len(onsets_out) == len(onsets_in) >= 2 * len(inputs) - 1
    for t_in, t_out in zip(onsets_in, onsets_out, strict=True):
        assert abs(t_out - t_in) * 90000 <= TOLERANCE, f"a beep at {t_in:.4f} s in came out at {t_out:.4f} s"


@pytest.mark.parametrize("first", ["aac-44k-mono", "h264-aac"])
async def test_audio_that_changes_format_mid_stream_comes_out_whole(
    trickle: RunningTrickle, http: aiohttp.ClientSession, first: str
) -> None:
    """44.1 kHz mono AAC (resampled) then 48 kHz stereo AAC (interleaved only), and the other way round:
    what the old format left in the resampler goes out before the new format's first samples."""
    second = "h264-aac" if first == "aac-44k-mono" else "aac-44k-mono"
    parts = (
        dataclasses.replace(CASES[first], name=f"{first}-2s", seconds=2.0),
        later(dataclasses.replace(CASES[second], name=f"{second}-2s", seconds=2.0), 2.0),
    )
    inputs = segments(Case(f"{first}-then-{second}", parts=parts))
    h, session = await _run_session(trickle, http, inputs, CASES[first].rate)
    ins = [_read(segment) for segment in inputs]
    outs = [_read(segment.data) for segment in h.output]
    expected = sum(_audio_ticks(media, ins[0].video[0] if i == 0 else None) for i, media in enumerate(ins))
    got = sum(d for media in outs for _, _, d in media.audio_packets)
    assert abs(got - expected) <= len(inputs) * TOLERANCE, (
        f"{expected / 90000:.3f} s in, {got / 90000:.3f} s out"
    )
    assert "audio_encode" not in session.statistics().errors


def _damage_audio(segment: bytes, seed: int = 1) -> bytes:
    """The segment with every ADTS frame's payload on the audio PID scrambled (headers, PES and TS
    packets intact): the demuxer still finds every AAC frame, the decoder can decode none of them."""
    with av.open(io.BytesIO(segment), mode="r") as container:
        pid = container.streams.audio[0].id
    data = bytearray(segment)
    spans: list[tuple[int, int]] = []  # where the audio's elementary stream lies in the TS packets
    for offset in range(0, len(data) - 187, 188):
        packet = data[offset : offset + 188]
        if ((packet[1] & 0x1F) << 8 | packet[2]) != pid or not packet[3] & 0x10:
            continue
        start = 4 + (1 + packet[4] if packet[3] & 0x20 else 0)
        if packet[1] & 0x40:  # a PES packet starts here: skip its header
            start += 9 + packet[start + 8]
        spans.append((offset + start, 188 - start))
    stream = bytearray(b"".join(data[o : o + n] for o, n in spans))
    rng = np.random.default_rng(seed)
    i = 0
    while i + 7 <= len(stream):
        if stream[i] == 0xFF and stream[i + 1] & 0xF0 == 0xF0:  # an ADTS header
            length = max(7, (stream[i + 3] & 3) << 11 | stream[i + 4] << 3 | stream[i + 5] >> 5)
            stream[i + 7 : i + length] = rng.integers(
                0, 256, len(stream[i + 7 : i + length]), np.uint8
            ).tobytes()
            i += length
        else:
            i += 1
    position = 0
    for offset, size in spans:
        data[offset : offset + size] = stream[position : position + size]
        position += size
    return bytes(data)


def _error_events(h: StreamHarness) -> list[dict[str, object]]:
    return [e["event"] for e in h.events if e["event"].get("type") == "error"]


def _audio_seconds(media: Media) -> float:
    return sum(d for _, _, d in media.audio_packets) / 90000


async def test_audio_that_cannot_be_decoded_is_dropped_as_audio(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    case = CASES["h264-aac"]
    good = segments(case)
    inputs = [good[0], _damage_audio(good[1]), good[2]]
    h, session = await _run_session(trickle, http, inputs, case.rate)

    ins = [_read(segment) for segment in good]
    outs = [_read(segment.data) for segment in h.output]
    assert [pts for media in outs for pts in media.video] == [pts for media in ins for pts in media.video]
    stats = session.statistics()
    failed = stats.errors.get("audio_decode", 0)
    assert failed >= len(ins[1].audio_packets) - 1  # the damaged segment's audio, not the video
    assert "decode" not in stats.errors
    assert "encode" not in stats.errors
    events = _error_events(h)
    assert [e["kind"] for e in events] == ["audio_decode"]  # one event, however many packets failed
    assert h.events[-1]["event"]["statistics"]["errors"]["audio_decode"] == failed
    # The audio went on after the damage: the last segment's came out whole.
    assert len(outs) == 3
    assert _audio_seconds(outs[1]) < 0.1
    assert abs(_audio_seconds(outs[2]) - _audio_ticks(ins[2]) / 90000) * 90000 <= TOLERANCE


class _BreaksAudio(PassthroughProcessor):
    """Fault injection: the audio frames of a time window come back as frames nothing can encode
    (no sample rate); the video passes through."""

    def __init__(self, start: int, end: int) -> None:
        self.window = (start, end)
        self.broken = 0

    def process_audio(self, frame: av.AudioFrame, session: SessionContext) -> av.AudioFrame:
        if frame.pts is None or not self.window[0] <= frame.pts < self.window[1]:
            return frame
        self.broken += 1
        broken = av.AudioFrame(format="s16", layout="stereo", samples=frame.samples)
        broken.pts, broken.time_base = frame.pts, frame.time_base
        return broken


async def test_audio_that_cannot_be_encoded_is_dropped_as_audio(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    case = CASES["h264-aac"]
    inputs = segments(case)
    ins = [_read(segment) for segment in inputs]
    processor = _BreaksAudio(ins[1].video[0], ins[2].video[0])  # the second second's audio
    async with StreamHarness(trickle, http) as h:
        session = Session(h.spec(), processor, http, SETTINGS)
        run = asyncio.create_task(session.run())
        await session.wait_started()
        await h.publish([_chunks(segment, case.rate) for segment in inputs])
        await h.input.close()
        assert await asyncio.wait_for(run, 15) == EndReason.INPUT_ENDED
        await h.readers_done()

    outs = [_read(segment.data) for segment in h.output]
    assert [pts for media in outs for pts in media.video] == [pts for media in ins for pts in media.video]
    assert processor.broken > 30  # more than the video's consecutive-failure limit
    stats = session.statistics()
    assert stats.errors.get("audio_encode") == processor.broken  # each one counted, as audio
    assert "encode" not in stats.errors
    assert [e["kind"] for e in _error_events(h)] == ["audio_encode"]
    assert stats.audio.frames_dropped >= processor.broken
    # The audio came back after the broken frames, in order.
    assert _audio_seconds(outs[2]) > 0.9
    dts = [d for media in outs for _, d, _ in media.audio_packets]
    assert all(b > a for a, b in itertools.pairwise(dts))
