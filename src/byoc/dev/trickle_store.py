"""State of the in-process trickle server, without I/O: channels, segments and armed faults.

Mirrors the data model of go-livepeer's ``trickle/trickle_server.go``: a channel keeps a ring of
``RETENTION`` segments (slot ``seq % RETENTION``), a ``next_write`` pointer that follows the first
byte of the latest upload, and the time of that first byte for idle sweeping. Everything runs on one
event loop, so no locks are needed; readers wait on an :class:`asyncio.Event` that is replaced on
every change.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from byoc.trickle.protocol import RETENTION

__all__ = ["Channel", "FaultInjector", "FaultKind", "Segment"]


class Segment:
    """One segment: an append-only buffer that readers follow until it is closed."""

    __slots__ = ("_changed", "closed", "data", "idx")

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.data = bytearray()
        self.closed = False
        self._changed = asyncio.Event()

    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` and wake readers.

        Like go-livepeer, a write after :meth:`close` still appends: readers that already saw the end
        keep their result, fresh readers get everything.
        """
        self.data += chunk
        self._notify()

    def close(self) -> None:
        """Mark the segment complete; waiting readers get the end of the segment."""
        if not self.closed:
            self.closed = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def read(self, pos: int) -> tuple[bytes, bool]:
        """Wait for bytes past ``pos`` or for the close; return the new bytes and whether it ended."""
        while len(self.data) <= pos and not self.closed:
            await self._changed.wait()
        with memoryview(self.data) as view:
            chunk = bytes(view[pos:])
        return chunk, self.closed

    async def wait_closed(self) -> None:
        """Return once the segment is closed."""
        while not self.closed:
            await self._changed.wait()


class Channel:
    """A named channel: the segment ring plus the write pointer."""

    __slots__ = ("closed", "mime_type", "name", "next_write", "segments", "write_time")

    def __init__(self, name: str, mime_type: str, now: float) -> None:
        self.name = name
        self.mime_type = mime_type
        self.segments: list[Segment | None] = [None] * RETENTION
        self.next_write = 0
        self.write_time = now
        self.closed = False

    def stored(self, idx: int) -> Segment | None:
        """The segment ``idx`` if the ring still holds it."""
        if idx < 0:
            return None
        segment = self.segments[idx % RETENTION]
        return segment if segment is not None and segment.idx == idx else None

    def get_for_write(self, idx: int) -> Segment:
        """The segment a POST to ``idx`` (already resolved, >= 0) writes into.

        The same idx reuses the stored segment (so a re-POST appends); another idx in the slot is
        closed and replaced.
        """
        slot = idx % RETENTION
        segment = self.segments[slot]
        if segment is not None:
            if segment.idx == idx:
                return segment
            segment.close()
        segment = Segment(idx)
        self.segments[slot] = segment
        return segment

    def resolve_read(self, idx: int) -> int:
        """Resolve the relative read seqs: -1 is ``next_write``, -2 the one before it (or 0)."""
        if idx == -1:
            return self.next_write
        if idx == -2:
            return max(self.next_write - 1, 0)
        return idx

    def get_for_read(self, idx: int) -> Segment | None:
        """The segment a GET of ``idx`` (resolved, >= 0) reads, pre-creating it when it is next.

        A reader may wait on ``next_write`` (or on 1 while nothing was written) before the publisher
        starts it, unless the channel is closed.
        """
        segment = self.stored(idx)
        if (
            segment is None
            and not self.closed
            and (idx == self.next_write or (self.next_write == 0 and idx == 1))
        ):
            segment = Segment(idx)
            self.segments[idx % RETENTION] = segment
        return segment

    def close_before(self, idx: int) -> None:
        """Close every stored segment older than ``idx`` (``Lp-Trickle-Reset``); they stay stored."""
        for segment in self.segments:
            if segment is not None and segment.idx < idx:
                segment.close()

    def evict(self, idx: int) -> bool:
        """Close and drop segment ``idx``; False if the ring does not hold it."""
        segment = self.stored(idx)
        if segment is None:
            return False
        segment.close()
        self.segments[idx % RETENTION] = None
        return True

    def close(self) -> None:
        """Close all segments (waking their readers), empty the ring and mark the channel closed."""
        for segment in self.segments:
            if segment is not None:
                segment.close()
        self.segments = [None] * RETENTION
        self.closed = True


FaultKind = Literal["cut_get", "cut_post", "delay", "fail"]


@dataclass(slots=True)
class _Rule:
    channel: str | None
    remaining: int
    value: float  # bytes for cuts, seconds for delays, the status for failures
    method: str | None = None


def _check(count: int, value: float, what: str) -> None:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")


class FaultInjector:
    """Failures to inject into the next matching requests; ``channel=None`` matches every channel."""

    def __init__(self, channels: dict[str, Channel]) -> None:
        self._channels = channels
        self._rules: dict[FaultKind, list[_Rule]] = {"cut_get": [], "cut_post": [], "delay": [], "fail": []}

    def cut_get(self, channel: str | None = None, *, after_bytes: int, count: int = 1) -> None:
        """Abort GET responses once ``after_bytes`` segment bytes were sent, or when the segment ends
        first. Headers go out with the first byte as usual; the last chunk never does."""
        _check(count, after_bytes, "after_bytes")
        self._rules["cut_get"].append(_Rule(channel, count, after_bytes))

    def cut_post(self, channel: str | None = None, *, after_bytes: int, count: int = 1) -> None:
        """Abort POSTs once ``after_bytes`` body bytes were received (or when the body ends first).

        No response is sent. The bytes received stay in the segment, which is left open, as after a
        real connection loss; ``after_bytes=0`` aborts before the first byte is awaited.
        """
        _check(count, after_bytes, "after_bytes")
        self._rules["cut_post"].append(_Rule(channel, count, after_bytes))

    def delay_first_byte(self, channel: str | None = None, *, seconds: float, count: int = 1) -> None:
        """Hold segment GETs for ``seconds`` before they look up the segment (so before the headers).

        The channel is already resolved when the delay starts: a DELETE during the delay makes the
        GET answer for a closed channel, like the race window in go-livepeer.
        """
        _check(count, seconds, "seconds")
        self._rules["delay"].append(_Rule(channel, count, seconds))

    def fail_next(
        self, n: int, *, status: int = 503, method: str | None = None, channel: str | None = None
    ) -> None:
        """Answer the next ``n`` matching requests (any route) with ``status`` and a plain-text body."""
        if not 100 <= status <= 599:
            raise ValueError(f"not an HTTP status: {status}")
        if n > 0:
            self._rules["fail"].append(_Rule(channel, n, status, method and method.upper()))

    def evict(self, channel: str, seq: int) -> bool:
        """Close and drop a stored segment now, as retention would; False if it is not stored."""
        found = self._channels.get(channel)
        return found is not None and found.evict(seq)

    def pending(self) -> int:
        """How many rule uses are still armed (0 once every injected fault has fired)."""
        return sum(rule.remaining for rules in self._rules.values() for rule in rules)

    def clear(self) -> None:
        """Disarm every rule."""
        for rules in self._rules.values():
            rules.clear()

    def take(self, kind: FaultKind, channel: str, method: str | None = None) -> float | None:
        """Used by the server: consume one use of the first matching rule and return its value."""
        rules = self._rules[kind]
        for rule in rules:
            if rule.channel in (None, channel) and rule.method in (None, method):
                rule.remaining -= 1
                if rule.remaining <= 0:
                    rules.remove(rule)
                return rule.value
        return None
