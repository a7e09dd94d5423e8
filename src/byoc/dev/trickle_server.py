"""An aiohttp trickle server that answers like go-livepeer's, with fault injection for tests.

The reference is go-livepeer's ``trickle/trickle_server.go`` (see docs/protocol.md §4): the same
routes, statuses, headers and bodies, including its odd corners (a re-POST of an open segment appends,
a body read error leaves the segment open, a reset only closes older segments). Where Go would crash a
handler, this server answers ``400 Invalid idx`` instead; each such place says so in a comment.

Everything runs on one event loop. :class:`FaultInjector` cuts, delays or fails requests so client
code can be tested against the failures a real orchestrator produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from byoc.dev.trickle_store import Channel, FaultInjector, Segment
from byoc.trickle.protocol import (
    CLOSED_HEADER,
    CLOSED_VALUE,
    FIRST_BYTE_KEEPALIVE_S,
    LATEST_HEADER,
    RESET_HEADER,
    SEQ_HEADER,
    STATUS_SEQ_MISSING,
)

__all__ = ["FaultInjector", "RequestRecord", "RunningTrickle", "TrickleServer", "serve_trickle"]

logger = logging.getLogger(__name__)

_INT_RE = re.compile(r"[+-]?[0-9]+")
_INT64 = 1 << 63
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BODY_ERRORS = (ConnectionError, HttpProcessingError, asyncio.IncompleteReadError)


def _parse_idx(text: str) -> int | None:
    """Parse a seq like Go's ``strconv.Atoi``: optional sign, ASCII digits, 64-bit range."""
    if _INT_RE.fullmatch(text) is None:
        return None
    value = int(text)
    return value if -_INT64 <= value < _INT64 else None


def _http_error(message: str, status: int) -> web.Response:
    """What Go's ``http.Error`` sends: plain text, the message and a newline."""
    resp = web.Response(status=status, text=message + "\n", content_type="text/plain")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _abort(request: web.BaseRequest) -> None:
    """Drop the connection without finishing the response (flushing what is already queued)."""
    transport = request.transport
    if transport is None:
        return
    if transport.get_write_buffer_size():
        transport.close()
    else:
        transport.abort()


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One handled request, logged as soon as its status is decided.

    ``seq`` is the raw path component (``"next"`` for ``/next``, None for channel-level requests).
    ``status`` is the response status; 0 means a fault aborted the connection before any response.
    ``body_bytes`` counts segment bytes: received for a POST, sent for a GET.

    A GET of a stored or pre-created segment is logged with status 200 and ``body_bytes=0`` the moment
    the segment is found (its status cannot change after that, and a waiting reader is then visibly
    "at the server"); when its response ends, that entry of ``TrickleServer.requests`` is replaced by
    one with the final byte count (and status 0 if a fault cut it before the headers).
    """

    method: str
    channel: str
    seq: str | None
    status: int
    body_bytes: int


class TrickleServer:
    """Trickle channels served under ``base_path`` of an aiohttp application.

    Attributes:
        faults: failures to inject into the next matching requests.
        requests: the last 10 000 handled requests, oldest first (see :class:`RequestRecord`).
        keepalives_sent: interim ``100 Continue`` responses sent to POSTs waiting for their first byte.
    """

    def __init__(
        self,
        *,
        base_path: str = "/ai/trickle/",
        autocreate: bool = False,
        idle_timeout_s: float = 300.0,
        sweep_interval_s: float = 60.0,
        first_byte_keepalive_s: float = FIRST_BYTE_KEEPALIVE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sweep_interval_s <= 0 or first_byte_keepalive_s <= 0:
            raise ValueError("sweep_interval_s and first_byte_keepalive_s must be > 0")
        self.base_path = "/" + base_path.strip("/") + "/" if base_path.strip("/") else "/"
        self._autocreate = autocreate
        self._idle_timeout_s = idle_timeout_s
        self._sweep_interval_s = sweep_interval_s
        self._keepalive_s = first_byte_keepalive_s
        self._clock = clock
        self._channels: dict[str, Channel] = {}
        self.faults = FaultInjector(self._channels)
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)
        self.keepalives_sent = 0
        self._keepalive_sent = asyncio.Condition()
        self._waiters: list[tuple[Callable[[RequestRecord], bool], asyncio.Future[RequestRecord]]] = []

    # --- public API -------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Register the trickle routes, the idle sweeper and the shutdown hooks on ``app``."""
        base = self.base_path
        app.router.add_post(base + "{ch}", self._handle_create)
        app.router.add_get(base + "{ch}/next", self._handle_next)
        app.router.add_get(base + "{ch}/{seq}", self._handle_get)
        app.router.add_post(base + "{ch}/{seq}", self._handle_post)
        app.router.add_delete(base + "{ch}/{seq}", self._handle_delete_seq)
        app.router.add_delete(base + "{ch}", self._handle_delete)
        app.cleanup_ctx.append(self._lifecycle)
        app.on_shutdown.append(self._on_shutdown)

    def create_channel(self, name: str, mime_type: str = "video/MP2T") -> None:
        """Create channel ``name`` (no-op if it exists; its MIME type is kept)."""
        if name not in self._channels:
            self._channels[name] = Channel(name, mime_type, self._clock())
            logger.info("trickle: created channel %s (%s)", name, mime_type)

    def close_channel(self, name: str) -> bool:
        """Close and remove a channel, as ``DELETE`` does; False if it does not exist."""
        channel = self._channels.pop(name, None)
        if channel is None:
            return False
        channel.close()
        logger.info("trickle: deleted channel %s", name)
        return True

    def write_segment(self, name: str, data: bytes) -> bool:
        """Append one whole segment to channel ``name`` from inside the server, as go-livepeer's local
        publisher does for the channels the orchestrator writes itself; False if there is no such channel.
        """
        channel = self._channels.get(name)
        if channel is None:
            return False
        segment = channel.get_for_write(channel.next_write)
        channel.next_write, channel.write_time = segment.idx + 1, self._clock()
        segment.write(data)
        segment.close()
        return True

    def has_channel(self, name: str) -> bool:
        """Whether channel ``name`` exists (created and not yet closed)."""
        return name in self._channels

    def channel_names(self) -> list[str]:
        """The existing channels, in creation order."""
        return list(self._channels)

    def segment_data(self, name: str, seq: int) -> bytes | None:
        """The bytes stored for ``seq`` (``b""`` for a pre-created one), None if not stored."""
        channel = self._channels.get(name)
        segment = channel.stored(seq) if channel is not None else None
        return bytes(segment.data) if segment is not None else None

    def sweep_idle_channels(self) -> list[str]:
        """Close channels whose last write started more than ``idle_timeout_s`` ago (not ``_*``)."""
        now = self._clock()
        idle = [
            name
            for name, channel in self._channels.items()
            if not name.startswith("_") and now - channel.write_time > self._idle_timeout_s
        ]
        for name in idle:
            self.close_channel(name)
            logger.info("trickle: closed idle channel %s", name)
        return idle

    async def wait_for_request(
        self,
        predicate: Callable[[RequestRecord], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> RequestRecord:
        """The first logged request matching ``predicate``, waiting up to ``timeout`` for one."""
        for record in self.requests:
            if predicate(record):
                return record
        future: asyncio.Future[RequestRecord] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.remove(entry)

    async def wait_for_keepalives(self, count: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until ``count`` interim ``100 Continue`` responses were sent in all."""
        async with asyncio.timeout(timeout), self._keepalive_sent:
            await self._keepalive_sent.wait_for(lambda: self.keepalives_sent >= count)

    # --- plumbing ---------------------------------------------------------------------------

    def _record(
        self, method: str, name: str, seq: str | None, status: int, body_bytes: int = 0
    ) -> RequestRecord:
        record = RequestRecord(method, name, seq, status, body_bytes)
        self.requests.append(record)
        logger.debug("trickle: %s %s/%s -> %s (%s bytes)", method, name, seq, status, body_bytes)
        for predicate, future in self._waiters:
            if future.done():
                continue
            try:
                if predicate(record):
                    future.set_result(record)
            except Exception as exc:
                future.set_exception(exc)
        return record

    def _amend(self, record: RequestRecord, status: int, body_bytes: int) -> None:
        """Replace a logged GET record by its final version (searching from the newest entry)."""
        logger.debug(
            "trickle: GET %s/%s ended (%s, %s bytes)", record.channel, record.seq, status, body_bytes
        )
        log = self.requests
        for i in range(len(log) - 1, -1, -1):
            if log[i] is record:
                log[i] = replace(record, status=status, body_bytes=body_bytes)
                return

    def _reply(
        self, request: web.Request, resp: web.StreamResponse, seq: str | None = None
    ) -> web.StreamResponse:
        self._record(request.method, request.match_info["ch"], seq, resp.status)
        return resp

    def _injected_failure(self, request: web.Request, seq: str | None) -> web.StreamResponse | None:
        status = self.faults.take("fail", request.match_info["ch"], request.method)
        if status is None:
            return None
        try:
            phrase = HTTPStatus(int(status)).phrase
        except ValueError:
            phrase = "Injected failure"
        return self._reply(request, _http_error(phrase, int(status)), seq)

    def _close_all(self) -> None:
        for name in list(self._channels):
            self.close_channel(name)

    async def _on_shutdown(self, app: web.Application) -> None:
        self._close_all()  # wakes every handler that waits on a segment

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(self._sweep_loop())
        yield
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        self._close_all()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            self.sweep_idle_channels()

    # --- handlers ---------------------------------------------------------------------------

    async def _handle_create(self, request: web.Request) -> web.StreamResponse:
        if failed := self._injected_failure(request, None):
            return failed
        name = request.match_info["ch"]
        if self._autocreate:
            self.create_channel(name, request.headers.get("Expect-Content", ""))
        if name not in self._channels:
            return self._reply(request, _http_error("Stream not found", 404))
        return self._reply(request, web.Response())

    async def _handle_next(self, request: web.Request) -> web.StreamResponse:
        if failed := self._injected_failure(request, "next"):
            return failed
        channel = self._channels.get(request.match_info["ch"])
        if channel is None:
            return self._reply(request, _http_error("Stream not found", 404), "next")
        resp = web.Response(text=str(channel.next_write), content_type="text/plain")
        resp.headers[LATEST_HEADER] = str(channel.next_write)
        if channel.closed:
            resp.headers[CLOSED_HEADER] = CLOSED_VALUE
        return self._reply(request, resp, "next")

    async def _handle_delete(self, request: web.Request) -> web.StreamResponse:
        if failed := self._injected_failure(request, None):
            return failed
        if not self.close_channel(request.match_info["ch"]):
            return self._reply(request, _http_error("Invalid stream", 400))
        return self._reply(request, web.Response())

    async def _handle_delete_seq(self, request: web.Request) -> web.StreamResponse:
        seq = request.match_info["seq"]
        if failed := self._injected_failure(request, seq):
            return failed
        channel = self._channels.get(request.match_info["ch"])
        if channel is None:
            return self._reply(request, _http_error("Stream not found", 404), seq)
        idx = _parse_idx(seq)
        # Divergence: go-livepeer indexes its ring with a negative slot here and the handler panics.
        if idx is None or idx < 0:
            return self._reply(request, _http_error("Invalid idx", 400), seq)
        segment = channel.stored(idx)
        if segment is None:
            return self._reply(request, _http_error("Nonexistent segment", 400), seq)
        logger.debug("trickle: DELETE closes %s/%s", channel.name, idx)
        segment.close()
        return self._reply(request, web.Response(), seq)

    async def _handle_get(self, request: web.Request) -> web.StreamResponse:
        seq = request.match_info["seq"]
        if failed := self._injected_failure(request, seq):
            return failed
        name = request.match_info["ch"]
        channel = self._channels.get(name)
        if channel is None:
            return self._reply(request, _http_error("Stream not found", 404), seq)
        requested = _parse_idx(seq)
        # Divergence: go-livepeer panics on seqs below -2 (negative ring slot); we answer 400.
        if requested is None or requested < -2:
            return self._reply(request, _http_error("Invalid idx", 400), seq)
        if (delay := self.faults.take("delay", name)) is not None:
            await asyncio.sleep(delay)
        idx = channel.resolve_read(requested)
        segment = channel.get_for_read(idx)
        latest = channel.next_write
        if segment is None:
            # Like Go, Lp-Trickle-Seq echoes the requested seq (-1/-2 unresolved) on this path.
            headers = {LATEST_HEADER: str(latest), SEQ_HEADER: str(requested)}
            if channel.closed:
                headers[CLOSED_HEADER] = CLOSED_VALUE
                resp = web.Response(text="Entry not found", headers=headers)
            else:
                resp = web.Response(
                    status=STATUS_SEQ_MISSING,
                    reason=f"status code {STATUS_SEQ_MISSING}",
                    text="Entry not found",
                    headers=headers,
                )
            return self._reply(request, resp, seq)
        record = self._record(request.method, name, seq, 200)
        return await self._send_segment(request, channel, segment, latest, record)

    async def _send_segment(
        self, request: web.Request, channel: Channel, segment: Segment, latest: int, record: RequestRecord
    ) -> web.StreamResponse:
        """Stream a segment from its first byte; headers go out with the first byte."""
        cut = self.faults.take("cut_get", channel.name)
        limit = -1 if cut is None else int(cut)
        resp: web.StreamResponse | None = None
        pos = sent = 0
        cutting = False
        try:
            while True:
                data, eof = await segment.read(pos)
                pos += len(data)
                if data and resp is None:
                    headers = {SEQ_HEADER: str(segment.idx), "Content-Type": channel.mime_type}
                    if segment.idx != latest:
                        headers[LATEST_HEADER] = str(latest)
                    resp = web.StreamResponse(headers=headers)
                    await resp.prepare(request)
                if limit >= 0 and (eof or sent + len(data) >= limit):
                    data, cutting = data[: limit - sent], True
                if data and resp is not None:
                    await resp.write(data)
                    sent += len(data)
                if cutting or eof:
                    break
        except ConnectionError as exc:
            logger.debug("trickle: GET %s/%s: client went away (%s)", channel.name, segment.idx, exc)
            self._amend(record, 200, sent)
            return resp or web.Response()
        if cutting:  # injected fault: no terminating chunk, the connection just ends
            self._amend(record, 200 if resp else 0, sent)
            _abort(request)
            return resp or web.Response()
        if resp is None:  # the segment ended without data
            headers = {SEQ_HEADER: str(segment.idx), LATEST_HEADER: str(channel.next_write)}
            if channel.closed:
                headers[CLOSED_HEADER] = CLOSED_VALUE
            resp = web.Response(headers=headers)
        self._amend(record, 200, sent)
        return resp

    async def _handle_post(self, request: web.Request) -> web.StreamResponse:
        seq = request.match_info["seq"]
        if failed := self._injected_failure(request, seq):
            return failed
        name = request.match_info["ch"]
        if self._autocreate:
            self.create_channel(name, request.headers.get("Content-Type", ""))
        channel = self._channels.get(name)
        if channel is None:
            resp = _http_error("Stream not found", 404)
            resp.force_close()  # "Connection: close" wakes up pre-connected Go publishers
            return self._reply(request, resp, seq)
        idx = _parse_idx(seq)
        # Divergence: go-livepeer panics on seqs below -1 (negative ring slot); we answer 400.
        if idx is None or idx < -1:
            return self._reply(request, _http_error("Invalid idx", 400), seq)
        segment = channel.get_for_write(channel.next_write if idx == -1 else idx)
        if request.headers.get(RESET_HEADER):
            channel.close_before(segment.idx)
        return await self._receive(request, channel, segment, seq)

    async def _receive(
        self, request: web.Request, channel: Channel, segment: Segment, seq: str
    ) -> web.StreamResponse:
        """Store a POST body into ``segment`` as it arrives; readers see every chunk at once."""
        cut = self.faults.take("cut_post", channel.name)
        limit = -1 if cut is None else int(cut)  # -1: no injected cut
        total = 0
        try:
            chunk = b"" if limit == 0 else await self._first_chunk(request, segment)
            if not chunk and limit != 0 and (limit < 0 or segment.closed):
                # Empty body, or the segment/channel closed before the first byte: Go answers without
                # reading further, closes the segment and still advances next_write.
                channel.next_write, channel.write_time = segment.idx + 1, self._clock()
                resp = web.Response(headers={SEQ_HEADER: str(segment.idx)})
                if channel.closed:
                    resp.headers[CLOSED_HEADER] = CLOSED_VALUE
                resp.force_close()
                segment.close()
                return self._reply(request, resp, seq)
            while chunk:
                if total == 0:  # the first byte moves the write head
                    channel.next_write, channel.write_time = segment.idx + 1, self._clock()
                if 0 <= limit <= total + len(chunk):
                    chunk = chunk[: limit - total]
                segment.write(chunk)
                total += len(chunk)
                if total == limit:
                    break
                chunk = await request.content.readany()
        except _BODY_ERRORS as exc:
            # Like Go: a broken body answers 500 and leaves the segment open.
            logger.debug("trickle: POST %s/%s: body broke after %s bytes (%s)", channel.name, seq, total, exc)
            self._record(request.method, channel.name, seq, 500, total)
            return _http_error("Server error", 500)
        if limit >= 0:  # injected cut: after `limit` bytes, or at the end of a shorter body
            _abort(request)
            self._record(request.method, channel.name, seq, 0, total)
            return web.Response()
        segment.close()
        self._record(request.method, channel.name, seq, 200, total)
        return web.Response(headers={SEQ_HEADER: str(segment.idx)})

    async def _first_chunk(self, request: web.Request, segment: Segment) -> bytes:
        """Wait for the first body bytes (``b""`` if the body is empty or the segment closes first).

        Every ``first_byte_keepalive_s`` without a byte an interim ``100 Continue`` goes out, as Go's
        ``timeoutReader`` does. aiohttp has no API for repeated 1xx responses, so the status line is
        written straight to the transport; the final response follows later on the same connection.
        """
        if segment.closed:
            return b""
        read = asyncio.ensure_future(request.content.readany())
        closed = asyncio.ensure_future(segment.wait_closed())
        try:
            while True:
                done, _ = await asyncio.wait(
                    (read, closed), timeout=self._keepalive_s, return_when=asyncio.FIRST_COMPLETED
                )
                if read in done:
                    return read.result()
                if closed in done:
                    return b""
                transport = request.transport
                if request.version >= (1, 1) and transport is not None and not transport.is_closing():
                    logger.debug("trickle: POST %s: no body byte yet, sent 100 Continue", request.path)
                    transport.write(_CONTINUE)
                    self.keepalives_sent += 1
                    async with self._keepalive_sent:
                        self._keepalive_sent.notify_all()
        finally:
            closed.cancel()
            if not read.done():
                read.cancel()
            elif not read.cancelled():
                read.exception()  # retrieved, so asyncio does not warn about it


@dataclass(frozen=True, slots=True)
class RunningTrickle:
    """A trickle server listening on loopback."""

    server: TrickleServer
    base_url: str
    port: int


@contextlib.asynccontextmanager
async def serve_trickle(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    base_path: str = "/ai/trickle/",
    autocreate: bool = False,
    idle_timeout_s: float = 300.0,
    sweep_interval_s: float = 60.0,
    first_byte_keepalive_s: float = FIRST_BYTE_KEEPALIVE_S,
    clock: Callable[[], float] = time.monotonic,
    shutdown_timeout_s: float = 2.0,
) -> AsyncIterator[RunningTrickle]:
    """Run a :class:`TrickleServer` on ``host:port`` (0 = any free port) for the ``async with`` body.

    On exit every channel is closed first, so handlers that wait on segments finish; POSTs still
    streaming a body are cancelled after ``shutdown_timeout_s``.
    """
    server = TrickleServer(
        base_path=base_path,
        autocreate=autocreate,
        idle_timeout_s=idle_timeout_s,
        sweep_interval_s=sweep_interval_s,
        first_byte_keepalive_s=first_byte_keepalive_s,
        clock=clock,
    )
    app = web.Application()
    server.add_routes(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        netloc = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        yield RunningTrickle(server, f"http://{netloc}{server.base_path}", bound)
    finally:
        server._close_all()
        await runner.cleanup()
