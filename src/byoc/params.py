"""The one validator of stream parameters, for every path an update can take.

A ``/stream/params`` request (byoc.serve.validation, on the API thread) and a message on the
control channel (byoc.session.Session.update_params, on the main loop) go through the same checks, so a
value is accepted or refused the same way whichever way it came: over HTTP a refusal is a 400, over
the control channel the session keeps its parameters, logs the refusal, counts it as a ``params``
error and tells the gateway with a ``params_rejected`` event.

This module depends on nothing but :mod:`byoc.errors`, so the session can use it without importing
the runtime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from byoc.errors import InvalidRequest

__all__ = ["MAX_FPS_LIMIT", "MAX_PARAMS_BYTES", "check_params_size", "check_update", "max_fps"]

MAX_FPS_LIMIT = 120.0
"""The highest frame-rate cap a stream may ask for."""
MAX_PARAMS_BYTES = 64 * 1024
"""The default bound on a stream's parameters, as compact JSON (``--max-params-bytes``)."""


def max_fps(value: Any) -> float | None:
    """A ``max_fps`` parameter as the decoder's cap: ``None`` (no cap) or a number within (0, 120].

    ``null`` removes the cap; anything else that is not such a number — a string, a boolean, zero, a
    negative number, NaN or infinity, more than 120 — raises :class:`~byoc.errors.InvalidRequest`.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= MAX_FPS_LIMIT
    ):
        raise InvalidRequest(
            "params.max_fps", f"must be a number within (0, {MAX_FPS_LIMIT:g}], got {value!r}"
        )
    return float(value)


def check_update(params: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter update as a session applies it, or InvalidRequest naming the first bad field.

    The parameters byoc itself acts on are checked (``max_fps``); every other key is the processor's
    and passes as it is.
    """
    update = dict(params)
    if "max_fps" in update:
        max_fps(update["max_fps"])
    return update


def check_params_size(params: Mapping[str, Any], limit: int, name: str = "params") -> None:
    """InvalidRequest when ``params`` take more than ``limit`` bytes as compact JSON: a stream's
    parameters are kept and shown for its whole life, so what updates add up to is bounded too."""
    size = len(json.dumps(params, separators=(",", ":")).encode())
    if size > limit:
        raise InvalidRequest(name, f"take {size} bytes as JSON; at most {limit} are accepted")
