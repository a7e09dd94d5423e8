"""The processing stage: runs the model author's hooks for one session, off the HTTP event loop.

Each session has one worker thread. When every hook of the processor is a plain method it calls them
directly; when any is ``async def`` the thread runs its own event loop and awaits them there, so a
coroutine that blocks only ever blocks its own session's loop. Parameter updates travel in the same
queue as the frames and are applied between two frames.

A frame whose ``process`` raises is dropped and counted; ``max_consecutive_errors`` failures in a row
end the session with a :class:`~byoc.errors.ProcessorError`. Whatever else ends the thread — a
``SystemExit`` or ``KeyboardInterrupt`` from a hook — is recorded as the session's error and logged.

The worker says which hook it is in and since when (:meth:`ProcessingWorker.busy`), so that the
session's watchdog can tell a hook that never returns (byoc/session/session.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from byoc.errors import ProcessorError, ProcessorLost, error_kind
from byoc.media.items import TIME_BASE, AudioItem, Item, ParamsItem, VideoItem
from byoc.media.queues import Closed, StageQueue
from byoc.media.stage import Stage
from byoc.processor import Frame, Processor, SessionContext, checked_result, is_async_hook
from byoc.threads import call_in_loop

__all__ = ["ProcessingStatistics", "ProcessingWorker", "does_nothing", "error_kind", "to_video_frame"]

_HOOKS = ("on_start", "on_params", "process", "process_audio", "on_stop")


def does_nothing(processor: Processor) -> bool:
    """True when ``processor`` keeps every session hook of :class:`Processor` as it is (frames and audio
    go out unchanged, nothing happens at a start, a parameter update or a stop): a session needs no
    processing stage for it, and hands decoded frames straight to its encoder."""
    return all(getattr(type(processor), hook) is getattr(Processor, hook) for hook in _HOOKS)


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProcessingStatistics:
    frames_out: int
    frames_dropped_by_processor: int
    last_error: str | None


def to_video_frame(result: Any, source: av.VideoFrame) -> av.VideoFrame | None:
    """What ``process`` returned, as a video frame with the source's timestamp (None: drop it)."""
    result = checked_result(result)
    if result is None:
        return None
    if isinstance(result, Frame):
        frame = result.av_frame
    elif isinstance(result, av.VideoFrame):
        frame = result
    else:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(result), format="rgb24")
    frame.pts, frame.time_base = source.pts, TIME_BASE
    return frame


class ProcessingWorker(Stage):
    """Feeds one session's frames through the shared processor on the session's own thread."""

    def __init__(
        self,
        processor: Processor,
        context: SessionContext,
        source: StageQueue[Item],
        output: StageQueue[Item] | None,
        *,
        max_consecutive_errors: int = 10,
        name: str = "processing",
        nice: int = 0,
        on_error: Callable[[str], None] | None = None,
        on_started: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        on_processed: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(name, nice=nice)
        self._processor = processor
        self._context = context
        self._source = source
        self._output = output
        self._max_errors = max_consecutive_errors
        self._on_error = on_error or (lambda kind: None)
        self._on_started = on_started or (lambda: None)
        self._on_exit = on_exit or (lambda: None)
        self._on_processed = on_processed or (lambda seconds: None)
        self._custom_audio = type(processor).process_audio is not Processor.process_audio
        hooks = (
            processor.process,
            processor.process_audio,
            processor.on_start,
            processor.on_stop,
            processor.on_params,
        )
        self._needs_loop = any(is_async_hook(hook) for hook in hooks)
        self._frames_out = self._dropped = self._errors = self._consecutive = 0
        self._last_error: str | None = None
        self._busy: tuple[str, float] | None = None  # (hook, monotonic start), replaced as a whole

    def statistics(self) -> ProcessingStatistics:
        return ProcessingStatistics(self._frames_out, self._dropped, self._last_error)

    def busy(self) -> tuple[str, float] | None:
        """The hook running now and for how many seconds it has run; None between two calls."""
        busy = self._busy
        return None if busy is None else (busy[0], time.monotonic() - busy[1])

    def stack(self) -> str:
        """Where the worker thread is now (for the log line of a hook that does not return)."""
        frame = sys._current_frames().get(self._thread.ident or 0) if self._thread is not None else None
        return "".join(traceback.format_stack(frame)) if frame is not None else ""

    # --- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._needs_loop:
                asyncio.run(self._serve_async())
            else:
                self._serve_sync()
        except Closed:
            pass  # the encoder stopped taking frames
        except BaseException as exc:  # reported to the session, which ends with this error
            self._ended_by(exc)  # before self.error: the log line wants the traceback intact
            self.error = exc
        finally:
            self._source.close()  # the decoder stops instead of filling a queue nobody reads
            if self._output is not None:
                self._output.close()
            self._on_exit()

    def _ended_by(self, exc: BaseException) -> None:
        """Record and log what ended the thread. A ProcessorError was counted where it was raised;
        anything else (``SystemExit``, ``KeyboardInterrupt``) came from the processor uncounted."""
        if isinstance(exc, ProcessorError):
            message = str(exc)
            self._last_error = self._last_error or message
        else:
            message = self._last_error = _describe(exc)
            self._on_error(error_kind(exc))
        log.error("processing ended: %s", message, exc_info=exc)

    async def _call(self, hook: str, call: Callable[[], Any]) -> Any:
        """Run one hook (awaiting it if it is a coroutine), marked busy for the watchdog meanwhile."""
        self._busy = (hook, time.monotonic())
        try:
            return await _resolve(call())
        finally:
            self._busy = None

    def _serve_sync(self) -> None:
        _run_now(self._start())
        try:
            while True:
                try:
                    item = self._source.get_nowait()
                    if item is None:  # about to wait: what was emitted without a wake goes on first
                        self._wake_output()
                        item = self._source.get()
                except Closed:
                    return
                _run_now(self._handle(item))
        finally:
            _run_now(self._stop())

    async def _serve_async(self) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._source.set_waker(lambda: call_in_loop(loop, wake.set))
        await self._start()
        try:
            while True:
                try:
                    item = self._source.get_nowait()
                except Closed:
                    return
                if item is None:
                    self._wake_output()
                    await wake.wait()
                    wake.clear()
                else:
                    await self._handle(item)
        finally:
            self._source.set_waker(None)
            await self._stop()

    async def _start(self) -> None:
        try:
            await self._call("on_start", lambda: self._processor.on_start(self._context))
        except ProcessorLost:
            self._on_error("process")
            raise
        except Exception as exc:
            self._on_error("process")
            raise ProcessorError(f"on_start failed: {type(exc).__name__}: {exc}") from exc
        self._on_started()

    async def _stop(self) -> None:
        try:
            await self._call("on_stop", lambda: self._processor.on_stop(self._context))
        except Exception:
            log.exception("on_stop failed")

    async def _handle(self, item: Item) -> None:
        processor, context = self._processor, self._context
        if isinstance(item, VideoItem):
            started = time.perf_counter()
            try:
                frame_in = Frame(item.frame, item.index)
                result = await self._call("process", lambda: processor.process(frame_in, context))
                frame = to_video_frame(result, item.frame)
            except ProcessorLost:
                self._dropped += 1
                raise
            except Exception as exc:
                self._dropped += 1  # the frame is lost with the failure: counted like a frame it dropped
                self._failed(exc)
                return
            self._on_processed(time.perf_counter() - started)
            self._consecutive = 0
            if frame is None:
                self._dropped += 1
                return
            item.frame = frame
            self._frames_out += 1
            self._emit(item)
        elif isinstance(item, AudioItem) and self._custom_audio:
            try:
                audio = item.frame
                result = await self._call("process_audio", lambda: processor.process_audio(audio, context))
            except Exception as exc:
                self._failed(exc)
                return
            if isinstance(result, av.AudioFrame):
                self._emit(AudioItem(result))
        elif isinstance(item, ParamsItem):
            context.params.update(item.params)
            try:
                params = item.params
                await self._call("on_params", lambda: processor.on_params(context, params))
            except Exception as exc:
                self._failed(exc)
        else:
            self._emit(item)

    def _emit(self, item: Item) -> None:
        if self._output is not None:
            # audio does not wake the encoder by itself (StageQueue.put): it rides with the next frame
            video = isinstance(item, VideoItem)
            self._output.put(item, droppable=video, wake=not isinstance(item, AudioItem))

    def _wake_output(self) -> None:
        if self._output is not None:
            self._output.wake()

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, ProcessorLost):
            raise exc  # the worker process is gone: nothing more can be processed
        self._errors += 1
        self._consecutive += 1
        self._last_error = _describe(exc)
        self._on_error(error_kind(exc))
        if self._errors == 1 or self._errors % 100 == 0:
            log.error("processor failed (%d so far)", self._errors, exc_info=exc)
        if self._consecutive > self._max_errors:
            raise ProcessorError(
                f"{self._consecutive} processor failures in a row, last: {self._last_error}"
            ) from exc


def _describe(exc: BaseException) -> str:
    """``Type: message``, or just ``Type`` for an exception without a message."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _resolve(result: Any) -> Any:
    """Await a hook's result if it is awaitable."""
    if inspect.isawaitable(result):
        return await result
    return result


def _run_now(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends (every hook it calls is a plain method)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise ProcessorError("a processor hook returned an awaitable; declare it with 'async def'")
