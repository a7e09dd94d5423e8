"""Thread-safe queues between the media stages, and the stream clock that says when a frame is late.

Lateness is measured in stream time, not in time spent queued. A :class:`StreamClock` maps each video
frame's PTS to the moment it is *due* on the wall clock (the first frame's PTS to the moment the first
frame arrived); a frame is *late* once the latency budget has passed after that. A burst — a whole
segment arriving at once, or decoded at once — is early, not late: its frames are held, and a full
:class:`StageQueue` makes the producer wait (backpressure into the decoder, and from it into the input)
instead of dropping them. A video frame is dropped, and counted by reason, only when:

* ``late``: it is past its deadline and a newer frame waits behind it; or the consumer cannot keep up
  — its recent time per frame is longer than the stream time to the next frame, and it fell more than
  half the budget behind — and the next frame is already due: from then on, as long as it stays slower
  than the stream, it gets the newest due frame and stays close to live. A consumer that only falls
  behind for a while (the machine busy for a moment) catches up within the budget and loses nothing;
* ``overflow``: a put that may not wait finds the queue full of frames that are not late.

The newest waiting frame is never dropped for lateness, so a consumer slower than the budget still
gets frames. ``capacity`` bounds the video frames held. Other items (audio, boundaries, parameter
updates) are never dropped, never make the producer wait, and keep their order relative to the frames.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["DROP_REASONS", "Closed", "StageQueue", "StreamClock"]

T = TypeVar("T")

DROP_REASONS = ("late", "overflow")
"""Why a :class:`StageQueue` drops a video frame (see the module docstring)."""

_TICKS = 90000  # video timestamps are in the MPEG-TS time base (byoc.media.items.TIME_BASE)


class Closed(Exception):
    """The queue was closed and every item in it has been taken."""


class StreamClock:
    """Stream time on the wall clock, for one session's video: when each frame is due.

    The first frame's PTS is anchored to the moment it arrives; a frame is then due at
    ``anchor + (pts - first_pts) / 90000``. When the input itself runs behind that schedule without a
    break for ``resync_s`` — every frame arriving after it was due, as when the source paused or its
    clock drifts — the anchor moves later by the least of those delays, so a shifted input is late only
    until then. A backlog delivered at once (a gateway catching up after a stall) ends with frames that
    are on time again well within ``resync_s``, so its stale frames stay late.

    :attr:`catching_up` tells whether frames arrive much faster than real time (a backlog): then a late
    frame will soon be followed by newer ones. Used from the decoder's thread only.
    """

    def __init__(self, *, resync_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._resync_s = resync_s
        self._anchor: float | None = None
        self._first_pts = 0
        self._behind_since: float | None = None
        self._least_behind = 0.0
        self._last: tuple[float, int] | None = None  # (arrival, pts) of the last frame
        self._pace = 1.0  # recent wall seconds per stream second between arrivals (at most 1 each)

    @property
    def catching_up(self) -> bool:
        """Whether frames recently arrived at more than twice real time."""
        return self._pace < 0.5

    def arrived(self, pts: int) -> float:
        """A frame with timestamp ``pts`` (90 kHz) arrives now: when it is due, on ``clock``."""
        now = self._clock()
        if self._last is not None and pts > self._last[1]:
            pace = min(1.0, (now - self._last[0]) * _TICKS / (pts - self._last[1]))
            self._pace = 0.5 * self._pace + 0.5 * pace  # a stall before a backlog counts as real time
        self._last = (now, pts)
        if self._anchor is None:
            self._anchor, self._first_pts = now, pts
        due = self._anchor + (pts - self._first_pts) / _TICKS
        behind = now - due
        if behind <= 0.0:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since, self._least_behind = now, behind
        else:
            self._least_behind = min(self._least_behind, behind)
            if now - self._behind_since >= self._resync_s:
                self._anchor += self._least_behind
                due += self._least_behind
                self._behind_since = None
        return due


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    droppable: bool
    due: float


class StageQueue(Generic[T]):
    """A bounded hand-off between two threads: bursts are held, stale frames give way to newer ones.

    ``due_of`` gives a video frame's due time on ``clock`` (:meth:`StreamClock.arrived`); without it a
    frame is due when it is put. A frame is late ``budget_s`` after it is due. A producer waiting for room
    waits with ``clock``'s idea of time, so a clock given for tests must not be used with waiting puts.
    """

    def __init__(
        self,
        *,
        capacity: int = 16,
        budget_s: float = 0.5,
        due_of: Callable[[T], float] | None = None,
        on_drop: Callable[[T, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if budget_s < 0:
            raise ValueError("budget_s must be >= 0")
        self._entries: deque[_Entry[T]] = deque()
        self._droppable = 0
        self._capacity = capacity
        self._budget = budget_s
        self._due_of = due_of
        self._on_drop = on_drop
        self._clock = clock
        self._closed = False
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # an item or the end, for the consumer
        self._room = threading.Condition(self._lock)  # room for a frame, or the end, for the producer
        self._waker: Callable[[], None] | None = None
        self._unwoken = False  # items were put with wake=False and the consumer was not woken since
        self._service_s = 0.0  # the consumer's recent time per frame
        self._handed_out_at: float | None = None
        self._warmup = 2  # the first frames also pay for the consumer's start-up (an encoder opening)
        self._behind = False  # the consumer is slower than the stream and fell behind: newest due wins
        self._dropped = dict.fromkeys(DROP_REASONS, 0)

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call ``waker`` (from the putting thread) whenever an item arrives or the queue closes."""
        self._waker = waker

    def put(self, item: T, *, droppable: bool = True, block: bool = True, wake: bool = True) -> None:
        """Add an item. A droppable item (a video frame) first pushes out the late frames before it; if
        the queue still holds ``capacity`` frames, it waits for room (``block``; at most until the oldest
        frame is late) or else pushes out the oldest frame (``overflow``). Other items never wait.
        Raises Closed if the queue is or gets closed.

        With ``wake=False`` a waiting consumer is not woken for this item: it gets it with the next item
        put with ``wake``, at its next :meth:`get`, or at :meth:`wake`. Waking a sleeping thread costs
        more than handing it an item, so items that are not urgent (audio frames between two video
        frames) ride along with the next wake. The producer calls :meth:`wake` before it waits for
        anything else, so no item is held back while it waits."""
        dropped: list[tuple[T, str]] = []
        try:
            with self._lock:
                if self._closed:
                    raise Closed("put() on a closed queue")
                now = self._clock()
                due = now
                if droppable:
                    due = self._due_of(item) if self._due_of is not None else now
                    self._make_room(now, block, dropped)
                self._entries.append(_Entry(item, droppable, due))
                self._droppable += droppable
                if not wake:
                    self._unwoken = True
                    return
                self._unwoken = False
                self._ready.notify()
        finally:
            self._report(dropped)
        if self._waker is not None:
            self._waker()

    def wake(self) -> None:
        """Wake the consumer for the items put with ``wake=False`` since the last wake, if any."""
        with self._lock:
            if not self._unwoken:
                return
            self._unwoken = False
            self._ready.notify()
        if self._waker is not None:
            self._waker()

    def get(self, timeout: float | None = None) -> T:
        """The next item, waiting for one. Raises Closed at the end, TimeoutError on timeout."""
        dropped: list[tuple[T, str]] = []
        try:
            with self._lock:
                self._consumer_back()
                if not self._ready.wait_for(lambda: self._entries or self._closed, timeout):
                    raise TimeoutError
                return self._pop(dropped)
        finally:
            self._report(dropped)

    def get_nowait(self) -> T | None:
        """The next item if one is waiting, else None. Raises Closed at the end."""
        dropped: list[tuple[T, str]] = []
        try:
            with self._lock:
                self._consumer_back()
                return self._pop(dropped) if self._entries or self._closed else None
        finally:
            self._report(dropped)

    def close(self) -> None:
        """No more items: get() returns what is left, then raises Closed; a waiting put raises Closed."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            self._room.notify_all()
        if self._waker is not None:
            self._waker()

    def drop_counts(self) -> dict[str, int]:
        """Video frames dropped so far, by reason (:data:`DROP_REASONS`)."""
        with self._lock:
            return dict(self._dropped)

    @property
    def dropped(self) -> int:
        """Video frames dropped so far, for any reason."""
        with self._lock:
            return sum(self._dropped.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # --- internals (called with the lock held, except _report) ---------------------------------

    def _late(self, entry: _Entry[T], now: float) -> bool:
        return now > entry.due + self._budget

    def _make_room(self, now: float, block: bool, dropped: list[tuple[T, str]]) -> None:
        """Before a new frame goes in: drop the late frames (the new one is newer), then wait for room."""
        while True:
            if any(e.droppable and self._late(e, now) for e in self._entries):
                for entry in [e for e in self._entries if e.droppable and self._late(e, now)]:
                    self._entries.remove(entry)
                    self._droppable -= 1
                    self._dropped["late"] += 1
                    dropped.append((entry.item, "late"))
            if self._droppable < self._capacity:
                return
            if not block:
                entry = next(e for e in self._entries if e.droppable)
                self._entries.remove(entry)
                self._droppable -= 1
                self._dropped["overflow"] += 1
                dropped.append((entry.item, "overflow"))
                return
            oldest = next(e for e in self._entries if e.droppable)
            self._room.wait(timeout=max(0.001, oldest.due + self._budget - now))
            if self._closed:
                raise Closed("put() on a closed queue")
            now = self._clock()

    def _consumer_back(self) -> None:
        """The consumer asks again: it was busy with the last frame since it was handed out."""
        if self._handed_out_at is not None:
            busy = self._clock() - self._handed_out_at
            self._handed_out_at = None
            if self._warmup:
                self._warmup -= 1
                return
            self._service_s = busy if self._service_s == 0.0 else 0.8 * self._service_s + 0.2 * busy

    def _pop(self, dropped: list[tuple[T, str]]) -> T:
        now = self._clock()
        if not self._entries:
            raise Closed("queue closed")
        while True:
            entry = self._entries[0]
            if entry.droppable and self._superseded(entry, now):
                self._entries.popleft()
                self._droppable -= 1
                self._dropped["late"] += 1
                dropped.append((entry.item, "late"))
                self._room.notify_all()
                continue
            self._entries.popleft()
            if entry.droppable:
                self._droppable -= 1
                self._handed_out_at = now
                self._room.notify_all()
            return entry.item

    def _superseded(self, entry: _Entry[T], now: float) -> bool:
        """Whether the frame ``entry`` (the first waiting) gives way to the next frame behind it."""
        following = next((e for e in self._entries if e.droppable and e is not entry), None)
        if following is None:
            return False  # the newest frame is never dropped for lateness
        if self._late(entry, now):
            return True
        if self._service_s <= following.due - entry.due:
            self._behind = False  # it keeps up with the stream (again): it will catch up
            return False
        if now - entry.due > self._budget / 2:
            self._behind = True  # slower than the stream and behind: it cannot catch up by itself
        return self._behind and following.due <= now

    def _report(self, dropped: list[tuple[T, str]]) -> None:
        if self._on_drop is not None:
            for item, reason in dropped:
                self._on_drop(item, reason)
