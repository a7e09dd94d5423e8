"""A pipeline stage: work on a daemon thread of its own, with its failure kept for the session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Stage", "call_in_loop"]


def call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """Schedule ``callback(*args)`` on ``loop`` from another thread; nothing if the loop is gone.

    A stage left behind in user code (a hung processor) may finish long after its session — even after
    the loop it reports to was closed — and must not fail then.
    """
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


class Stage:
    """Runs ``_run`` on a daemon thread (a stage stuck in user code can never keep the process alive).

    A subclass implements ``_run`` and sets ``self.error`` when it ends because of an exception. With
    ``nice``, the thread runs at a lower scheduling priority (Linux), so that when media work saturates
    the machine the threads that answer requests (/health, starts) still get the CPU at once.
    """

    def __init__(self, name: str, *, nice: int = 0) -> None:
        self._thread = threading.Thread(target=self._start_run, name=name, daemon=True)
        self._nice = nice
        self.error: BaseException | None = None

    def _start_run(self) -> None:
        if self._nice:  # Linux: lower this thread's priority so request handling comes first
            with contextlib.suppress(OSError, AttributeError):
                niceness = os.getpriority(os.PRIO_PROCESS, 0) + self._nice
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        self._run()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError
