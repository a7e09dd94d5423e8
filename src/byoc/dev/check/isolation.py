"""The ``isolation`` item of ``byoc check``: the isolation mode it ran in, memory per session, and whether
memory came back once every session ended; when it did not, the ``byoc serve`` flags that contain the
leak (docs/architecture.md, "Process isolation", recycling).

The leak threshold recommended is 4 times the memory left per session that ended, at least the leak
tolerance and 100 MiB, rounded up to a multiple of 50 MiB: a worker (or, in thread isolation, the
container) is then recycled after about four sessions' worth of leak, while the allocator's ordinary
drift, which the tolerance allows, never triggers it.
"""

from __future__ import annotations

import math

from byoc.dev.check.model import ItemResult

__all__ = ["isolation_item", "leak_threshold_mb", "recycle_after_sessions"]

_MIB = 1024 * 1024
_LEAKS_PER_RECYCLE = 4
_MINIMUM_MB = 100
_ROUND_MB = 50


def leak_threshold_mb(leftover: int, sessions: int, tolerance: int) -> int:
    """``--leak-threshold-mb`` for a container that kept ``leftover`` bytes after ``sessions`` ended:
    max(4 times the leftover per session, tolerance, 100 MiB), rounded up to a multiple of 50 MiB."""
    per_session = max(leftover, 0) / max(sessions, 1)
    wanted = max(_LEAKS_PER_RECYCLE * per_session, tolerance) / _MIB
    return max(_MINIMUM_MB, math.ceil(wanted / _ROUND_MB) * _ROUND_MB)


def recycle_after_sessions(threshold_mb: int, leftover: int, sessions: int) -> int:
    """``--recycle-after-sessions``: the sessions whose leak adds up to ``threshold_mb`` (at least 1)."""
    per_session = max(leftover, 0) / max(sessions, 1)
    if per_session <= 0:
        return 1
    return max(1, math.floor(threshold_mb * _MIB / per_session))


def isolation_item(
    mode: str,
    *,
    per_session: int,
    workers_per_session: int | None,
    leftover: int,
    tolerance: int,
    sessions: int,
) -> ItemResult:
    """The item from the measurements: ``per_session`` is the slope of the container's resident memory
    (its worker processes included), ``workers_per_session`` the slope of the workers' alone (None
    where they could not be seen); ``leftover`` and ``tolerance`` are the leak check's figures after
    ``sessions`` sessions ended."""
    if mode == "process":
        seen = (
            f"workers {workers_per_session / _MIB:.1f} MiB per session"
            if workers_per_session is not None
            else "workers not visible from here"
        )
        measured = f"{seen} (container and workers {per_session / _MIB:.1f} MiB)"
    else:
        measured = f"{per_session / _MIB:.1f} MiB per session"
    came_back = leftover <= tolerance
    after = (
        f"+{leftover / _MIB:.0f} MiB after {sessions} sessions ended (tolerance {tolerance / _MIB:.0f} MiB)"
    )
    summary = f"isolation {mode}: {measured}; memory " + (
        f"came back: {after}" if came_back else f"did not come back: {after}"
    )
    figures: dict[str, object] = {
        "mode": mode,
        "per_session": per_session,
        "workers_per_session": workers_per_session,
        "leftover_after_sessions": leftover,
        "leak_tolerance": tolerance,
        "sessions_ended": sessions,
        "recommended_leak_threshold_mb": None,
        "recommended_recycle_after_sessions": None,
        "recommendation": None,
    }
    if came_back:
        return ItemResult("isolation", True, summary, None, figures)
    threshold = leak_threshold_mb(leftover, sessions, tolerance)
    left = leftover / max(sessions, 1) / _MIB
    rule = (
        f"{threshold} MiB: {_LEAKS_PER_RECYCLE} times the {left:.0f} MiB left per session, "
        f"at least the tolerance and {_MINIMUM_MB} MiB, rounded up to {_ROUND_MB} MiB"
    )
    if mode == "process":
        recycle = recycle_after_sessions(threshold, leftover, sessions)
        figures["recommended_recycle_after_sessions"] = recycle
        recommendation = (
            f"run with --leak-threshold-mb {threshold} (or --recycle-after-sessions {recycle}) "
            "so that a worker whose memory drifts that far is replaced"
        )
    else:
        recommendation = (
            f"run with --isolation process --leak-threshold-mb {threshold} "
            "so that a worker whose memory drifts that far is replaced, not the whole container"
        )
    figures["recommended_leak_threshold_mb"] = threshold
    figures["recommendation"] = recommendation
    reason = f"memory stays after the sessions end: {recommendation} ({rule})"
    return ItemResult("isolation", False, summary, reason, figures)
