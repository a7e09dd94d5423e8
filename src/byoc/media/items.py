"""What flows between the media stages (decoder → processing → encoder)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

__all__ = ["TIME_BASE", "AudioItem", "Boundary", "InputInfo", "Item", "ParamsItem", "VideoItem"]

TIME_BASE = Fraction(1, 90000)
"""MPEG-TS time base; video timestamps keep it from input to output."""


@dataclass(slots=True)
class VideoItem:
    """A video frame and when it left the decoder (``time.monotonic()``)."""

    frame: av.VideoFrame
    index: int
    decoded_at: float


@dataclass(frozen=True, slots=True)
class AudioItem:
    frame: av.AudioFrame


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
