"""A pipeline stage: work on a daemon thread of its own, with its failure kept for the session."""

from __future__ import annotations

import contextlib
import os
import threading

from byoc.threads import start_thread

__all__ = ["Stage"]


class Stage:
    """Runs ``_run`` on a daemon thread (a stage stuck in user code can never keep the process alive).

    A subclass implements ``_run`` and sets ``self.error`` when it ends because of an exception. With
    ``nice``, the thread runs at a lower scheduling priority (Linux), so that when media work saturates
    the machine the threads that answer requests (/health, starts) still get the CPU at once.
    """

    def __init__(self, name: str, *, nice: int = 0) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._nice = nice
        self._failure: BaseException | None = None

    @property
    def error(self) -> BaseException | None:
        """The exception the stage ended with, if any."""
        return self._failure

    @error.setter
    def error(self, exc: BaseException | None) -> None:
        # Kept without tracebacks: their frames hold the stage (``self``), and a stage that refers to
        # itself through its error is freed, with its codec contexts, only by the cyclic collector.
        self._failure = exc
        chained, seen = [exc], set()
        while chained:
            link = chained.pop()
            if link is not None and id(link) not in seen:
                seen.add(id(link))
                link.__traceback__ = None
                chained += [link.__cause__, link.__context__]

    def _start_run(self) -> None:
        if self._nice:  # Linux: lower this thread's priority so request handling comes first
            with contextlib.suppress(OSError, AttributeError):
                niceness = os.getpriority(os.PRIO_PROCESS, 0) + self._nice
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        self._run()

    def start(self) -> None:
        """Start the thread, in a copy of the caller's context (log lines keep their stream id)."""
        self._thread = start_thread(self._start_run, self._name)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError
