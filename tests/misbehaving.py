"""Processors that hang, exit or crash, for tests (loadable as ``tests.misbehaving:Name``).

Each hanging one holds its caller until ``release`` is set, so that a test can let the threads it
left behind finish.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading

from byoc.processor import Frame, Processor, SessionContext


class HangingAsync(Processor):
    """An ``async def process`` that never returns until released (it keeps its loop turning)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def process(self, frame: Frame, session: SessionContext) -> Frame:
        while not self.release.is_set():  # noqa: ASYNC110 (set from another thread, not this loop)
            await asyncio.sleep(0.05)
        return frame


class HangingStart(Processor):
    """An ``on_start`` that never returns until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def on_start(self, session: SessionContext) -> None:
        self.release.wait()


class Exiting(Processor):
    """Raises the ``BaseException`` named by the session's ``raise`` parameter on every frame
    (``SystemExit`` or ``KeyboardInterrupt``); sessions without it pass their frames through."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        kind = session.params.get("raise")
        if kind == "SystemExit":
            raise SystemExit(f"exit from frame {frame.index}")
        if kind == "KeyboardInterrupt":
            raise KeyboardInterrupt
        return frame


class Crashing(Processor):
    """Reads address 0 on the first frame: a segmentation fault in native code."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        ctypes.string_at(0)
        return frame


class CrashingOnRequest(Processor):
    """Passes frames through until the session's params say ``crash``; then reads address 0 (a
    segmentation fault) on its next frame."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        if session.params.get("crash"):
            ctypes.string_at(0)
        return frame
