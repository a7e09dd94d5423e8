"""Trickle publisher: one segment per write context, its body streamed as it is written.

::

    publisher = TricklePublisher(url, session=session, mime_type="video/mp2t")
    async with publisher.segment() as segment:
        await segment.write(first_bytes)     # leaves at once, before the segment is complete
        await segment.write(more_bytes)
    await publisher.close()                  # DELETE: readers see the end of the stream

The POST for the next seq is opened while the current one is written (pre-connect). A seq is retried
only if zero bytes of it were sent; a segment cut after some bytes is never POSTed again (the server
would append to it): the publisher DELETEs that seq so readers are released, and moves on. Such a
segment is lost, and :meth:`PublishSegment.finish` says how (:data:`SegmentLoss`): ``refused`` when the
server answered the POST with an error status (it may not have read a byte of it), ``broken`` when the
connection failed or no answer came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp

from byoc.errors import ChannelClosed, ChannelGone, RetriesExhausted
from byoc.trickle.client import TrickleClientSettings
from byoc.trickle.protocol import (
    RESET_HEADER,
    SEQ_NEXT,
    Accepted,
    ChannelEnded,
    Gone,
    PostOutcome,
    Retry,
    RetryState,
    classify_post,
    next_url,
    post_failure,
    segment_url,
    terminal_post_error,
)

__all__ = ["PublishSegment", "PublisherStatistics", "SegmentLoss", "TricklePublisher"]

log = logging.getLogger(__name__)

_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
_HIGH_WATER_BYTES = 8 * 1024 * 1024

SegmentLoss = Literal["refused", "broken"]
"""Why a segment whose upload had started did not reach the server whole."""


@dataclass(frozen=True, slots=True)
class PublisherStatistics:
    """Counters of one publisher."""

    segments: int
    bytes: int
    broken_segments: int
    retries: int
    next_seq: int


class _BodyFeed:
    """The bytes of one segment, consumed by at most one live request body at a time."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._finished = False
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._generation = 0
        self.buffered = 0
        self.sent = 0

    def put(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER_BYTES:
            self._drained.clear()
        self._wakeup.set()

    def finish(self) -> None:
        self._finished = True
        self._wakeup.set()

    async def wait_drained(self) -> None:
        await self._drained.wait()

    def stop_readers(self) -> None:
        """Make any live body generator end at its next step."""
        self._generation += 1
        self._wakeup.set()

    def reader(self) -> AsyncIterator[bytes]:
        """A request body; a newer reader makes older ones stop without consuming anything."""
        self.stop_readers()
        return self._read(self._generation)

    def _take_all(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    async def _read(self, generation: int) -> AsyncIterator[bytes]:
        yield b""  # an empty write sends the request headers now: the server sees the POST early
        while generation == self._generation:
            if self._chunks:
                chunk = self._chunks.popleft() if len(self._chunks) == 1 else self._take_all()
                self.buffered -= len(chunk)
                self.sent += len(chunk)
                if self.buffered <= _HIGH_WATER_BYTES:
                    self._drained.set()
                yield chunk
            elif self._finished:
                return
            else:
                self._wakeup.clear()
                await self._wakeup.wait()


class _PendingPost:
    """One POST for one seq: opened early, fed by a segment, retried only while nothing was sent."""

    def __init__(self, publisher: TricklePublisher, seq: int, *, reset: bool) -> None:
        self.seq = seq
        self.feed = _BodyFeed()
        self.status: int | None = None
        """The status of the last answer; None when the last attempt got none (a transport error)."""
        self._publisher = publisher
        self._headers = {"Content-Type": publisher.mime_type}
        if reset:
            self._headers[RESET_HEADER] = "1"
        self.task = asyncio.create_task(self._run(), name=f"trickle-post {publisher.url} {seq}")
        publisher._track(self.task)

    async def _run(self) -> PostOutcome:
        pub = self._publisher
        url = segment_url(pub.url, self.seq)
        state = RetryState()
        while True:
            self.status = None
            try:
                async with pub._session.post(
                    url, data=self.feed.reader(), headers=self._headers, allow_redirects=False
                ) as response:
                    await response.read()
                    self.status = response.status
                    outcome = classify_post(response.status, response.headers)
            except _TRANSPORT_ERRORS as exc:
                outcome = Retry(f"POST seq {self.seq}: {exc!r}")
            finally:
                self.feed.stop_readers()
            if not isinstance(outcome, Retry) or self.feed.sent > 0:
                return outcome
            state, delay = pub.settings.retry.after_failure(state, pub._clock())
            if delay is None:
                return outcome
            pub._retries += 1
            log.info(
                "%s: %s; retrying the same seq in %.2fs (nothing was sent)", pub.url, outcome.reason, delay
            )
            await asyncio.sleep(delay)

    async def cancel(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class PublishSegment:
    """The write side of one segment; use through ``async with publisher.segment()``."""

    def __init__(self, publisher: TricklePublisher) -> None:
        self._publisher = publisher
        self._post: _PendingPost | None = None
        self._broken = False
        self.seq = -1

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.finish()
        else:
            await self.abort()

    async def open(self) -> None:
        """Start the segment (takes the pre-connected POST for the next seq)."""
        self._post = await self._publisher._begin_segment()
        self.seq = self._post.seq

    async def write(self, data: bytes) -> None:
        """Queue bytes for the segment; they are sent as soon as the connection takes them."""
        post = self._post
        if post is None:
            raise RuntimeError("write() on a segment that is not open")
        if post.task.done():
            self._check_early_end(post)
        if self._broken or not data:
            return
        post.feed.put(bytes(data))
        if post.feed.buffered > _HIGH_WATER_BYTES:
            await post.feed.wait_drained()

    async def finish(self) -> SegmentLoss | None:
        """End the segment and wait for the server to confirm it; None once it is stored, else how it
        was lost (raises when the channel is over, or when none of it could be sent)."""
        post, self._post = self._post, None
        if post is None:
            return None
        post.feed.finish()
        try:
            async with asyncio.timeout(self._publisher.settings.response_timeout_s):
                outcome = await asyncio.shield(post.task)
        except TimeoutError:
            outcome = Retry(f"no answer to POST seq {post.seq}")
            await post.cancel()
            post.status = None
        return await self._publisher._settle(post, outcome)

    async def abort(self) -> None:
        """Give the segment up: a partly sent seq is DELETEd, an unsent one is reused."""
        post, self._post = self._post, None
        if post is not None:
            await self._publisher._abandon(post)

    def _check_early_end(self, post: _PendingPost) -> None:
        """The POST ended while the segment is still being written."""
        outcome = post.task.result()
        if isinstance(outcome, Gone):
            raise ChannelGone("trickle channel not found", url=self._publisher.url)
        if isinstance(outcome, ChannelEnded):
            raise ChannelClosed("trickle channel closed", url=self._publisher.url)
        if not self._broken:
            self._broken = True
            log.info(
                "%s: seq %d ended early (%s); dropping the rest of it",
                self._publisher.url,
                post.seq,
                _answer(post, outcome),
            )


class TricklePublisher:
    """Writes the segments of one trickle channel."""

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession,
        mime_type: str = "video/mp2t",
        start_seq: int = 0,
        reset: bool = False,
        delete_broken_segments: bool = True,
        settings: TrickleClientSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if start_seq < SEQ_NEXT:
            raise ValueError(f"start_seq must be >= {SEQ_NEXT}, got {start_seq}")
        self.url = url
        self.mime_type = mime_type
        self.settings = settings or TrickleClientSettings()
        self._session = session
        self._clock = clock
        self._seq = start_seq
        self._reset = reset
        self._delete_broken = delete_broken_segments
        self._next: _PendingPost | None = None
        self._requests: set[asyncio.Task[Any]] = set()
        """Every request still running on its own: POSTs (pre-connected or carrying a segment) and the
        DELETEs of abandoned seqs. close() ends them."""
        self._closed = False
        self._segments = self._bytes = self._broken = self._retries = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def segment(self) -> PublishSegment:
        """A context for one segment: bytes written inside it form one segment."""
        return PublishSegment(self)

    async def write_segment(self, data: bytes) -> None:
        """Publish ``data`` as one whole segment."""
        async with self.segment() as segment:
            await segment.write(data)

    async def resume(self) -> int:
        """Continue a live channel where it is: ask the server for its next write position."""
        state = RetryState()
        while True:
            try:
                async with self._session.get(next_url(self.url), allow_redirects=False) as response:
                    text = await response.text()
                    status = response.status
            except _TRANSPORT_ERRORS as exc:
                status, text = 0, repr(exc)
            if status == 404:
                raise ChannelGone("trickle channel not found", url=self.url)
            if status == 200 and text.strip().isdigit():
                await self._drop_next()
                self._seq = int(text)
                return self._seq
            state, delay = self.settings.retry.after_failure(state, self._clock())
            if delay is None:
                raise RetriesExhausted(f"cannot read the next seq: {status} {text[:80]}", url=self.url)
            await asyncio.sleep(delay)

    def statistics(self) -> PublisherStatistics:
        return PublisherStatistics(self._segments, self._bytes, self._broken, self._retries, self._seq)

    async def close(self) -> None:
        """End the channel: DELETE it so readers see the end of the stream, and end every upload
        still running (one the server never answers would otherwise wait for ever). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(self.settings.response_timeout_s):
                async with self._session.delete(self.url, allow_redirects=False) as response:
                    if response.status not in (200, 400, 404):
                        log.info("%s: DELETE answered %d", self.url, response.status)
        except _TRANSPORT_ERRORS as exc:
            log.info("%s: DELETE failed: %r", self.url, exc)
        finally:
            await self._drop_next()
            requests = list(self._requests)
            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)

    # --- internals ------------------------------------------------------------------------------

    async def _begin_segment(self) -> _PendingPost:
        if self._closed:
            raise ChannelClosed("publisher is closed", url=self.url)
        if self._seq == SEQ_NEXT:
            await self.resume()
        while True:
            post = self._next if self._next is not None and self._next.seq == self._seq else None
            if post is None:
                await self._drop_next()
                post = _PendingPost(self, self._seq, reset=self._reset)
            self._next = None
            self._reset = False
            self._seq = post.seq + 1
            if not post.task.done():
                break
            # The pre-connected POST ended before it got data.
            outcome = post.task.result()
            if isinstance(outcome, Accepted):
                log.info("%s: seq %d was closed before it was written; skipping it", self.url, post.seq)
                continue
            self._raise_terminal(outcome)
            self._seq = post.seq  # nothing of it was sent: the next segment uses it
            failure = _answer(post, outcome)
            raise RetriesExhausted(f"seq {post.seq} could not be opened: {failure}", url=self.url)
        self._next = _PendingPost(self, self._seq, reset=False)
        return post

    async def _settle(self, post: _PendingPost, outcome: PostOutcome) -> SegmentLoss | None:
        """Account for a finished segment: None if it was stored, else how it was lost; raise if the
        channel is over or nothing of the segment was sent."""
        if isinstance(outcome, Accepted):
            self._segments += 1
            self._bytes += post.feed.sent
            return None
        self._raise_terminal(outcome)
        if isinstance(outcome, Retry) and post.feed.sent == 0:
            await self._drop_next()
            self._seq = post.seq  # nothing of it was sent: the next segment uses it
            raise RetriesExhausted(f"seq {post.seq}: {outcome.reason}", url=self.url)
        self._broken += 1
        loss: SegmentLoss = "broken" if post.status is None else "refused"
        log.warning("%s: seq %d is lost: %s", self.url, post.seq, _answer(post, outcome))
        if self._delete_broken:
            await self._delete_seq(post.seq)
        return loss

    def _raise_terminal(self, outcome: PostOutcome) -> None:
        terminal_post_error(outcome, self.url)

    async def _abandon(self, post: _PendingPost) -> None:
        """The segment's writer failed: never leave a half-written seq open."""
        await post.cancel()
        if post.feed.sent == 0:
            # Nothing reached the server: the same seq serves the next segment.
            await self._drop_next()
            self._seq = post.seq
            return
        self._broken += 1
        if self._delete_broken:
            # Not awaited: a writer that gives up (often because it is being cancelled) must not wait
            # for a server that may never answer.
            self._track(asyncio.create_task(self._delete_seq(post.seq), name=f"trickle-delete {self.url}"))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _delete_seq(self, seq: int) -> None:
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            async with asyncio.timeout(self.settings.response_timeout_s):
                url = segment_url(self.url, seq)
                async with self._session.delete(url, allow_redirects=False) as response:
                    log.debug("%s: DELETE seq %d -> %d", self.url, seq, response.status)

    async def _drop_next(self) -> None:
        if self._next is not None:
            post, self._next = self._next, None
            await post.cancel()


def _answer(post: _PendingPost, outcome: PostOutcome) -> str:
    return post_failure(post.status, post.feed.sent, outcome)
