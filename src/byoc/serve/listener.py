"""The listener process: it owns the API's listening sockets, answers ``GET /health`` itself and hands
every other connection to the runtime.

Every thread of the runtime's process takes turns at one interpreter lock; with many sessions a
request waits for it several times, so ``/health`` took tens of milliseconds at the 99th percentile
however little it computed. This process holds no media and no lock anyone else wants: it answers
from the last state the runtime sent it (:class:`byoc.serve.handoff.ListenerProcess` sends one at
least every 100 ms and after every request that could change it). When the runtime has sent nothing
for ``stale_after_s``, it answers the runtime's ERROR answer instead: an interpreter that stopped
running is not healthy.

A connection is read until its request line is complete. ``GET /health`` without a body is answered
here, as often as the connection asks; the first request that is anything else sends the connection
itself (its descriptor, over a Unix socket, with the bytes read so far) to the runtime, which serves
it from then on as if it had accepted it. Connections waiting here are idle ones: at the cap the
oldest makes way, and one that sends no complete request within the header timeout is closed.

Run by :class:`~byoc.serve.handoff.ListenerProcess` as a script, so that it imports the standard
library only (no byoc package, no numpy, no aiohttp: about 20 MB resident)::

    python -I .../byoc/serve/listener.py --link-fd N --listen-fd FD [--listen-fd FD ...]
        --max-connections C --header-timeout-s T --log-level L --log-format F

It ends when the runtime closes its end of the link (or exits). It imports nothing from byoc; the
runtime's side imports :class:`HealthAnswer` and :class:`AcceptErrorLog` from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACCEPT_BACKLOG",
    "BUFFER_BYTES",
    "HEALTH_PATH",
    "AcceptErrorLog",
    "HealthAnswer",
    "ListenerOptions",
    "is_health_request",
    "main",
    "serve",
]

log = logging.getLogger("byoc.serve.listener")

ACCEPT_BACKLOG = 64
"""The listening socket's backlog. asyncio accepts up to this many connections at once before any of
them is admitted or evicts another, so the API's connection cap leaves room for twice as many
descriptors (byoc.serve.connections)."""

HEALTH_PATH = "/health"
_HEALTH_TARGET = HEALTH_PATH.encode()
BUFFER_BYTES = 16 * 1024
"""Bytes read from a connection before it is decided: a request line (and, for ``/health``, the
headers) longer than this goes to the runtime, which refuses it with its own answer."""
_DRAIN_POLL_S = 0.005


@dataclass(frozen=True, slots=True)
class HealthAnswer:
    """What the runtime last sent: its ``/health`` answer, the one for when it stops reporting, and
    when (``time.monotonic()``, the same clock in both processes)."""

    status: int
    body: dict[str, Any]
    stale_status: int
    stale_body: dict[str, Any]
    at: float
    stale_after_s: float

    @classmethod
    def decode(cls, message: bytes) -> HealthAnswer:
        fields = json.loads(message)
        return cls(
            fields["status"],
            fields["body"],
            fields["stale_status"],
            fields["stale_body"],
            fields["at"],
            fields["stale_after_s"],
        )

    def encode(self) -> bytes:
        return json.dumps(
            {
                "status": self.status,
                "body": self.body,
                "stale_status": self.stale_status,
                "stale_body": self.stale_body,
                "at": self.at,
                "stale_after_s": self.stale_after_s,
            }
        ).encode()

    def current(self, now: float) -> tuple[int, dict[str, Any]]:
        """The answer at ``now``: the runtime's, its uptime carried forward, or the stale one."""
        age = now - self.at
        status, body = (self.status, self.body) if age <= self.stale_after_s else self.stale
        if "uptime_s" in body:
            body = {**body, "uptime_s": round(body["uptime_s"] + max(0.0, age), 3)}
        return status, body

    @property
    def stale(self) -> tuple[int, dict[str, Any]]:
        return self.stale_status, self.stale_body


@dataclass(frozen=True, slots=True)
class ListenerOptions:
    max_connections: int
    """Connections waiting here at once; at the cap the oldest is closed for a new one."""
    header_timeout_s: float
    """How long a connection may wait here without completing a request."""


def is_health_request(head: bytes) -> bool | None:
    """Whether the request at the start of ``head`` is one this process answers: ``GET /health``
    (a query allowed) over HTTP/1.0 or 1.1. None while its request line is incomplete."""
    end = head.find(b"\r\n")
    if end < 0:
        return None
    parts = head[:end].split(b" ")
    if len(parts) != 3:
        return False
    method, target, version = parts
    path = target.partition(b"?")[0]
    return method == b"GET" and path == _HEALTH_TARGET and version in (b"HTTP/1.1", b"HTTP/1.0")


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """Every header of ``head`` (the request line first), names and values in lower case."""
    fields = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.strip().lower(), value.strip().lower()))
    return fields


def _has_body(fields: list[tuple[bytes, bytes]]) -> bool:
    """Whether any header announces a body (every Content-Length counts, not only the last)."""
    for name, value in fields:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def _response(status: int, body: dict[str, Any], keep_alive: bool) -> bytes:
    payload = json.dumps(body).encode()
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Unknown")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(payload)}",
    ]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class _Listener:
    """The process's state: the runtime's last answer, the link to it, the connections waiting."""

    def __init__(self, link: socket.socket, options: ListenerOptions) -> None:
        self.link = link
        self.options = options
        self.answer: HealthAnswer | None = None
        self.clients: dict[_Client, None] = {}  # oldest first
        self.gone = asyncio.Event()
        self.handed = 0

    def read_link(self) -> None:
        """Take every message the runtime sent; the latest answer wins. An empty read: it is gone."""
        while True:
            try:
                message = self.link.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self.gone.set()
                return
            try:
                self.answer = HealthAnswer.decode(message)
            except (ValueError, KeyError, TypeError):
                log.error("an unreadable message from the runtime (%d bytes) was ignored", len(message))

    def health(self) -> tuple[int, dict[str, Any]]:
        self.read_link()  # whatever the runtime sent before this request was read is in the answer
        if self.answer is None:
            return 503, {"status": "loading", "state": "LOADING"}
        return self.answer.current(time.monotonic())

    def admit(self, client: _Client) -> None:
        while len(self.clients) >= self.options.max_connections:
            oldest = next(iter(self.clients))
            self.release(oldest)
            oldest.close()
        self.clients[client] = None

    def touch(self, client: _Client) -> None:
        self.clients.pop(client, None)
        self.clients[client] = None

    def release(self, client: _Client) -> None:
        self.clients.pop(client, None)

    def hand_off(self, sock: socket.socket, read: bytes) -> None:
        """Send the connection and what was read from it to the runtime (if it cannot take it, the
        connection is closed with this process's descriptor)."""
        try:
            socket.send_fds(self.link, [read], [sock.fileno()])
        except OSError as exc:
            log.error("could not hand a connection to the runtime (%s); it is closed", exc)
            return
        self.handed += 1


class _Client(asyncio.BufferedProtocol):
    """One connection, until it is handed off or closed."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._buffer = bytearray(BUFFER_BYTES)
        self._filled = 0
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._listener.admit(self)
        self._arm()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        self._advance()

    def eof_received(self) -> bool:
        return False  # the client is done sending: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._listener.release(self)
        if self._timer is not None:
            self._timer.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._listener.options.header_timeout_s, self.close)

    def _advance(self) -> None:
        while not self._done and self._filled:
            read = bytes(self._buffer[: self._filled])
            full = self._filled == len(self._buffer)
            health = is_health_request(read)
            if health is None:
                if full:
                    self._hand_off(read)
                return
            if not health:
                self._hand_off(read)
                return
            end = read.find(b"\r\n\r\n")
            if end < 0:
                if full:
                    self._hand_off(read)
                return
            head = read[:end]
            fields = _headers(head)
            if _has_body(fields):
                self._hand_off(read)  # a body: not a request this process reads
                return
            rest = read[end + 4 :]
            self._buffer[: len(rest)] = rest
            self._filled = len(rest)
            self._answer(head, fields)

    def _answer(self, head: bytes, fields: list[tuple[bytes, bytes]]) -> None:
        assert self._transport is not None
        http_10 = head[: head.find(b"\r\n")].endswith(b"HTTP/1.0")
        connection = next((value for name, value in fields if name == b"connection"), b"")
        keep_alive = connection == b"keep-alive" if http_10 else connection != b"close"
        status, body = self._listener.health()
        self._transport.write(_response(status, body, keep_alive))
        if keep_alive:
            self._listener.touch(self)
            self._arm()
        else:
            self._done = True
            self._transport.close()

    def _hand_off(self, read: bytes) -> None:
        """Send the connection over once the answers written here have left (the runtime's must not
        overtake them); this process's descriptor is closed, the runtime's keeps the connection."""
        transport = self._transport
        assert transport is not None
        if not self._done:
            self._done = True
            transport.pause_reading()
        if transport.is_closing():
            return
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(_DRAIN_POLL_S, self._hand_off, read)
            return
        if self._timer is not None:
            self._timer.cancel()
        self._listener.hand_off(transport.get_extra_info("socket"), read)
        transport.abort()


class AcceptErrorLog:
    """An event loop exception handler that logs failed ``accept()`` calls at most once an interval.

    Every other exception goes to the loop's default handler.
    """

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept()"):
            loop.default_exception_handler(context)
            return
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        exc = context.get("exception")
        log.error(
            "the API cannot accept connections: %s (%d more such failures not logged in the last %.0f s)",
            exc,
            self._suppressed,
            self._interval,
        )
        self._last = now
        self._suppressed = 0


async def serve(link: socket.socket, listening: Sequence[socket.socket], options: ListenerOptions) -> None:
    """Accept on ``listening`` until the runtime closes ``link``."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLog())
    link.setblocking(False)
    listener = _Listener(link, options)
    loop.add_reader(link.fileno(), listener.read_link)
    servers = [
        await loop.create_server(lambda: _Client(listener), sock=sock, backlog=ACCEPT_BACKLOG)
        for sock in listening
    ]
    try:
        await listener.gone.wait()
    finally:
        loop.remove_reader(link.fileno())
        for server in servers:
            server.close()
        for client in list(listener.clients):
            client.close()
    log.debug("the runtime closed the link: %d connections handed to it", listener.handed)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m byoc.serve.listener", description=__doc__)
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, action="append", required=True)
    parser.add_argument("--max-connections", type=int, required=True)
    parser.add_argument("--header-timeout-s", type=float, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parser.parse_args(argv)
    # a terminal's Ctrl-C reaches the whole process group: the runtime drains, and this process
    # keeps answering until the runtime closes the link
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format=args.log_format)
    link = socket.socket(fileno=args.link_fd)
    listening = [socket.socket(fileno=fd) for fd in args.listen_fd]
    asyncio.run(serve(link, listening, ListenerOptions(args.max_connections, args.header_timeout_s)))


if __name__ == "__main__":
    main()
