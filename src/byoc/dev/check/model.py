"""What ``byoc check`` measures and concludes: plain data, turned into the terminal summary, JSON and
the HTML report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "CheckResult",
    "HealthSample",
    "ItemResult",
    "MemoryFit",
    "MemorySample",
    "SessionShutdown",
    "StepResult",
]


@dataclass(frozen=True)
class MemorySample:
    """One reading while the check runs. Bytes; ``gpu_used``/``gpu_total`` are per device index."""

    t: float
    """Seconds since the check started."""
    sessions: int
    rss: int
    """The container's resident memory, its worker processes (``--isolation process``) included."""
    gpu_used: dict[int, int] = field(default_factory=dict)
    gpu_total: dict[int, int] = field(default_factory=dict)
    torch_peak: dict[int, int] = field(default_factory=dict)
    workers: int = 0
    """Of ``rss``, the resident memory of the processes the container started (0 when none can be seen)."""


@dataclass(frozen=True)
class HealthSample:
    t: float
    latency_ms: float
    status: int
    """HTTP status; 0 when the request failed."""


@dataclass(frozen=True)
class StepResult:
    """One step of the ramp: ``sessions`` streams running together."""

    sessions: int
    started_at: float
    ended_at: float
    fps: list[float]
    """Output frames per second of each session."""
    input_fps: float
    dropped_frames: int
    frames_in: int
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    peak_rss: int
    peak_gpu_used: dict[int, int]
    peak_torch: dict[int, int]
    real_time: bool
    refused: str | None = None
    """Why the container refused a session of this step (the ramp stops there)."""


@dataclass(frozen=True)
class MemoryFit:
    """A line through peak memory per step: ``base + per_session * sessions``."""

    resource: str
    """``rss``, ``gpu0``, ``gpu1``…"""
    base: int
    per_session: int
    residual: int
    """Root mean square distance of the points from the line (bytes)."""
    points: list[tuple[int, int]]
    """(sessions, peak bytes), the idle point first."""
    total: int
    """What there is: device memory, the container's memory limit, or the host's RAM."""
    total_source: str
    headroom: int
    recommended_max_sessions: int | None


@dataclass(frozen=True)
class SessionShutdown:
    stream_id: str
    final_event: bool
    last_segment_complete: bool
    channel_closed: bool

    @property
    def clean(self) -> bool:
        return self.final_event and self.last_segment_complete and self.channel_closed


@dataclass(frozen=True)
class ItemResult:
    """One item of the checklist, with the figures behind its verdict."""

    name: str
    passed: bool
    summary: str
    """One line for the terminal, with the figures."""
    reason: str | None = None
    """Why it failed (None when it passed)."""
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckResult:
    processor: str
    container_url: str
    started_at: str
    """ISO 8601, UTC."""
    gpu: bool
    input_fps: float = 30.0
    items: list[ItemResult] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)
    memory: list[MemorySample] = field(default_factory=list)
    health: list[HealthSample] = field(default_factory=list)
    fits: list[MemoryFit] = field(default_factory=list)
    shutdown: list[SessionShutdown] = field(default_factory=list)
    recommended_max_sessions: int | None = None

    @property
    def passed(self) -> bool:
        return bool(self.items) and all(item.passed for item in self.items)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data
