"""Trickle subscriber: async iteration over the segments of a channel, each streamed as it arrives.

::

    async with TrickleSubscriber(url, session=session) as sub:
        async for segment in sub:
            async for chunk in segment:
                ...

The subscriber starts at seq -2 (the segment being written, from its first byte), follows
``Lp-Trickle-Seq + 1``, pre-connects the next segment, jumps to the live edge on 470, ends cleanly on
``Lp-Trickle-Closed`` and raises :class:`~byoc.errors.ChannelGone` on 404. If a body breaks off, the
same seq is read again from its first byte; the bytes already delivered are skipped, so the consumer
sees the segment continue, and ``segment.restarts`` tells it that this happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiohttp

from byoc.errors import RetriesExhausted
from byoc.trickle.client import TrickleClientSettings
from byoc.trickle.protocol import (
    SEQ_CURRENT,
    ChannelEnded,
    GetOutcome,
    JumpToLatest,
    Retry,
    RetryState,
    SegmentReady,
    classify_get,
    deleted_after_last,
    segment_url,
    terminal_get_error,
)

__all__ = ["SubscribedSegment", "SubscriberStatistics", "TrickleSubscriber"]

log = logging.getLogger(__name__)

_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class SubscriberStatistics:
    """Counters of one subscriber."""

    segments: int
    bytes: int
    jumps: int
    retries: int
    restarts: int
    refreshes: int
    skipped: int = 0
    """Seqs jumped over: the server no longer had them when the reader asked (it fell behind the
    channel's retention), so they were never read."""


@dataclass(slots=True)
class SubscriberCounters:
    """What a subscriber counts as it reads (the asyncio one here and the blocking one alike)."""

    segments: int = 0
    bytes: int = 0
    jumps: int = 0
    retries: int = 0
    restarts: int = 0
    refreshes: int = 0
    skipped: int = 0

    def jumped(self, seq: int, latest: int) -> None:
        """A 470 moved the reader from ``seq``, the next it was to read, to the live edge ``latest``."""
        self.jumps += 1
        self.skipped += max(0, latest - seq)

    def snapshot(self) -> SubscriberStatistics:
        return SubscriberStatistics(
            self.segments, self.bytes, self.jumps, self.retries, self.restarts, self.refreshes, self.skipped
        )


class SubscribedSegment:
    """One segment being received. Iterate it for its bytes as they arrive."""

    def __init__(self, owner: TrickleSubscriber, seq: int, response: aiohttp.ClientResponse) -> None:
        self.seq = seq
        self.restarts = 0
        """How many times the body broke off and the seq was read again."""
        self.complete = False
        """True once the body ended normally; False if it was lost (evicted, channel ended)."""
        self.received = 0
        self._owner = owner
        self._response: aiohttp.ClientResponse | None = response

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The segment's bytes, as they arrive."""
        skip = 0
        while self._response is not None:
            try:  # a silence longer than idle_read_timeout_s raises (aiohttp's sock_read timeout)
                chunk = await self._response.content.readany()
            except _TRANSPORT_ERRORS as exc:
                log.info(
                    "segment %s of %s broke off after %d bytes: %r",
                    self.seq,
                    self._owner.url,
                    self.received,
                    exc,
                )
                self._release()
                self._response = await self._owner._reopen(self.seq)
                if self._response is None:
                    return
                self.restarts += 1
                self._owner._counts.restarts += 1
                skip = self.received
                continue
            if not chunk:
                self.complete = True
                self._release()
                return
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk = chunk[skip:]
                skip = 0
            self.received += len(chunk)
            self._owner._counts.bytes += len(chunk)
            yield chunk

    async def read(self) -> bytes:
        """The whole segment (waits until it is complete)."""
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    def _release(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None


class TrickleSubscriber:
    """Reads the segments of one trickle channel in order."""

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession,
        start_seq: int = SEQ_CURRENT,
        settings: TrickleClientSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if start_seq < SEQ_CURRENT:
            raise ValueError(f"start_seq must be >= {SEQ_CURRENT}, got {start_seq}")
        self.url = url
        self.settings = settings or TrickleClientSettings()
        self._session = session
        self._clock = clock
        self._seq = start_seq
        self._ended = False
        self._current: SubscribedSegment | None = None
        self._last_whole = False  # the last segment arrived whole (see deleted_after_last)
        self._preconnect: tuple[int, asyncio.Task[aiohttp.ClientResponse]] | None = None
        self._counts = SubscriberCounters()
        # No total timeout: a GET may wait long for its first byte (the refresh above bounds that);
        # once a body flows, a gap longer than idle_read_timeout_s means the connection is dead.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.settings.connect_timeout_s,
            sock_read=self.settings.idle_read_timeout_s,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[SubscribedSegment]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SubscribedSegment]:
        while (segment := await self.next_segment()) is not None:
            yield segment

    @property
    def ended(self) -> bool:
        """True once the channel reported its end (or the subscriber was closed)."""
        return self._ended

    def statistics(self) -> SubscriberStatistics:
        return self._counts.snapshot()

    async def next_segment(self) -> SubscribedSegment | None:
        """The next segment, or None at the end of the stream. Raises ChannelGone on 404."""
        self._last_whole = self._current is not None and self._current.complete
        if self._current is not None:
            self._current._release()
            self._current = None
        if self._ended:
            return None
        got = await self._get()
        if got is None:
            return None
        seq, response = got
        self._seq = seq + 1
        self._counts.segments += 1
        self._current = SubscribedSegment(self, seq, response)
        return self._current

    async def aclose(self) -> None:
        """Stop: abandon the current segment and any pre-connected request."""
        self._ended = True
        if self._current is not None:
            self._current._release()
            self._current = None
        await self._cancel_preconnect()

    # --- internals ------------------------------------------------------------------------------

    def _finish(self, outcome: GetOutcome) -> None:
        """Handle a terminal outcome: end of stream returns, 404 and fatal statuses raise."""
        self._ended = True
        terminal_get_error(outcome, self.url)
        assert isinstance(outcome, ChannelEnded)
        log.debug("%s: end of stream", self.url)

    async def _backoff(self, state: RetryState, reason: str) -> RetryState:
        state, delay = self.settings.retry.after_failure(state, self._clock())
        if delay is None:
            self._ended = True
            raise RetriesExhausted(f"giving up after {state.failures} failures, last: {reason}", url=self.url)
        self._counts.retries += 1
        log.info("%s: retrying in %.2fs (%s)", self.url, delay, reason)
        await asyncio.sleep(delay)
        return state

    async def _response_for(self, seq: int) -> aiohttp.ClientResponse:
        if self._preconnect is not None:
            pre_seq, task = self._preconnect
            self._preconnect = None
            if pre_seq == seq:
                return await task
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return await self._open(seq)

    async def _open(self, seq: int) -> aiohttp.ClientResponse:
        """GET one seq and wait for its headers, re-issuing the request every refresh period."""
        url = segment_url(self.url, seq)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.preconnect_refresh_s) as timeout:
                    return await self._session.get(url, timeout=self._timeout, allow_redirects=False)
            if not timeout.expired():
                raise TimeoutError(f"connect timeout for {url}")
            self._counts.refreshes += 1
            log.debug(
                "%s: no first byte after %.0fs, re-issuing the GET", url, self.settings.preconnect_refresh_s
            )

    def _start_preconnect(self, seq: int) -> None:
        task = asyncio.create_task(self._open(seq), name=f"trickle-preconnect {self.url} {seq}")
        self._preconnect = (seq, task)

    async def _cancel_preconnect(self) -> None:
        if self._preconnect is None:
            return
        _, task = self._preconnect
        self._preconnect = None
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        if isinstance(results[0], aiohttp.ClientResponse):
            results[0].close()

    async def _reopen(self, seq: int) -> aiohttp.ClientResponse | None:
        """After a broken body: GET the same seq again. None when the segment is lost."""
        await self._cancel_preconnect()
        got = await self._get(again=seq)
        return None if got is None else got[1]

    async def _get(self, *, again: int | None = None) -> tuple[int, aiohttp.ClientResponse] | None:
        """The one GET loop, for the next segment or (``again``) a segment whose body broke off.

        Transport errors and retryable statuses are retried with the policy's backoff (raising
        RetriesExhausted when it gives up). A 470 moves to the live edge; one that names the seq
        asked for is retried, unless that seq is being read again (then it was evicted). Returns the
        seq that answered and its response, with the following seq pre-connected, or None: at the
        end of the channel (404 and fatal statuses raise), or when the segment to read again is lost.
        """
        state = RetryState()
        while True:
            seq = self._seq if again is None else again
            what = f"GET seq {seq}" if again is None else f"re-GET seq {seq}"
            try:
                response = await self._response_for(seq)
            except _TRANSPORT_ERRORS as exc:
                state = await self._backoff(state, f"{what}: {exc!r}")
                continue
            outcome = deleted_after_last(
                classify_get(response.status, response.headers, seq), again is None and self._last_whole
            )
            if isinstance(outcome, SegmentReady) and again in (None, outcome.seq):
                self._start_preconnect(outcome.seq + 1)
                return outcome.seq, response
            response.close()
            if isinstance(outcome, SegmentReady):  # another seq answered: the one to read again is gone
                return None
            if isinstance(outcome, JumpToLatest) and (again is not None or outcome.latest != seq):
                log.info("%s: seq %d is gone, jumping to the live edge %d", self.url, seq, outcome.latest)
                self._counts.jumped(self._seq, outcome.latest)
                self._seq = outcome.latest
                if again is None:
                    continue
                return None  # the segment being read again is lost
            if isinstance(outcome, JumpToLatest | Retry):
                state = await self._backoff(state, f"{what}: {outcome}")
                continue
            self._finish(outcome)
            return None
