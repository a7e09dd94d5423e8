"""Trickle over blocking sockets, for the threads that decode and encode a session's media.

A session's media bytes cross the network on the thread that uses them: the decoder's demuxer reads
a :class:`BlockingSubscriber` and the encoder's muxer writes a :class:`BlockingPublisher`, so no event
loop stands between a codec and its socket (docs/architecture.md, "Media I/O"). They follow the same
protocol, decision for decision, as the asyncio :class:`~byoc.trickle.subscriber.TrickleSubscriber`
and :class:`~byoc.trickle.publisher.TricklePublisher` (what a status means, when to retry, where the
live edge is: :mod:`byoc.trickle.protocol`); only the I/O differs:

* the subscriber pre-connects the next seq's GET on a second connection while it reads a segment,
  re-issues a GET that waits longer than ``preconnect_refresh_s`` for its first byte, and reads a body
  that broke off again from where it broke;
* the publisher pre-connects the next seq's POST (its headers sent, its body not yet), retries a seq
  only while none of it was sent, notices a server that answered before the body ended, and DELETEs a
  seq that broke after some bytes.

Either may be shut from another thread: :meth:`BlockingSubscriber.close` and
:meth:`BlockingPublisher.cut` shut down every socket it holds, so that a read, a write or a backoff in
progress returns at once.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping

from multidict import CIMultiDict

from byoc.errors import ChannelClosed, RetriesExhausted, TrickleError
from byoc.trickle.client import TrickleClientSettings
from byoc.trickle.protocol import (
    SEQ_CURRENT,
    Accepted,
    ChannelEnded,
    Gone,
    JumpToLatest,
    PostOutcome,
    Retry,
    RetryState,
    SegmentReady,
    classify_get,
    classify_post,
    deleted_after_last,
    post_failure,
    segment_url,
    terminal_get_error,
    terminal_post_error,
)
from byoc.trickle.publisher import PublisherStatistics, SegmentLoss
from byoc.trickle.subscriber import SubscriberCounters, SubscriberStatistics

__all__ = ["BlockingPublisher", "BlockingSubscriber"]

log = logging.getLogger(__name__)

_TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
_READ_BYTES = 64 * 1024
_INTERIM_LIMIT = 4096  # an interim answer (100 Continue) is a status line and a few headers
_NO_FAILURES = RetryState()  # frozen: one serves every request that has not failed yet
_EARLY_ANSWER_S = 0.05
"""How long a POST that was not pre-connected waits for an early refusal before its body starts."""


class _Connections:
    """The HTTP/1.1 connections of one client to one host; :meth:`shut` ends them from any thread."""

    def __init__(self, url: str, settings: TrickleClientSettings) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._context = ssl.create_default_context()
            if not settings.verify_tls:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self._connect_timeout_s = settings.connect_timeout_s
        self._lock = threading.Lock()
        self._live: set[http.client.HTTPConnection] = set()
        self._idle: http.client.HTTPConnection | None = None
        self.shut_down = threading.Event()

    def request(
        self, method: str, url: str, headers: Mapping[str, str], *, body_follows: bool = False
    ) -> http.client.HTTPConnection:
        """A connection (the idle one if it is still open) with ``method url`` sent on it: the whole
        request, or only its headers when ``body_follows`` (a chunked body the caller sends)."""
        with self._lock:
            connection, self._idle = self._idle, None
        if connection is None or connection.sock is None:
            connection = self._connect()
        path = url[len(self._origin) :] if url.startswith(self._origin) else ""
        if not path.startswith("/") or "#" in path:  # not the channel's own form: parse it
            target = urllib.parse.urlsplit(url)
            path = target.path + (f"?{target.query}" if target.query else "")
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            if body_follows:
                connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
        except BaseException:
            self.discard(connection)
            raise
        return connection

    def _connect(self) -> http.client.HTTPConnection:
        if self.shut_down.is_set():
            raise ConnectionAbortedError("the connection was shut down")
        connection: http.client.HTTPConnection
        if self._context is not None:
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._connect_timeout_s, context=self._context
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout_s)
        with self._lock:
            self._live.add(connection)
        connection.connect()
        if self.shut_down.is_set():  # shut while it connected
            self.discard(connection)
            raise ConnectionAbortedError("the connection was shut down")
        sock = connection.sock
        assert sock is not None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def reuse(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """``response`` was read to its end: keep its connection for the next request if it may be."""
        response.close()  # a body of known length read to its end stays "open" until closed
        if response.will_close or self.shut_down.is_set():
            self.discard(connection)
            return
        with self._lock:
            previous, self._idle = self._idle, connection
        if previous is not None:
            self.discard(previous)

    def discard(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._live.discard(connection)
        connection.close()

    def shut(self) -> None:
        """Shut down every connection: what blocks on one returns (with an error or an end) at once."""
        self.shut_down.set()
        with self._lock:
            connections = list(self._live)
        for connection in connections:
            sock = connection.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Shut and close every connection (on the thread that uses them: closing a connection while
        another thread reads its response is not safe in http.client)."""
        self.shut()
        with self._lock:
            connections, self._live, self._idle = list(self._live), set(), None
        for connection in connections:
            connection.close()


def _set_timeout(connection: http.client.HTTPConnection, seconds: float | None) -> None:
    if connection.sock is not None:
        connection.sock.settimeout(seconds)


def _delete(connections: _Connections, url: str, timeout_s: float) -> int:
    """``DELETE url`` on ``connections``, waiting ``timeout_s`` for the answer; its status."""
    connection = connections.request("DELETE", url, {})
    _set_timeout(connection, timeout_s)
    response = connection.getresponse()
    response.read()
    connections.reuse(connection, response)
    return response.status


def _headers(response: http.client.HTTPResponse) -> CIMultiDict[str]:
    return CIMultiDict(response.getheaders())


class BlockingSubscriber:
    """Reads the segments of one trickle channel in order, on the calling thread::

    while (seq := subscriber.next_segment()) is not None:
        while data := subscriber.read():
            ...
    """

    def __init__(
        self,
        url: str,
        *,
        settings: TrickleClientSettings | None = None,
        start_seq: int = SEQ_CURRENT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if start_seq < SEQ_CURRENT:
            raise ValueError(f"start_seq must be >= {SEQ_CURRENT}, got {start_seq}")
        self.url = url
        self.settings = settings or TrickleClientSettings()
        self._clock = clock
        self._connections = _Connections(url, self.settings)
        self._seq = start_seq
        self._ended = False
        self._closed = False
        self._reading: tuple[int, http.client.HTTPConnection, http.client.HTTPResponse] | None = None
        self._received = 0  # bytes of the segment being read
        self._last_whole = False  # the last segment arrived whole (see deleted_after_last)
        self._preconnect: tuple[int, http.client.HTTPConnection] | None = None
        self._failure: TrickleError | None = None  # a re-read that failed: raised by next_segment()
        self._behind = 0
        self._counts = SubscriberCounters()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def behind(self) -> int:
        """How many segments the server had begun after the last one opened and the one after it
        (pre-connected), when it answered that segment's GET: 0 at the live edge."""
        return self._behind

    def statistics(self) -> SubscriberStatistics:
        return self._counts.snapshot()

    def close(self) -> None:
        """Stop (from any thread): what the reader waits for ends, and it reads nothing more."""
        self._closed = self._ended = True
        self._connections.shut()

    def next_segment(self) -> int | None:
        """Open the next segment: its seq, or None at the end of the channel (or once closed).
        Raises ChannelGone on 404, RetriesExhausted when the retries are spent."""
        self._release()
        try:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            got = None if self._ended else self._get()
        except BaseException:
            self._connections.close()
            raise
        self._last_whole = False
        if got is None:
            self._connections.close()
            return None
        seq, connection, response = got
        self._seq = seq + 1
        self._counts.segments += 1
        self._reading, self._received = (seq, connection, response), 0
        return seq

    def read(self) -> bytes:
        """More of the current segment, as it arrives; b"" at its end. A body that breaks off is read
        again from where it broke (a restart); the segment ends there if that seq is gone."""
        while self._reading is not None:
            seq, connection, response = self._reading
            try:
                data = response.read1(_READ_BYTES)
            except (*_TRANSPORT_ERRORS, ValueError) as exc:
                if self.closed:
                    self._release()
                    return b""
                log.info("segment %s of %s broke off after %d bytes: %r", seq, self.url, self._received, exc)
                self._release()
                try:
                    got = self._get(again=seq)
                except TrickleError as exc:
                    self._failure = exc  # the segment ends here; next_segment() raises it
                    return b""
                if got is None:
                    return b""
                self._counts.restarts += 1
                skip = self._received
                self._reading = (seq, got[1], got[2])
                if skip:
                    self._skip(skip)
                continue
            if not data:
                self._reading = None
                self._last_whole = True
                self._connections.reuse(connection, response)
                return b""
            self._received += len(data)
            self._counts.bytes += len(data)
            return data
        return b""

    def _skip(self, count: int) -> None:
        """Read and drop ``count`` bytes of the restarted body (those already read before it broke)."""
        assert self._reading is not None
        response = self._reading[2]
        while count > 0:
            data = response.read1(min(count, _READ_BYTES))
            if not data:
                return
            count -= len(data)

    def _release(self) -> None:
        if self._reading is not None:
            _, connection, _ = self._reading
            self._reading = None
            self._connections.discard(connection)

    def _backoff(self, state: RetryState, reason: str) -> RetryState:
        state, delay = self.settings.retry.after_failure(state, self._clock())
        if delay is None:
            self._ended = True
            raise RetriesExhausted(f"giving up after {state.failures} failures, last: {reason}", url=self.url)
        self._counts.retries += 1
        log.info("%s: retrying in %.2fs (%s)", self.url, delay, reason)
        self._connections.shut_down.wait(delay)
        return state

    def _issue(self, seq: int) -> http.client.HTTPConnection:
        return self._connections.request("GET", segment_url(self.url, seq), {})

    def _open(self, seq: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Wait for the headers of ``GET seq`` (pre-connected, or sent now), re-issuing the request
        every refresh period while no first byte comes."""
        if self._preconnect is not None and self._preconnect[0] == seq:
            connection = self._preconnect[1]
        else:
            self._drop_preconnect()
            connection = self._issue(seq)
        self._preconnect = None
        while True:
            _set_timeout(connection, self.settings.preconnect_refresh_s)
            try:
                response = connection.getresponse()
            except TimeoutError:
                self._connections.discard(connection)
                if self.closed:
                    raise
                self._counts.refreshes += 1
                log.debug(
                    "%s/%d: no first byte after %.0fs, re-issuing the GET",
                    self.url,
                    seq,
                    self.settings.preconnect_refresh_s,
                )
                connection = self._issue(seq)
                continue
            except BaseException:
                self._connections.discard(connection)
                raise
            _set_timeout(connection, self.settings.idle_read_timeout_s)
            return connection, response

    def _drop_preconnect(self) -> None:
        if self._preconnect is not None:
            self._connections.discard(self._preconnect[1])
            self._preconnect = None

    def _get(
        self, *, again: int | None = None
    ) -> tuple[int, http.client.HTTPConnection, http.client.HTTPResponse] | None:
        """The GET loop of :meth:`TrickleSubscriber._get <byoc.trickle.subscriber.TrickleSubscriber>`,
        blocking: the seq that answered with its connection and response (the next seq
        pre-connected), or None at the end of the channel or when the seq to read again is lost."""
        state = _NO_FAILURES
        if again is not None:
            self._drop_preconnect()
        while True:
            if self.closed:
                self._ended = True
                return None
            seq = self._seq if again is None else again
            what = f"GET seq {seq}" if again is None else f"re-GET seq {seq}"
            try:
                connection, response = self._open(seq)
            except _TRANSPORT_ERRORS as exc:
                if self._connections.shut_down.is_set():
                    continue  # closed meanwhile
                state = self._backoff(state, f"{what}: {exc!r}")
                continue
            outcome = deleted_after_last(
                classify_get(response.status, _headers(response), seq), again is None and self._last_whole
            )
            if isinstance(outcome, SegmentReady) and again in (None, outcome.seq):
                latest = outcome.latest
                self._behind = 0 if latest is None else max(0, latest - outcome.seq - 2)
                self._start_preconnect(outcome.seq + 1)
                return outcome.seq, connection, response
            self._connections.discard(connection)
            if isinstance(outcome, SegmentReady):
                return None  # another seq answered: the one to read again is gone
            if isinstance(outcome, JumpToLatest) and (again is not None or outcome.latest != seq):
                log.info("%s: seq %d is gone, jumping to the live edge %d", self.url, seq, outcome.latest)
                self._counts.jumped(self._seq, outcome.latest)
                self._seq = outcome.latest
                if again is None:
                    continue
                return None
            if isinstance(outcome, JumpToLatest | Retry):
                state = self._backoff(state, f"{what}: {outcome}")
                continue
            self._ended = True
            terminal_get_error(outcome, self.url)
            log.debug("%s: end of stream", self.url)
            return None

    def _start_preconnect(self, seq: int) -> None:
        try:
            self._preconnect = (seq, self._issue(seq))
        except _TRANSPORT_ERRORS as exc:  # the GET is sent again when the seq is due
            log.debug("%s: pre-connecting seq %d failed: %r", self.url, seq, exc)


class _Post:
    """One POST for one seq: its headers sent early, its chunked body sent as it is written."""

    def __init__(self, seq: int, connection: http.client.HTTPConnection | None) -> None:
        self.seq = seq
        self.connection = connection
        self.sent = 0
        self.status: int | None = None
        """The status of the answer; None while there is none (or the last attempt got none)."""
        self.outcome: PostOutcome | None = None
        """Set once the server answered (possibly early, while the body was still being sent)."""


class BlockingPublisher:
    """Writes the segments of one trickle channel from the calling thread: :meth:`open`,
    :meth:`write` as often as needed, :meth:`finish` (or :meth:`abort`), for each segment.

    The same contract as :class:`~byoc.trickle.publisher.PublishSegment`: ``finish`` returns None
    once the server stored the segment, else how it was lost (:data:`SegmentLoss`), and raises
    ChannelGone / ChannelClosed when the channel is over, RetriesExhausted when none of the segment
    could be sent.
    """

    def __init__(
        self,
        url: str,
        *,
        mime_type: str = "video/mp2t",
        settings: TrickleClientSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.mime_type = mime_type
        self.settings = settings or TrickleClientSettings()
        self._clock = clock
        self._connections = _Connections(url, self.settings)
        self._seq = 0
        self._post: _Post | None = None  # the segment being written
        self._next: _Post | None = None  # pre-connected for the next seq
        self._broken_open = False  # the current segment ended early: the rest of it is dropped
        self._closed = False
        self._segments = self._bytes = self._broken = self._retries = 0

    def statistics(self) -> PublisherStatistics:
        return PublisherStatistics(self._segments, self._bytes, self._broken, self._retries, self._seq)

    # --- one segment ----------------------------------------------------------------------------

    def open(self) -> None:
        """Start a segment (on the POST pre-connected for its seq, if there is one)."""
        if self._closed or self._connections.shut_down.is_set():
            raise ChannelClosed("publisher is closed", url=self.url)
        post = self._next if self._next is not None and self._next.seq == self._seq else None
        self._next = None
        if post is None:
            post = _Post(self._seq, None)
            post.connection = self._attempt(post)  # write() tries again if that failed
        self._post = post
        self._broken_open = False
        self._seq += 1
        self._next = self._preconnect(self._seq)

    def write(self, data: bytes) -> None:
        """Send ``data`` as the next part of the segment's body (dropped once the segment broke)."""
        post = self._post
        if post is None:
            raise RuntimeError("write() on a segment that is not open")
        if self._broken_open or not data:
            return
        state = _NO_FAILURES
        while True:
            if post.connection is None:
                post.connection = self._attempt(post)
            if post.connection is not None:
                if self._answered_early(post):
                    self._read_early_answer(post)
                    if post.sent > 0 or not isinstance(post.outcome, Accepted | Retry):
                        self._broken_open = True  # finish() raises or says how it was lost
                        return
                    if isinstance(post.outcome, Accepted):  # closed before a byte was written
                        log.info("%s: seq %d was closed before it was written; skipped", self.url, post.seq)
                        self._drop_next()
                        post.seq, post.outcome, post.status = self._seq, None, None
                        self._seq += 1
                        continue
                    state = self._retry_unsent(post, state)
                    continue
                if self._send(post, b"%x\r\n%s\r\n" % (len(data), data)):
                    post.sent += len(data)
                    return
            assert isinstance(post.outcome, Retry | None)
            if post.sent > 0 or self._connections.shut_down.is_set():
                self._broken_open = True  # finish() says how it was lost
                return
            state = self._retry_unsent(post, state)

    def finish(self) -> SegmentLoss | None:
        """End the segment and wait for the server's answer; see the class docstring."""
        post, self._post = self._post, None
        if post is None:
            return None
        if post.outcome is None and post.connection is not None:
            post.outcome = self._final_answer(post)
        elif post.outcome is None:  # nothing was ever written: an empty segment
            post.outcome = self._post_empty(post)
        return self._settle(post, post.outcome)

    def abort(self) -> None:
        """Give the segment up: a partly sent seq is DELETEd, an unsent one is reused."""
        post, self._post = self._post, None
        if post is None:
            return
        if post.sent == 0:
            self._unsent(post)
            return
        self._drop(post)
        self._broken += 1
        self._delete_seq(post.seq)

    # --- the channel ----------------------------------------------------------------------------

    def cut(self) -> None:
        """From any thread: what is in progress ends now with an error, and nothing more is sent."""
        self._connections.shut()

    def close(self, timeout_s: float | None = None) -> None:
        """End the channel: DELETE it so readers see the end of the stream (waiting at most
        ``timeout_s``, default ``response_timeout_s``), and shut every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._connections.shut()
        deadline = self.settings.response_timeout_s if timeout_s is None else timeout_s
        fresh = _Connections(self.url, self.settings)
        try:
            status = _delete(fresh, self.url, max(0.01, deadline))
            if status not in (200, 400, 404):
                log.info("%s: DELETE answered %d", self.url, status)
        except _TRANSPORT_ERRORS as exc:
            log.info("%s: DELETE failed: %r", self.url, exc)
        finally:
            fresh.close()

    # --- internals ------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Content-Type": self.mime_type}

    def _preconnect(self, seq: int) -> _Post:
        post = _Post(seq, None)
        with contextlib.suppress(*_TRANSPORT_ERRORS):  # tried again when the seq is written
            post.connection = self._connections.request(
                "POST", segment_url(self.url, seq), self._headers(), body_follows=True
            )
        return post

    def _attempt(self, post: _Post) -> http.client.HTTPConnection | None:
        """Send the headers of a POST that was not pre-connected (the first, or one tried again: none
        of its body was sent), and give the server a moment to refuse it before the body starts, as a
        pre-connected POST has; None with ``post.outcome`` set when that failed."""
        try:
            connection = self._connections.request(
                "POST", segment_url(self.url, post.seq), self._headers(), body_follows=True
            )
        except _TRANSPORT_ERRORS as exc:
            post.outcome = Retry(f"POST seq {post.seq}: {exc!r}")
            return None
        with contextlib.suppress(OSError, ValueError):
            select.select([connection.sock], [], [], _EARLY_ANSWER_S)
        return connection

    def _retry_unsent(self, post: _Post, state: RetryState) -> RetryState:
        """Back off before POSTing a seq again whose body has not started (raises when the retries
        are spent or the channel is over)."""
        outcome = post.outcome
        assert outcome is not None
        terminal_post_error(outcome, self.url)
        state, delay = self.settings.retry.after_failure(state, self._clock())
        if delay is None:
            self._unsent(post)
            failure = post_failure(post.status, 0, outcome)
            raise RetriesExhausted(f"seq {post.seq} could not be opened: {failure}", url=self.url)
        self._retries += 1
        log.info("%s: %s; retrying the same seq in %.2fs (nothing was sent)", self.url, outcome, delay)
        self._connections.shut_down.wait(delay)
        post.outcome, post.status = None, None
        return state

    def _send(self, post: _Post, data: bytes) -> bool:
        """Send ``data`` on the POST's connection; False (the connection dropped, ``post.outcome`` set)
        when that failed."""
        sock = post.connection.sock if post.connection is not None else None
        try:
            if sock is None:
                raise ConnectionAbortedError("the connection was closed")
            sock.sendall(data)
        except _TRANSPORT_ERRORS as exc:
            self._drop(post)
            post.outcome = Retry(f"POST seq {post.seq}: {exc!r}")
            return False
        return True

    def _answered_early(self, post: _Post) -> bool:
        """Whether the server answered ``post`` before its body ended (interim 100s are skipped)."""
        sock = post.connection.sock if post.connection is not None else None
        if sock is None:
            return True
        while True:
            try:
                if not select.select([sock], [], [], 0)[0]:
                    return False
                head = sock.recv(_INTERIM_LIMIT, socket.MSG_PEEK)
            except (OSError, ValueError):
                return True
            end = head.find(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 1") or end < 0:
                return True
            sock.recv(end + 4)  # an interim answer: drop it

    def _read_early_answer(self, post: _Post) -> None:
        """The server answered while the body was being sent: read the answer (raises when the
        channel is over); the rest of the segment cannot follow on this request."""
        post.outcome = self._read_answer(post, body_ended=False)
        if isinstance(post.outcome, Gone | ChannelEnded):
            terminal_post_error(post.outcome, self.url)
        if post.sent > 0:
            log.info(
                "%s: seq %d ended early (%s); dropping the rest of it",
                self.url,
                post.seq,
                post_failure(post.status, post.sent, post.outcome),
            )

    def _final_answer(self, post: _Post) -> PostOutcome:
        if not self._send(post, b"0\r\n\r\n"):
            assert post.outcome is not None
            return post.outcome
        return self._read_answer(post, body_ended=True)

    def _read_answer(self, post: _Post, *, body_ended: bool) -> PostOutcome:
        """The server's answer to ``post``; its connection serves again only if the request was
        complete (after an early answer, the server would read the next request as body)."""
        connection = post.connection
        assert connection is not None
        _set_timeout(connection, self.settings.response_timeout_s)
        try:
            response = connection.getresponse()
            response.read()
        except TimeoutError:
            self._drop(post)
            return Retry(f"no answer to POST seq {post.seq}")
        except _TRANSPORT_ERRORS as exc:
            self._drop(post)
            return Retry(f"POST seq {post.seq}: {exc!r}")
        post.status = response.status
        if body_ended:
            self._connections.reuse(connection, response)
            post.connection = None
        else:
            self._drop(post)
        return classify_post(response.status, _headers(response))

    def _post_empty(self, post: _Post) -> PostOutcome:
        state = _NO_FAILURES
        while True:
            if post.connection is None:
                post.connection = self._attempt(post)
            if post.connection is not None:
                outcome = self._final_answer(post)
                if not isinstance(outcome, Retry):
                    return outcome
                post.outcome = outcome
            state = self._retry_unsent(post, state)

    def _settle(self, post: _Post, outcome: PostOutcome) -> SegmentLoss | None:
        if isinstance(outcome, Accepted):
            self._segments += 1
            self._bytes += post.sent
            return None
        terminal_post_error(outcome, self.url)
        if isinstance(outcome, Retry) and post.sent == 0:
            self._unsent(post)
            raise RetriesExhausted(f"seq {post.seq}: {outcome.reason}", url=self.url)
        self._broken += 1
        loss: SegmentLoss = "broken" if post.status is None else "refused"
        failure = post_failure(post.status, post.sent, outcome)
        log.warning("%s: seq %d is lost: %s", self.url, post.seq, failure)
        self._delete_seq(post.seq)
        return loss

    def _unsent(self, post: _Post) -> None:
        """Nothing of ``post`` reached the server: its seq serves the next segment (no gap that
        readers would wait on until the server evicts it)."""
        self._drop(post)
        self._drop_next()
        self._post = None
        self._seq = post.seq

    def _drop(self, post: _Post) -> None:
        if post.connection is not None:
            self._connections.discard(post.connection)
            post.connection = None

    def _drop_next(self) -> None:
        if self._next is not None:
            self._drop(self._next)
            self._next = None

    def _delete_seq(self, seq: int) -> None:
        """DELETE a seq that broke after some bytes, so that its readers are released."""
        if self._connections.shut_down.is_set():
            return
        try:
            status = _delete(self._connections, segment_url(self.url, seq), self.settings.response_timeout_s)
            log.debug("%s: DELETE seq %d -> %d", self.url, seq, status)
        except _TRANSPORT_ERRORS as exc:
            log.debug("%s: DELETE seq %d failed: %r", self.url, seq, exc)
