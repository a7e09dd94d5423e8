"""The HTTP API on a thread and event loop of its own.

The runtime's main loop carries every session's trickle I/O; the API loop carries only requests, so
``/health`` and ``/metrics`` never queue behind media work. Handlers that change sessions hand their
work to the main loop through byoc.serve.control.RuntimeControl and wait for it there.

With a ``health`` source, a listener process (byoc.serve.listener) owns the listening sockets and
answers ``GET /health`` without ever waiting for this process's interpreter; every other connection
comes here through it, for one request (its answer says ``Connection: close``). This server keeps the
listener told of the answer: every 100 ms, after every other request it served, and whenever
:meth:`ApiServer.health_changed` is called. Should the listener process end, or not start, this server
accepts on its sockets itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web

from byoc.serve.connections import (
    ACCEPT_BACKLOG,
    HEALTH_PATH,
    AcceptErrorLog,
    ConnectionGuard,
    ConnectionLimits,
)
from byoc.serve.handoff import ListenerProcess
from byoc.serve.listener import HealthAnswer, ListenerOptions

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)

_PUBLISH_S = 0.1
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiServer:
    """Serves an aiohttp application from a dedicated thread, within ``limits`` (byoc.serve.connections)."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        limits: ConnectionLimits | None = None,
        *,
        health: Callable[[], HealthAnswer] | None = None,
        log_level: str = "INFO",
    ) -> None:
        """``health``: the current ``/health`` answer, for a listener process to give (any thread);
        without it this server accepts its connections itself."""
        self._app = app
        self._limits = limits or ConnectionLimits()
        self._guard = ConnectionGuard(self._limits)
        app.middlewares.insert(0, self._guard.middleware)
        self._health = health
        self._log_level = log_level
        self._listener: ListenerProcess | None = None
        self._adopting: set[asyncio.Task[object]] = set()
        if health is not None:
            app.middlewares.insert(0, self._told_after)
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The API thread's event loop (once :meth:`start` returned): work that must go on while the
        main loop is busy, such as a live runner's heartbeat, runs here."""
        if self._loop is None:
            raise RuntimeError("the API server is not running")
        return self._loop

    async def start(self) -> int:
        """Start listening; returns the bound port."""
        self._thread.start()
        return await asyncio.wrap_future(self._started)

    def health_changed(self) -> None:
        """Tell the listener process the current ``/health`` answer now (any thread; never waits)."""
        if self._listener is not None and self._health is not None:
            self._listener.publish(self._health())

    @web.middleware
    async def _told_after(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Whatever a request changed is in the listener's ``/health`` before the client has its answer;
        and the connection closes after it, so that the client's next request (a health check, say)
        comes through the listener again rather than waiting for this interpreter."""
        try:
            response = await handler(request)
        finally:
            if request.path != HEALTH_PATH:
                self.health_changed()
        listener = self._listener
        if listener is not None and not listener.gone.is_set() and not response.prepared:
            response.force_close()
        return response

    async def stop(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Stop listening and end the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join, timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            else:
                log.exception("the API server failed")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(AcceptErrorLog())
        self._stop = asyncio.Event()
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=self._limits.header_timeout_s,  # also closes a connection sending no request
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        try:
            listener = await self._loop.create_server(
                lambda: self._guard.protocol(server),
                self._host,
                self._port,
                reuse_address=True,
                backlog=ACCEPT_BACKLOG,
                start_serving=False,
            )
            try:
                self._listener = self._start_listener(listener.sockets, server)
                if self._listener is None:
                    await listener.start_serving()
                self._started.set_result(listener.sockets[0].getsockname()[1])
                if self._listener is not None:
                    await self._while_listener(self._listener, listener)
                await self._stop.wait()
            finally:
                if self._listener is not None:
                    await self._listener.stop()
                listener.close()
        finally:
            await runner.cleanup()

    def _start_listener(
        self, sockets: tuple[socket.socket, ...], server: web.Server
    ) -> ListenerProcess | None:
        if self._health is None:
            return None
        for sock in sockets:  # connections wait in the backlog until the listener process takes them
            with socket.socket(fileno=os.dup(sock.fileno())) as same:
                same.listen(ACCEPT_BACKLOG)
        loop = asyncio.get_running_loop()

        def adopt(sock: socket.socket, read: bytes) -> None:
            task = loop.create_task(
                loop.connect_accepted_socket(lambda: self._guard.protocol(server, read), sock)
            )
            self._adopting.add(task)
            task.add_done_callback(self._adopted)

        options = ListenerOptions(
            self._limits.max_connections + self._limits.health_slots, self._limits.header_timeout_s
        )
        try:
            return ListenerProcess(sockets, options, self._health(), adopt, self._log_level)
        except OSError as exc:
            log.warning("no listener process (%s): this process answers /health itself", exc)
            return None

    def _adopted(self, task: asyncio.Task[object]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("a connection handed over by the listener process was lost: %s", exc)

    async def _while_listener(self, listener: ListenerProcess, server: asyncio.AbstractServer) -> None:
        """Keep the listener told until this server stops, or serve the sockets if it ends first."""
        assert self._stop is not None
        assert self._health is not None
        while not listener.gone.is_set():
            listener.publish(self._health())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PUBLISH_S):
                    await self._stop.wait()
                    return
        await server.start_serving()
