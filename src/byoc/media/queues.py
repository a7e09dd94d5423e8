"""Thread-safe queues between the media stages.

Live video never queues up. When the consumer takes a frame, a :class:`StageQueue` skips it if a newer
frame is already waiting and the frame would be older than ``max_age_s`` by the time the consumer is
done with it (its age plus the consumer's recent time per frame): a consumer slower than the input
always gets the newest frame. A consumer that keeps up loses nothing, not even in a burst (a whole
segment arriving at once, the decoder flushing at the end of a stream). ``capacity`` bounds the memory
held in any case: past it, the oldest frame is dropped. Other items (audio, boundaries, parameter
updates) are never dropped and keep their order relative to the frames.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Closed", "StageQueue"]

T = TypeVar("T")


class Closed(Exception):
    """The queue was closed and every item in it has been taken."""


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    droppable: bool
    enqueued_at: float


class StageQueue(Generic[T]):
    """A bounded hand-off between two threads where the newest video frame wins."""

    def __init__(
        self,
        *,
        capacity: int = 16,
        max_age_s: float = 0.1,
        on_drop: Callable[[T], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._entries: deque[_Entry[T]] = deque()
        self._droppable = 0
        self._capacity = capacity
        self._max_age = max_age_s
        self._on_drop = on_drop
        self._clock = clock
        self._closed = False
        self._cond = threading.Condition()
        self._waker: Callable[[], None] | None = None
        self._service_s = 0.0  # the consumer's recent time per frame
        self._handed_out_at: float | None = None
        self._warmup = 2  # the first frames also pay for the consumer's start-up (an encoder opening)
        self.dropped = 0

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call ``waker`` (from the putting thread) whenever an item arrives or the queue closes."""
        self._waker = waker

    def put(self, item: T, *, droppable: bool = True) -> None:
        """Add an item; never blocks. A droppable item (a video frame) may push out an older one."""
        dropped: list[T] = []
        with self._cond:
            if self._closed:
                raise Closed("put() on a closed queue")
            if droppable and self._droppable >= self._capacity:
                dropped.append(self._remove_oldest_droppable())
            self._entries.append(_Entry(item, droppable, self._clock()))
            self._droppable += droppable
            self._cond.notify()
        self._after(dropped)

    def get(self, timeout: float | None = None) -> T:
        """The next item, waiting for one. Raises Closed at the end, TimeoutError on timeout."""
        dropped: list[T] = []
        with self._cond:
            self._consumer_back()
            if not self._cond.wait_for(lambda: self._entries or self._closed, timeout):
                raise TimeoutError
            try:
                return self._pop(dropped)
            finally:
                self._report(dropped)

    def get_nowait(self) -> T | None:
        """The next item if one is waiting, else None. Raises Closed at the end."""
        dropped: list[T] = []
        with self._cond:
            self._consumer_back()
            try:
                return self._pop(dropped) if self._entries or self._closed else None
            finally:
                self._report(dropped)

    def close(self) -> None:
        """No more items: get() returns what is left, then raises Closed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._after([])

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    # --- internals (called with the lock held, except _after) ----------------------------------

    def _consumer_back(self) -> None:
        """The consumer asks again: it was busy with the last frame since it was handed out."""
        if self._handed_out_at is not None:
            busy = self._clock() - self._handed_out_at
            self._handed_out_at = None
            if self._warmup:
                self._warmup -= 1
                return
            self._service_s = busy if self._service_s == 0.0 else 0.7 * self._service_s + 0.3 * busy

    def _pop(self, dropped: list[T]) -> T:
        now = self._clock()
        if not self._entries:
            raise Closed("queue closed")
        while True:
            entry = self._entries[0]
            late = entry.droppable and now - entry.enqueued_at + self._service_s > self._max_age
            if late and self._droppable > 1:
                self._entries.popleft()
                self._droppable -= 1
                dropped.append(entry.item)
                continue
            self._entries.popleft()
            self._droppable -= entry.droppable
            if entry.droppable:
                self._handed_out_at = now
            return entry.item

    def _remove_oldest_droppable(self) -> T:
        for index, entry in enumerate(self._entries):
            if entry.droppable:
                del self._entries[index]
                self._droppable -= 1
                return entry.item
        raise AssertionError("no droppable entry")  # pragma: no cover - guarded by the caller

    def _report(self, dropped: list[T]) -> None:
        self.dropped += len(dropped)
        if self._on_drop is not None:
            for item in dropped:
                self._on_drop(item)

    def _after(self, dropped: list[T]) -> None:
        if dropped:
            with self._cond:
                self._report(dropped)
        if self._waker is not None:
            self._waker()
