"""A pipeline stage: work on a daemon thread of its own, with its failure kept for the session."""

from __future__ import annotations

import threading

__all__ = ["Stage"]


class Stage:
    """Runs ``_run`` on a daemon thread (a stage stuck in user code can never keep the process alive).

    A subclass implements ``_run`` and sets ``self.error`` when it ends because of an exception.
    """

    def __init__(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

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
