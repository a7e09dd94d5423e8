"""The encoder's output on its way to the event loop: written from the encoder thread, taken in batches."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from byoc.threads import call_in_loop

__all__ = ["FINISHED", "Item", "LoopSink", "coalesce"]

FINISHED = object()

Item = tuple[int, bytes | int] | object
"""``(segment, data)`` for bytes of a segment, ``(segment, frames)`` for its end (it holds ``frames``
video frames), or :data:`FINISHED`."""


class LoopSink:
    """The encoder's output, handed to the event loop in batches.

    The encoder calls ``write``/``flush``/``end``/``close`` from its thread. A write alone wakes no one:
    the loop is woken by ``flush``, ``end`` and ``close``, at most once however many items came since
    it last took them, and takes everything at once with ``take``. So a frame's video packet and the
    audio packets muxed since the previous frame leave in one wake-up and one write to the network.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._wake_pending = False

    def write(self, segment: int, data: bytes) -> None:
        with self._lock:
            self._items.append((segment, data))

    def flush(self) -> None:
        self._push(None)

    def end(self, segment: int, frames: int) -> None:
        self._push((segment, frames))

    def close(self) -> None:
        self._push(FINISHED)

    def _push(self, item: Item | None) -> None:
        with self._lock:
            if item is not None:
                self._items.append(item)
            if self._wake_pending or not self._items:
                return
            self._wake_pending = True
        call_in_loop(self._loop, self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def take(self) -> list[Item]:
        """Everything written since the last call (waits for something)."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                self._ready.clear()
            await self._ready.wait()


def coalesce(items: list[Item]) -> list[Item]:
    """Join consecutive writes to the same segment into one."""
    out: list[Item] = []
    for item in items:
        previous = out[-1] if out else None
        if (
            isinstance(item, tuple)
            and isinstance(previous, tuple)
            and isinstance(item[1], bytes)
            and isinstance(previous[1], bytes)
            and previous[0] == item[0]
        ):
            out[-1] = (item[0], previous[1] + item[1])
        else:
            out.append(item)
    return out
