"""What flows between the media stages (decoder → processing → encoder)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

__all__ = [
    "TIME_BASE",
    "AudioItem",
    "Boundary",
    "InputInfo",
    "Item",
    "ParamsItem",
    "VideoItem",
    "due_of",
    "rescale",
]

TIME_BASE = Fraction(1, 90000)
"""MPEG-TS time base; video timestamps keep it from input to output."""


def rescale(value: int, time_base: tuple[int, int], rate: int) -> int:
    """``value`` units of ``time_base`` (``Fraction.as_integer_ratio()``) as a whole number of
    1/``rate`` units, rounded as ``round(value * time_base * rate)`` rounds, in integers (Fraction
    arithmetic is pure Python: a few of these per audio frame were a visible part of a session's CPU
    time)."""
    numerator, denominator = time_base
    quotient, remainder = divmod(value * numerator * rate, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient & 1):
        quotient += 1
    return quotient


@dataclass(slots=True)
class VideoItem:
    """A video frame, when it left the decoder, and when it is due in stream time (both
    ``time.monotonic()``; ``due`` from :class:`byoc.media.queues.StreamClock`)."""

    frame: av.VideoFrame
    index: int
    decoded_at: float
    due: float


@dataclass(slots=True)
class AudioItem:
    frame: av.AudioFrame
    in_time_base: bool = False
    """The frame's timestamp is known to count :data:`TIME_BASE` (the decoder's frames), so its time
    base need not be read (PyAV builds a ``Fraction``, in pure Python, for every read)."""


@dataclass(frozen=True, slots=True)
class InputInfo:
    """What the decoder found in the input, sent before its first frame."""

    has_audio: bool


@dataclass(frozen=True, slots=True)
class Boundary:
    """Every frame of input segment ``segment`` is ahead of this marker."""

    segment: int


@dataclass(frozen=True, slots=True)
class ParamsItem:
    """A parameter update, applied by the processing stage between two frames."""

    params: dict[str, Any]


Item = VideoItem | AudioItem | Boundary | InputInfo | ParamsItem


def due_of(item: Item) -> float:
    """When a video frame is due in stream time (a queue asks this only of the video frames)."""
    if not isinstance(item, VideoItem):
        raise TypeError(f"only video frames have a due time, not {type(item).__name__}")
    return item.due
