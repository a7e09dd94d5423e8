"""Media helpers: TS flush packets, the frame index code, fitting frames, timestamps."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from byoc.dev.corpus import HEVC, Case, later, segments
from byoc.dev.synthetic import SyntheticStream, pattern, read_frame_index
from byoc.media.decoder import FrameFitter, _Timestamps
from byoc.media.encoder import EncoderSettings
from byoc.media.items import rescale
from byoc.media.ts import (
    FLUSH_ACCESS_UNIT,
    PACKET_SIZE,
    StreamTypeWatch,
    first_video_pts,
    video_flush_packets,
)


def test_flush_packets_are_two_ts_packets_with_an_access_unit_delimiter() -> None:
    data = video_flush_packets(0x100)
    assert len(data) == 2 * PACKET_SIZE
    for packet in (data[:PACKET_SIZE], data[PACKET_SIZE:]):
        assert packet[0] == 0x47
        assert ((packet[1] & 0x1F) << 8 | packet[2]) == 0x100
        assert packet[1] & 0x40  # starts a PES
        assert packet[5] & 0x80  # discontinuity indicator
        assert packet.endswith(FLUSH_ACCESS_UNIT)
    with pytest.raises(ValueError, match="PID"):
        video_flush_packets(0x2000)


def test_first_video_pts_reads_the_segment_start() -> None:
    stream = SyntheticStream(width=64, height=64, segment_frames=5, audio="aac")
    first = b"".join(stream.segment())
    second = b"".join(stream.segment())
    assert first_video_pts(first, 0x100) == stream.start_pts
    assert first_video_pts(second, 0x100) == stream.start_pts + 5 * stream.frame_ticks
    assert first_video_pts(second, 0x999) is None
    assert first_video_pts(b"\x00" * 400, 0x100) is None


@pytest.mark.parametrize("index", [0, 1, 77, 65535])
def test_frame_index_survives_encoding(index: int) -> None:
    rgb = pattern(index, 512, 512)
    assert read_frame_index(rgb) == index
    assert read_frame_index(255 - rgb, inverted=True) == index
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    assert read_frame_index(frame.to_ndarray(format="rgb24")) == index


def test_unreadable_index_is_none() -> None:
    assert read_frame_index(np.full((512, 512, 3), 128, np.uint8)) is None


@pytest.mark.parametrize(
    ("size", "target"), [((640, 360), (512, 512)), ((512, 512), (256, 128)), ((64, 64), (64, 64))]
)
def test_frame_fitter_covers_and_crops(size: tuple[int, int], target: tuple[int, int]) -> None:
    frame = av.VideoFrame(*size, "yuv420p")
    frame.pts, frame.time_base = 9000, Fraction(1, 90000)
    fitted = FrameFitter(*target).fit(frame)
    assert (fitted.width, fitted.height) == target
    assert fitted.pts == 9000


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([0, 3000, 6000], [0, 3000, 6000]),  # pass through
        ([0, 3000, 3000, 6000], [0, 3000, None, 6000]),  # a repeated frame is rejected
        ([90000, 93000, 10, 3010], [90000, 93000, 96000, 99000]),  # the clock restarted: re-based
        ([0, 3000, 5_000_000, 5_003_000], [0, 3000, 6000, 9000]),  # a wild jump forward: re-based
    ],
)
def test_timestamps_stay_strictly_increasing(inputs: list[int], expected: list[int | None]) -> None:
    timestamps = _Timestamps()
    assert [timestamps.output_pts(pts) for pts in inputs] == expected


@pytest.mark.parametrize(
    ("width", "height", "segment_s", "audio_complexity"),
    [(511, 512, 1.0, 5), (512, 512, 2.5, 5), (0, 512, 1.0, 5), (512, 512, 1.0, 11), (512, 512, 1.0, -1)],
)
def test_encoder_settings_refuse_what_h264_opus_or_live_cannot_do(
    width: int, height: int, segment_s: float, audio_complexity: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        EncoderSettings(width, height, segment_s=segment_s, audio_complexity=audio_complexity)


@pytest.mark.parametrize(
    ("value", "time_base", "rate"),
    [
        (123_456, Fraction(1, 90000), 48000),
        (1, Fraction(1, 48000), 90000),  # 1.875: up
        (4, Fraction(1, 48000), 90000),  # 7.5: to the even 8
        (12, Fraction(1, 48000), 90000),  # 22.5: to the even 22
        (-7, Fraction(1, 44100), 90000),
        (2**40, Fraction(1001, 30000), 90000),
        (0, Fraction(1, 90000), 90000),
    ],
)
def test_rescale_rounds_as_fraction_arithmetic_does(value: int, time_base: Fraction, rate: int) -> None:
    assert rescale(value, time_base.as_integer_ratio(), rate) == round(value * time_base * rate)


_PIDS = ("-segment_format_options", "mpegts_start_pid=0x15B:mpegts_pmt_start_pid=0x10FF")
"""A video PID and a PMT PID whose bytes mean something in a regular expression ('[' and 0xFF)."""


@pytest.mark.parametrize("chunk", [1, PACKET_SIZE - 1, PACKET_SIZE + 1, 4096, 1 << 20])
def test_the_pmt_watch_dates_a_codec_change_however_the_bytes_arrive(chunk: int) -> None:
    hevc = Case("hevc-pids", seconds=2, video=HEVC, extra=_PIDS)
    made = segments(
        Case("pids-codec-switch", parts=(hevc, later(Case("h264-pids", seconds=2, extra=_PIDS), 2)))
    )
    watch, offset, starts = StreamTypeWatch(), 0, []
    for segment in made:
        starts.append(offset)
        for at in range(0, len(segment), chunk):
            piece = segment[at : at + chunk]
            watch.scan(piece, offset)
            offset += len(piece)
        watch.boundary(offset)
    # ffmpeg made two segments a part: HEVC from the first byte on, H.264 from the third segment's head
    answers = [
        (watch.codec_at(start, 0x15B), watch.codec_at(start + PACKET_SIZE * 50, 0x15B)) for start in starts
    ]
    assert answers == [("hevc", "hevc"), ("hevc", "hevc"), ("h264", "h264"), ("h264", "h264")]
    assert watch.latest(0x15B) == "h264"
    assert watch.codec_at(offset, 0x100) is None  # no stream on the usual PID


def _pmt_packets(segment: bytes | bytearray) -> list[int]:
    """Where the packets that start a section on the PMT PID of ``_PIDS`` are."""
    return [
        at
        for at in range(0, len(segment), PACKET_SIZE)
        if segment[at + 1] & 0x40 and ((segment[at + 1] & 0x1F) << 8 | segment[at + 2]) == 0x10FF
    ]


@pytest.mark.parametrize("chunk", [PACKET_SIZE - 1, 4096, 1 << 20])
def test_the_pmt_watch_dates_a_change_within_a_segment(chunk: int) -> None:
    """Past a segment's head the watch searches the bytes for PAT and PMT headers: a PMT packet with
    its transport_priority bit set counts, bytes in a payload that look like a PMT packet do not.
    The PMT that names HEVC is ffmpeg's, from an HEVC stream on the same PIDs."""
    hevc = segments(Case("hevc-pids-1s", seconds=1, video=HEVC, extra=_PIDS))[0]
    naming_hevc = bytearray(hevc[_pmt_packets(hevc)[0] :][:PACKET_SIZE])
    naming_hevc[1] |= 0x20  # transport_priority
    segment = bytearray(segments(Case("h264-pids-1s", seconds=1, extra=_PIDS))[0])
    changed = _pmt_packets(segment)[-1]
    assert changed > len(segment) // 2  # well past the segment's head
    segment[changed : changed + PACKET_SIZE] = naming_hevc
    host = changed - 10 * PACKET_SIZE  # an earlier packet of another PID: its payload gets a lookalike
    assert ((segment[host + 1] & 0x1F) << 8 | segment[host + 2]) not in (0, 0x10FF)
    segment[host + 100 : host + 100 + PACKET_SIZE // 2] = naming_hevc[: PACKET_SIZE // 2]
    watch = StreamTypeWatch()
    for at in range(0, len(segment), chunk):
        watch.scan(bytes(segment[at : at + chunk]), at)
    assert watch.codec_at(changed - 1, 0x15B) == "h264"
    assert watch.codec_at(changed, 0x15B) == "hevc"
