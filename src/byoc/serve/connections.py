"""Limits on the API's connections, so that no client can exhaust the process's file descriptors.

A connection that is not in the middle of a request (it sent nothing yet, sent half its headers, or
waits between keep-alive requests) is idle. At the cap, a new connection evicts the oldest idle one;
when every connection is busy with a request, a few more are let in for ``GET /health`` only, and
beyond those a new connection is closed at once. The cap is derived from ``RLIMIT_NOFILE``, leaving the
sessions room for their own trickle connections (:func:`connection_cap`).

When the process runs out of descriptors all the same, asyncio logs every failed ``accept()`` — about
a thousand lines a second. :class:`AcceptErrorLog` logs one line per interval instead, with a count.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from byoc.serve.listener import ACCEPT_BACKLOG, HEALTH_PATH, AcceptErrorLog

__all__ = [
    "ACCEPT_BACKLOG",
    "BASE_FDS",
    "HEALTH_PATH",
    "HEALTH_SLOTS",
    "SESSION_FDS",
    "AcceptErrorLog",
    "ConnectionGuard",
    "ConnectionLimits",
    "connection_cap",
    "connection_limits",
]

BASE_FDS = 128
"""Descriptors the process needs besides the API and the sessions: the listening socket, logs, shared
libraries, the processor's own files."""
SESSION_FDS = 32
"""Descriptors one session may need: its trickle channels (each with a connection opened ahead),
its threads' wake-up pipes, codec files."""
HEALTH_SLOTS = 4
"""Connections beyond the cap that may ask for ``GET /health`` only."""
_MIN_CAP = 8
_MAX_CAP = 4096
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def connection_cap(max_sessions: int, health_slots: int, nofile: int | None = None) -> int:
    """How many API connections fit in ``nofile`` descriptors (default: the soft ``RLIMIT_NOFILE``)
    beside :data:`BASE_FDS`, :data:`SESSION_FDS` per session, the health slots and the connections
    of one burst of accepts (:data:`ACCEPT_BACKLOG`); 8 to 4096."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
    room = nofile - BASE_FDS - SESSION_FDS * max_sessions - health_slots - 2 * ACCEPT_BACKLOG
    return max(_MIN_CAP, min(_MAX_CAP, room))


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What the API server allows its clients."""

    max_connections: int = 256
    """Connections at once, not counting the health slots."""
    health_slots: int = HEALTH_SLOTS
    header_timeout_s: float = 10.0
    """How long a connection may take to send a request's headers, or wait idle between requests."""


def connection_limits(
    *, max_connections: int | None, max_sessions: int, header_timeout_s: float
) -> ConnectionLimits:
    """The limits of ``byoc serve``'s API (``--api-max-connections``, ``--api-header-timeout-s``);
    without a cap, :func:`connection_cap` derives one."""
    cap = max_connections or connection_cap(max_sessions, HEALTH_SLOTS)
    return ConnectionLimits(cap, HEALTH_SLOTS, header_timeout_s)


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen by the guard as it opens, works and closes."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol, read: bytes = b"") -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self._admitted = False
        self._read = read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._admitted = self.guard.admit(self)
        if self._admitted:
            self.inner.connection_made(transport)
            if self._read:  # what the listener process read before it handed the connection over
                self.inner.data_received(self._read)
        else:
            transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self)
        if self._admitted:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ConnectionGuard:
    """The API's connections: counted, the idle ones evicted first at the cap, a few kept for health.

    The listening server makes each connection's protocol with :meth:`protocol`, and
    :attr:`middleware` is the application's outermost middleware (it tells busy connections from idle
    ones). Runs on the API loop.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        self._open: dict[object, _Tracked] = {}  # aiohttp's protocol -> its tracker, oldest first
        self._busy: set[object] = set()
        self._health_only: set[object] = set()
        self.evicted = 0
        self.refused = 0

    @property
    def open(self) -> int:
        return len(self._open)

    def protocol(self, factory: Callable[[], asyncio.Protocol], read: bytes = b"") -> asyncio.Protocol:
        """The protocol ``factory`` makes (aiohttp's), tracked by this guard; ``read``: bytes already
        read from the connection (byoc.serve.listener), given to it first."""
        return _Tracked(self, factory(), read)

    def admit(self, tracked: _Tracked) -> bool:
        """Whether a new connection may stay: at the cap the oldest idle one goes first."""
        cap = self._limits.max_connections
        if len(self._open) >= cap:
            self._evict_idle()
        if len(self._open) >= cap + self._limits.health_slots:
            self.refused += 1
            return False
        if len(self._open) >= cap:
            self._health_only.add(tracked.inner)
        self._open[tracked.inner] = tracked
        return True

    def release(self, tracked: _Tracked) -> None:
        self._open.pop(tracked.inner, None)
        self._busy.discard(tracked.inner)
        self._health_only.discard(tracked.inner)

    def _evict_idle(self) -> None:
        for inner, tracked in self._open.items():
            if inner not in self._busy:
                self.evicted += 1
                self.release(tracked)
                tracked.close()
                return

    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Marks the connection busy while its request runs; a health slot serves ``/health`` only."""
        connection: Any = request.protocol
        if connection in self._health_only and request.path != HEALTH_PATH:
            return web.json_response(
                {"error": "too many connections; only /health is served on this one"},
                status=503,
                headers={"Retry-After": "1", "Connection": "close"},
            )
        self._busy.add(connection)
        try:
            return await handler(request)
        finally:
            self._busy.discard(connection)
