"""What a session is asked to do, with which settings, and why it ended."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from byoc.media.encoder import EncoderSettings
from byoc.params import MAX_PARAMS_BYTES
from byoc.trickle.client import TrickleClientSettings

__all__ = ["EndReason", "SessionSettings", "StreamSpec"]


class EndReason(enum.StrEnum):
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    INPUT_ENDED = "input_ended"
    INPUT_GONE = "input_gone"
    INPUT_TIMEOUT = "input_timeout"
    CONTROL_ENDED = "control_ended"
    CONTROL_GONE = "control_gone"
    OUTPUT_GONE = "output_gone"
    OUTPUT_UNREACHABLE = "output_unreachable"
    PROCESSOR_ERROR = "processor_error"
    PROCESSOR_HUNG = "processor_hung"
    MEDIA_ERROR = "media_error"
    TRICKLE_ERROR = "trickle_error"
    DEADLINE = "deadline"
    FIRST_FRAME_TIMEOUT = "first_frame_timeout"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What a start request asks for (already validated)."""

    stream_id: str
    control_url: str | None
    events_url: str | None
    subscribe_url: str | None = None
    publish_url: str | None = None
    data_url: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    width: int = 512
    height: int = 512
    max_fps: float | None = None


@dataclass(frozen=True, slots=True)
class SessionSettings:
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    """How the output is encoded; each stream's own width and height replace the ones given here."""
    status_interval_s: float = 5.0
    drain_timeout_s: float = 6.0
    """From a stop to the end: the pipeline drains, the final event goes out and the channels are
    DELETEd within it."""
    max_duration_s: float | None = None
    input_timeout_s: float | None = None
    """How long a session with an input channel may go without a new input segment starting to arrive
    (from its start, for the first one); past it the session ends as ``input_timeout``, so a gateway that
    vanished without closing the channel frees the slot. None or 0: no limit."""
    first_frame_timeout_s: float | None = None
    """How long after its start a session with an input channel may go without decoding a video frame;
    past it the session ends as ``first_frame_timeout`` (input that never decodes). None or 0: no limit."""
    max_consecutive_errors: int = 10
    process_timeout_s: float | None = 30.0
    """How long one call of a processor hook (``process``, ``process_audio``, ``on_params``, ``on_stop``)
    may take; past it the session ends as ``processor_hung`` and leaves the call's thread behind (a
    Python thread cannot be killed). None: no limit. ``on_start`` is bounded by the admission instead."""
    queue_capacity: int = 8
    """Video frames each queue between two stages holds; a full queue makes the stage before it wait."""
    latency_budget_s: float = 0.5
    """How long after it is due in stream time (its PTS on the wall clock, anchored at the first frame)
    a frame may still be processed; past it, a frame is late and gives way to a newer one. Bursts are
    early, so they never use it: it absorbs input jitter and short stalls. Half a second is about 15
    frames of slack at 30 fps, while a stream that falls further behind stays visibly live."""
    input_buffer_bytes: int = 2 * 1024 * 1024
    """Input bytes waiting to be decoded before the session stops reading its input for a while."""
    data_batch_s: float = 0.1
    output_failure_budget_s: float = 20.0
    """How long the output may lose every segment (counted) before the session ends with
    ``output_unreachable``."""
    max_params_bytes: int = MAX_PARAMS_BYTES
    """The most the stream's parameters may take as JSON after an update; a larger update is refused."""
    thread_nice: int = 0
    """Niceness added to the session's decoder, processing and encoder threads (Linux)."""
    trickle: TrickleClientSettings = field(default_factory=TrickleClientSettings)
