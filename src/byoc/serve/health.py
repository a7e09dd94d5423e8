"""Health: one pure function from the runtime's state to the ``/health`` answer.

``/health`` must answer in milliseconds whatever the processors are doing, so it is computed from a
few values the runtime keeps in memory and never waits on anything.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["HealthView", "RuntimeState", "health_response"]


class RuntimeState(enum.StrEnum):
    LOADING = "LOADING"
    IDLE = "IDLE"
    OK = "OK"
    DRAINING = "DRAINING"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class HealthView:
    state: RuntimeState
    sessions: int
    capacity: int
    uptime_s: float
    error: str | None = None
    registration: str | None = None
    abandoned_threads: int = 0
    """Threads left behind in a processor hook that never returned, still running."""


# ai-runner's vocabulary has no DRAINING: LOADING takes a container out of go-livepeer's pool, which is
# what a draining container wants.
_AI_RUNNER_STATUS = {
    RuntimeState.LOADING: "LOADING",
    RuntimeState.IDLE: "IDLE",
    RuntimeState.OK: "OK",
    RuntimeState.DRAINING: "LOADING",
    RuntimeState.ERROR: "ERROR",
}


def health_response(
    view: HealthView, style: str = "byoc", *, healthy_while_draining: bool = False
) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body of ``/health``.

    byoc style: 200 ``{"status": "ok", ...}`` while the runtime can serve (IDLE or OK), 503 with the state
    while it loads, drains or is broken (more threads stuck in the processor than allowed is broken), so
    load balancers route elsewhere; with ``healthy_while_draining``, 200 with status ``draining`` while it
    drains (a static live runner: the orchestrator releases every session on any other answer).
    ai-runner style: always 200
    with ``{"status": LOADING|IDLE|OK|ERROR}``, the body go-livepeer's LV2V mode reads.
    """
    if style == "ai-runner":
        return 200, {"status": _AI_RUNNER_STATUS[view.state]}
    serving = view.state in (RuntimeState.IDLE, RuntimeState.OK)
    body: dict[str, Any] = {
        "status": "ok" if serving else view.state.lower(),
        "state": str(view.state),
        "sessions": view.sessions,
        "capacity": view.capacity,
        "uptime_s": round(view.uptime_s, 3),
        "abandoned_threads": view.abandoned_threads,
    }
    if view.error:
        body["error"] = view.error
    if view.registration:
        body["registration"] = view.registration
    healthy = serving or (healthy_while_draining and view.state is RuntimeState.DRAINING)
    return (200 if healthy else 503), body
