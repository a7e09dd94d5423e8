"""The test suite's media: byoc.dev.corpus's cases (made by ffmpeg) plus the damaged and switching
streams only tests need. Importing this module adds those to ``CASES``, so ``segments(name)`` finds them."""

from __future__ import annotations

import random

from byoc.dev.corpus import CASES, HEVC, PTS_WRAP, START_PTS, TS_PACKET, Case, ffmpeg, later, segments, x264
from byoc.media.ts import shift_timestamps

__all__ = ["CASES", "Case", "ffmpeg", "segments"]


def _single_packets(made: list[bytes]) -> list[bytes]:
    """Every 188-byte TS packet its own segment."""
    data = b"".join(made)
    return [data[at : at + TS_PACKET] for at in range(0, len(data), TS_PACKET)]


def _near_wrap(made: list[bytes]) -> list[bytes]:
    """Timestamps moved so the 33-bit PTS wraps to 0 a second and a half into the stream."""
    ticks = PTS_WRAP - START_PTS - 135_000
    return [shift_timestamps(segment, ticks) for segment in made]


def _empty_third(made: list[bytes]) -> list[bytes]:
    return [*made[:2], b"", *made[2:]]


def _truncated_second(made: list[bytes]) -> list[bytes]:
    """The second segment breaks off half-way (its rest never arrives)."""
    return [made[0], made[1][: len(made[1]) // 2 + 77], *made[2:]]


def _noise(size: int, seed: int = 3) -> bytes:
    return random.Random(seed).randbytes(size)


def _random_second(made: list[bytes]) -> list[bytes]:
    return [made[0], _noise(64 * 1024), *made[1:]]


def _only_noise(made: list[bytes]) -> list[bytes]:
    return [_noise(len(segment), seed) for seed, segment in enumerate(made)]


def _joined_late(made: list[bytes]) -> list[bytes]:
    """The stream as a viewer joining mid-GOP gets it: from its second (non-keyframe) segment."""
    return made[1:]


_H264_1S = Case("h264-1s", seconds=1.0)
_MID_GOP = Case("mid-gop", video=x264("-bf", "0", gop=60), extra=("-break_non_keyframes", "1"))

CASES.update(
    (case.name, case)
    for case in (
        _MID_GOP,
        Case("mid-gop-join", parts=(_MID_GOP,), post=_joined_late),
        Case(
            "resolution-switch",
            parts=(
                _H264_1S,
                later(Case("h264-720p-1s", seconds=1.0, size="1280x720"), 1.0),
                later(Case("h264-240p-1s", seconds=1.0, size="320x240"), 2.0),
            ),
        ),
        Case("pts-backwards", parts=(Case("h264-2s", seconds=2.0), _H264_1S)),
        Case("pts-wrap", parts=(Case("h264-3s"),), post=_near_wrap),
        Case(
            "codec-switch",
            parts=(Case("hevc-1.5s", seconds=1.5, video=HEVC), later(Case("h264-1.5s", seconds=1.5), 1.5)),
        ),
        Case("single-packets", seconds=1.0, size="256x144", post=_single_packets),
        Case("empty-segment", post=_empty_third),
        Case("truncated-segment", post=_truncated_second),
        Case("random-segment", post=_random_second),
        Case("random-bytes", audio=None, post=_only_noise),
    )
)
