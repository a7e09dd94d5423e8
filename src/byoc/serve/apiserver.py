"""The HTTP API on a thread and event loop of its own.

The runtime's main loop carries every session's trickle I/O; the API loop carries only requests, so
``/health`` and ``/metrics`` never queue behind media work. Handlers that change sessions hand their
work to the main loop through byoc.serve.control.RuntimeControl and wait for it there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

from aiohttp import web

from byoc.serve.connections import ACCEPT_BACKLOG, AcceptErrorLog, ConnectionGuard, ConnectionLimits

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)


class ApiServer:
    """Serves an aiohttp application from a dedicated thread, within ``limits`` (byoc.serve.connections)."""

    def __init__(
        self, app: web.Application, host: str, port: int, limits: ConnectionLimits | None = None
    ) -> None:
        self._app = app
        self._limits = limits or ConnectionLimits()
        self._guard = ConnectionGuard(self._limits)
        app.middlewares.insert(0, self._guard.middleware)
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
            )
            try:
                self._started.set_result(listener.sockets[0].getsockname()[1])
                await self._stop.wait()
            finally:
                listener.close()
        finally:
            await runner.cleanup()
