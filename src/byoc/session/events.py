"""The documents a session publishes on its events channel.

``status`` follows ai-runner's PipelineStatus (so the gateway's status API is meaningful) with byoc's
figures added; the final ``stream_stopped`` event says why the stream ended and carries its statistics.
Neither repeats the stream's parameters, which may be large: both carry their digest
(:func:`params_digest`) instead; ``/stream/status`` has them in full.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from byoc.session.stats import SessionStatistics

__all__ = ["final_event", "params_digest", "pipeline_state", "status_event"]

_RECENT_S = 2.0


def pipeline_state(since_input_s: float | None, since_output_s: float | None) -> str:
    """ONLINE while frames go out, DEGRADED_* when input or output stalls, LOADING before the first."""
    if since_output_s is not None and since_output_s < _RECENT_S:
        return "ONLINE"
    if since_input_s is not None and since_input_s >= _RECENT_S:
        return "DEGRADED_INPUT"
    if since_output_s is not None:
        return "DEGRADED_INFERENCE"
    return "LOADING"


def params_digest(params: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies parameters without repeating them: the first 16 hex digits of the SHA-256 of
    their compact, key-sorted JSON, and its length in bytes."""
    encoded = json.dumps(params, separators=(",", ":"), sort_keys=True).encode()
    return {"sha256": hashlib.sha256(encoded).hexdigest()[:16], "bytes": len(encoded)}


def status_event(
    stats: SessionStatistics, since_input_s: float | None, since_output_s: float | None
) -> dict[str, Any]:
    figures = stats.as_dict()
    return {
        "type": "status",
        "state": pipeline_state(since_input_s, since_output_s),
        "start_time": stats.started_at_ms,
        "input_status": {"fps": figures["input"]["fps"], "segments": stats.input_segments},
        "inference_status": {
            "fps": figures["output"]["fps"],
            "last_params_digest": params_digest(stats.params),
            "last_error": stats.last_error,
        },
        "frame_latency_ms": figures["frame_latency_ms"],
        "dropped_frames": dict(stats.dropped),
        "errors": dict(stats.errors),
        "trickle": figures["trickle"],
        "output_lost": figures["output"]["lost"],
    }


def final_event(stats: SessionStatistics, reason: str) -> dict[str, Any]:
    figures = stats.as_dict()
    figures["params"] = params_digest(figures["params"])
    return {"type": "stream_stopped", "reason": reason, "statistics": figures}
