"""Counters shared by a session's threads, and the frozen snapshot that serves status, events and metrics."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AudioCounts",
    "LatencyWindow",
    "OutputLosses",
    "RateMeter",
    "SessionStatistics",
    "TrickleCounts",
    "percentile",
]


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The value below which ``fraction`` of the (sorted) values fall; None for no values."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


class RateMeter:
    """Events per second over the last ``window_s`` seconds. ``tick`` may be called from any thread."""

    def __init__(self, window_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._times: deque[float] = deque(maxlen=512)
        self._window = window_s
        self._clock = clock
        self.last: float | None = None

    def tick(self) -> None:
        now = self._clock()
        self._times.append(now)
        self.last = now

    def rate(self) -> float:
        now = self._clock()
        recent = [t for t in list(self._times) if now - t <= self._window]
        if len(recent) < 2:
            return 0.0
        span = max(recent[-1] - recent[0], now - recent[0])
        return (len(recent) - 1) / span if span > 0 else 0.0


class LatencyWindow:
    """The most recent latencies (ms), for percentiles. Thread-safe."""

    def __init__(self, size: int = 512) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._values.append(ms)

    def percentiles(self) -> dict[str, float | None]:
        with self._lock:
            ordered = sorted(self._values)
        return {name: percentile(ordered, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


@dataclass(frozen=True, slots=True)
class TrickleCounts:
    """What the session's trickle channels recovered from, summed over all of them."""

    retries: int = 0
    """Requests sent again after a refusal or a failed connection."""
    restarts: int = 0
    """Segment bodies that broke off and were read again from where they stopped."""
    broken_segments: int = 0
    """Published segments whose upload broke off; the next one went out in a new segment."""
    skipped_segments: int = 0
    """Segments never read: the server no longer had them when the reader asked for them (it fell
    behind the channel's retention, five segments). Their frames never reached the session."""

    def as_dict(self) -> dict[str, int]:
        return {
            "retries": self.retries,
            "restarts": self.restarts,
            "broken_segments": self.broken_segments,
            "skipped_segments": self.skipped_segments,
        }


@dataclass(frozen=True, slots=True)
class OutputLosses:
    """Output segments (and the video frames in them) that the gateway cannot have received whole, by
    reason: ``refused`` (the server answered the upload with an error status), ``broken`` (the upload
    broke off or got no answer), ``unreachable`` (none of it could be sent: the output did not answer,
    was gone, or was given up). Each lost segment is also counted as an ``output`` error."""

    segments: Mapping[str, int] = field(default_factory=dict)
    frames: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"segments": dict(self.segments), "frames": dict(self.frames)}


@dataclass(frozen=True, slots=True)
class AudioCounts:
    """The session's audio: what reached the encoder, what went out as Opus, and what was not sent.

    Audio that could not be decoded or encoded is also counted in ``errors`` (``audio_decode``,
    ``audio_encode``)."""

    frames_in: int = 0
    seconds_in: float = 0.0
    packets_out: int = 0
    seconds_out: float = 0.0
    frames_dropped: int = 0
    """Older than the first video frame, held too long while no segment was open, or failed."""

    def as_dict(self) -> dict[str, int | float]:
        return {
            "frames_in": self.frames_in,
            "seconds_in": round(self.seconds_in, 3),
            "packets_out": self.packets_out,
            "seconds_out": round(self.seconds_out, 3),
            "frames_dropped": self.frames_dropped,
        }


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A consistent snapshot of one session, the single source for status, events and metrics.

    ``frames_out``, ``output_segments`` and ``output_bytes`` count what the encoder produced, published
    or not; what of it was lost on the way to the gateway is counted in ``output_lost``, so that frames
    out minus lost frames (and segments out minus lost segments) is what the gateway can have received.
    """

    stream_id: str
    state: str
    started_at_ms: int
    uptime_s: float
    params: Mapping[str, Any]
    width: int
    height: int
    has_audio: bool
    input_segments: int
    input_bytes: int
    frames_in: int
    input_fps: float
    frames_out: int
    output_fps: float
    output_segments: int
    output_bytes: int
    dropped: Mapping[str, int]
    errors: Mapping[str, int]
    latency_ms: Mapping[str, float | None]
    last_error: str | None = None
    end_reason: str | None = None
    trickle: TrickleCounts = field(default_factory=TrickleCounts)
    audio: AudioCounts = field(default_factory=AudioCounts)
    output_lost: OutputLosses = field(default_factory=OutputLosses)

    @property
    def frames_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "state": self.state,
            "started_at_ms": self.started_at_ms,
            "uptime_s": round(self.uptime_s, 3),
            "params": dict(self.params),
            "width": self.width,
            "height": self.height,
            "has_audio": self.has_audio,
            "input": {
                "segments": self.input_segments,
                "bytes": self.input_bytes,
                "frames": self.frames_in,
                "fps": round(self.input_fps, 2),
            },
            "output": {
                "segments": self.output_segments,
                "bytes": self.output_bytes,
                "frames": self.frames_out,
                "fps": round(self.output_fps, 2),
                "lost": self.output_lost.as_dict(),
            },
            "dropped": dict(self.dropped),
            "errors": dict(self.errors),
            "frame_latency_ms": {k: None if v is None else round(v, 2) for k, v in self.latency_ms.items()},
            "trickle": self.trickle.as_dict(),
            "audio": self.audio.as_dict(),
            "last_error": self.last_error,
            "end_reason": self.end_reason,
        }
