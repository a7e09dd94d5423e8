"""The arithmetic of ``byoc check``, with no I/O: memory fits, the session limit, histogram quantiles."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from byoc.dev.check.model import MemoryFit

__all__ = ["fit_line", "histogram_quantile", "leak_tolerance", "memory_fit", "recommended_sessions"]


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares through (x, y): intercept, slope and the root mean square residual."""
    if not points:
        raise ValueError("no points to fit")
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = 0.0 if spread == 0 else sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    intercept = mean_y - slope * mean_x
    residual = math.sqrt(sum((y - (intercept + slope * x)) ** 2 for x, y in points) / n)
    return intercept, slope, residual


def recommended_sessions(total: int, headroom: int, base: int, per_session: int) -> int | None:
    """floor((total - headroom - base) / per_session): the sessions that fit; None if unknown."""
    if per_session <= 0:
        return None
    return max(0, math.floor((total - headroom - base) / per_session))


def memory_fit(
    resource: str, points: Sequence[tuple[int, int]], *, total: int, total_source: str, headroom: int
) -> MemoryFit:
    """Fit peak memory per step against sessions; ``points[0]`` is the idle measurement (0 sessions).

    ``base`` is the idle measurement itself, ``per_session`` the slope of the fit.
    """
    _, slope, residual = fit_line([(float(x), float(y)) for x, y in points])
    base = points[0][1]
    per_session = round(slope)
    return MemoryFit(
        resource=resource,
        base=base,
        per_session=per_session,
        residual=round(residual),
        points=list(points),
        total=total,
        total_source=total_source,
        headroom=headroom,
        recommended_max_sessions=recommended_sessions(total, headroom, base, per_session),
    )


def leak_tolerance(base: int, peak: int, minimum: int) -> int:
    """How far above the idle base memory may stay once every session ended: 10 % of what the
    sessions took, at least ``minimum`` (allocators keep some memory for reuse)."""
    return max(minimum, (peak - base) // 10)


def histogram_quantile(q: float, before: Mapping[float, float], after: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of the observations between two scrapes of a Prometheus histogram.

    ``before``/``after`` map each bucket's upper bound (``le``, +Inf included) to its cumulative count.
    Interpolates linearly inside a bucket, as Prometheus's ``histogram_quantile`` does.
    """
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower
