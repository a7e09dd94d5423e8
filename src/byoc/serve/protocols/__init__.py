"""The protocol seam: how the container offers itself to an orchestrator.

The runtime core (sessions, admission, health, metrics, the drain) knows no protocol. It chooses one
adapter by ``--protocol`` (:func:`create_adapter`) and drives it through :class:`ProtocolAdapter`:
the adapter's HTTP routes are served beside the runtime's own, :meth:`~ProtocolAdapter.run` starts once
the processor's ``setup()`` returned, :meth:`~ProtocolAdapter.withdraw` is the drain's first step (no new
work may come) and :meth:`~ProtocolAdapter.close` its last word once the sessions have ended. What an
adapter may see of the runtime is :class:`RuntimeView` (snapshots, safe from any thread) and what it
may ask is :class:`SessionControl` (commands handed to the main loop, byoc.serve.control).

* ``byoc`` (byoc.serve.protocols.byoc): capability registration and the ``/stream/*`` routes
  (docs/protocol.md §1, §2).
* ``live-runner`` (byoc.serve.protocols.live_runner): heartbeat registration, sessions reached through
  the orchestrator's proxy on channels it creates (docs/protocol.md §10).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp

from byoc.serve.api import ApiSettings, Route
from byoc.serve.gpu import DeviceMemory
from byoc.serve.health import RuntimeState
from byoc.session.stats import SessionStatistics
from byoc.spec import EndReason, StreamSpec

if TYPE_CHECKING:
    from byoc.serve.config import Settings

__all__ = ["PROTOCOLS", "Offer", "ProtocolAdapter", "RuntimeView", "SessionControl", "create_adapter"]

PROTOCOLS = ("byoc", "live-runner", "live-runner-static")


@dataclass(frozen=True, slots=True)
class Offer:
    """What the container can take on right now, as an orchestrator should be told."""

    state: RuntimeState
    running: int
    """Sessions running."""
    capacity: int
    """Sessions it would hold in all: ``max_sessions``, or only those running while admission would
    refuse a start (GPU memory, a stuck processor, loading, draining)."""
    refusal: str | None
    """Why a start would be refused now, or None."""


class RuntimeView(Protocol):
    """The runtime as an adapter sees it; every method answers at once, from any thread."""

    def offer(self) -> Offer: ...

    def gpu_devices(self) -> Sequence[DeviceMemory]: ...

    def advertised_url(self) -> str:
        """Where the orchestrator reaches this container's API (no trailing slash)."""
        ...

    def health_changed(self) -> None:
        """The adapter's :attr:`ProtocolAdapter.state` changed: ``/health`` shows it at once."""
        ...


class SessionControl(Protocol):
    """The session commands an adapter may give; called on the API thread (byoc.serve.control)."""

    @property
    def settings(self) -> ApiSettings: ...

    async def start(self, spec: StreamSpec) -> str: ...

    async def end(self, stream_id: str, reason: EndReason) -> bool: ...

    def status(self, stream_id: str) -> SessionStatistics: ...


class ProtocolAdapter(Protocol):
    """One protocol, as the runtime drives it."""

    def routes(self) -> Sequence[Route]:
        """The protocol's HTTP routes, served beside ``/health``, ``/metrics`` and ``/version``."""
        ...

    @property
    def state(self) -> str | None:
        """Where registration stands, for ``/health`` (None: the container registers nowhere)."""
        ...

    async def run(self) -> None:
        """Offer the container, from the moment the processor is ready; runs on the main loop until it
        returns by itself or is cancelled."""
        ...

    async def withdraw(self) -> None:
        """The drain's first step: the orchestrator must send no more work (the runtime bounds it)."""
        ...

    async def close(self) -> None:
        """The drain's last step, once the sessions have ended (the runtime bounds it)."""
        ...


def create_adapter(
    settings: Settings,
    *,
    http: aiohttp.ClientSession,
    control: SessionControl,
    view: RuntimeView,
    api_loop: Callable[[], asyncio.AbstractEventLoop],
) -> ProtocolAdapter:
    """The adapter ``settings.protocol`` names. ``http`` is the main loop's client session;
    ``api_loop`` gives the API thread's loop once it runs."""
    if settings.protocol in ("live-runner", "live-runner-static"):
        from byoc.serve.protocols.live_runner import LiveRunner

        static = settings.protocol == "live-runner-static"
        return LiveRunner(settings, control=control, view=view, api_loop=api_loop, static=static)
    from byoc.serve.protocols.byoc import ByocProtocol

    return ByocProtocol(settings, http=http, view=view)
