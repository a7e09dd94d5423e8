"""The worker process: loads the processor, runs ``setup()`` once, then serves sessions.

Started by :class:`byoc.isolation.pool.WorkerPool` with the ``spawn`` method (never ``fork``: the
runtime has threads and event loops a child must not inherit). Each session link gets a thread of its
own that runs the processor's hooks in order, as a session's worker thread does in the runtime
(byoc/session/worker.py); coroutine hooks run on that thread's own event loop. The worker ends when the
runtime says ``teardown``, or when its control pipe closes because the runtime is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import inspect
import logging
import os
import sys
import threading
import traceback
from collections.abc import Mapping
from fractions import Fraction
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import av
import numpy as np

from byoc.errors import error_kind
from byoc.isolation import wire
from byoc.isolation.shared import FrameLayout, SharedBuffer, read_frame
from byoc.logs import configure_logging, current_stream_id
from byoc.processor import Frame, Processor, SessionContext, checked_result, load_processor
from byoc.tensors import release_cached_memory

__all__ = ["WorkerSpec", "audio_from_wire", "audio_to_wire", "main"]

log = logging.getLogger(__name__)

WorkerSpec = tuple[str, dict[str, str], int, str, bytes, int]
"""What a worker is started with: processor reference, its options, the worker's number, the log level,
the listener's key, and the niceness to add."""


def main(spec: WorkerSpec, control: Connection) -> None:
    reference, options, number, log_level, authkey, nice = spec
    configure_logging(log_level)
    faulthandler.enable()  # a native crash leaves its stack in the log
    if nice:
        os.nice(nice)
    current_stream_id.set(f"worker-{number}")
    with contextlib.suppress(OSError):  # named in ps and top (Linux): byoc-worker-N
        Path("/proc/self/comm").write_text(f"byoc-worker-{number}")
    teardown = threading.Event()
    threading.Thread(target=_listen, args=(control, teardown, number), name="control", daemon=True).start()
    try:
        processor = load_processor(reference, options)
        _finish(processor.setup())
    except BaseException as exc:
        log.exception("processor %s failed to load in worker %d", reference, number)
        control.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    listener = Listener(family="AF_UNIX", authkey=authkey)
    custom_audio = type(processor).process_audio is not Processor.process_audio
    threading.Thread(target=_accept, args=(listener, processor), name="accept", daemon=True).start()
    control.send(("ready", listener.address, custom_audio))
    log.info("worker %d (pid %d) ready", number, os.getpid())
    teardown.wait()
    try:
        _finish(processor.teardown())
    except Exception:
        log.exception("the processor's teardown() failed in worker %d", number)
    listener.close()
    control.send(("done",))
    sys.stdout.flush()
    os._exit(0)  # session threads may still sit in the processor: they go with the process


def _listen(control: Connection, teardown: threading.Event, number: int) -> None:
    """From the start (a load may hang): ``teardown`` when the runtime says so; exit at once when the
    runtime is gone, so that no worker outlives it."""
    try:
        while control.recv() != ("teardown",):
            pass
    except (EOFError, OSError):
        log.warning("worker %d: the runtime is gone; exiting", number)
        os._exit(0)
    teardown.set()


def _finish(result: Any) -> Any:
    """A hook's result, awaited on a loop of its own when it is a coroutine."""
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _accept(listener: Listener, processor: Processor) -> None:
    while True:
        try:
            link = listener.accept()
        except OSError:
            return  # the listener was closed
        except Exception:
            log.exception("a session link failed to connect")
            continue
        threading.Thread(target=_Link(link, processor).serve, name="session", daemon=True).start()


class _Sink:
    """The session's ``send_data`` / ``send_event``: sent back over the link, from any thread."""

    def __init__(self, link: Connection, lock: threading.Lock) -> None:
        self._link, self._lock = link, lock

    def send_data(self, message: Any) -> None:
        with self._lock:
            self._link.send((wire.DATA, message))

    def send_event(self, event: Mapping[str, Any]) -> None:
        with self._lock:
            self._link.send((wire.EVENT, dict(event)))


class SharedFrame(Frame):
    """A frame in shared memory: ``rgb`` is a view when it came as ``rgb24``; ``av_frame`` is built on
    first use."""

    __slots__ = ("_array", "_frame", "_layout", "_pts", "_time_base")

    def __init__(self, array: np.ndarray, layout: FrameLayout, pts: int, time_base: Fraction, index: int):
        self._array, self._layout, self._pts, self._time_base = array, layout, pts, time_base
        self.index = index
        self._rgb = array if layout.format == "rgb24" else None
        self._frame: av.VideoFrame | None = None

    @property
    def av_frame(self) -> av.VideoFrame:  # type: ignore[override]  # a slot in Frame; built here on use
        if self._frame is None:
            frame = av.VideoFrame.from_ndarray(self._array, format=self._layout.format)
            frame.pts, frame.time_base = self._pts, self._time_base
            self._frame = frame
        return self._frame

    @property
    def pts(self) -> int:
        return self._pts

    @property
    def time_base(self) -> Fraction:
        return self._time_base

    @property
    def width(self) -> int:
        return self._layout.width

    @property
    def height(self) -> int:
        return self._layout.height


class _Link:
    """One session, served on its own thread: hooks in order, as they are asked for."""

    def __init__(self, link: Connection, processor: Processor) -> None:
        self._link, self._processor = link, processor
        self._lock = threading.Lock()
        self._context: SessionContext | None = None
        self._buffer: SharedBuffer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self) -> None:
        try:
            while True:
                try:
                    request = self._link.recv()
                except (EOFError, OSError):
                    return  # the runtime ended the link (or is gone)
                try:
                    reply = self._handle(request)
                except Exception as exc:
                    reply = (wire.ERROR, type(exc).__name__, str(exc), traceback.format_exc())
                    if error_kind(exc) == "oom":
                        release_cached_memory()
                    log.error("processor failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
                try:
                    with self._lock:
                        self._link.send(reply)
                except OSError:
                    return  # the runtime gave this link up (a hook that answered too late)
                if request[0] == wire.STOP:
                    return
        finally:
            if self._buffer is not None:
                self._buffer.close()
            if self._loop is not None:
                self._loop.close()
            self._link.close()

    def _call(self, result: Any) -> Any:
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(_await(result))
        return result

    def _handle(self, request: tuple[Any, ...]) -> tuple[Any, ...]:
        kind = request[0]
        if kind == wire.FRAME:
            return self._frame(*request[1:])
        if kind == wire.START:
            _, stream_id, width, height, params = request
            current_stream_id.set(stream_id)
            self._context = SessionContext(
                stream_id, width, height, dict(params), _Sink(self._link, self._lock)
            )
            self._call(self._processor.on_start(self._context))
            return (wire.OK,)
        context = self._session()
        if kind == wire.AUDIO:
            result = self._call(self._processor.process_audio(audio_from_wire(request[1]), context))
            if isinstance(result, av.AudioFrame):
                return (wire.AUDIO, audio_to_wire(result))
            return ("none",)
        if kind == wire.PARAMS:
            params = request[1]
            context.params.update(params)
            self._call(self._processor.on_params(context, params))
            return (wire.OK,)
        if kind == wire.STOP:
            self._call(self._processor.on_stop(context))
            return (wire.OK,)
        raise ValueError(f"unknown request {kind!r}")

    def _session(self) -> SessionContext:
        if self._context is None:
            raise RuntimeError("the session was not started")
        return self._context

    def _frame(
        self,
        index: int,
        pts: int,
        time_base: Fraction,
        layout: FrameLayout,
        buffer: tuple[str, int] | None,
    ) -> tuple[Any, ...]:
        if buffer is not None:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = SharedBuffer.open(*buffer)
        assert self._buffer is not None, "a frame arrived before its buffer"
        array = read_frame(self._buffer, wire.INPUT_OFFSET, layout)
        frame = SharedFrame(array, layout, pts, time_base, index)
        result = self._call(self._processor.process(frame, self._session()))
        if result is None:
            return ("none",)
        if result is frame or (isinstance(result, Frame) and result.av_frame is frame._frame):
            return ("same",)
        rgb = _as_rgb(result)
        output = FrameLayout("rgb24", rgb.shape[1], rgb.shape[0])
        offset = FrameLayout.largest(layout.width, layout.height)
        if offset + output.nbytes <= self._buffer.size:
            self._buffer.array(offset, output.shape)[:] = rgb
            return ("rgb", output.height, output.width)
        return ("inline", np.ascontiguousarray(rgb))


def _as_rgb(result: Any) -> np.ndarray:
    """What ``process`` returned (not None), as an H x W x 3 uint8 array."""
    result = checked_result(result)
    if isinstance(result, Frame):
        return result.rgb
    if isinstance(result, av.VideoFrame):
        return result.to_ndarray(format="rgb24")
    array: np.ndarray = result
    return array


def audio_to_wire(frame: av.AudioFrame) -> tuple[Any, ...]:
    return (
        frame.to_ndarray(),
        frame.format.name,
        frame.layout.name,
        frame.sample_rate,
        frame.pts,
        frame.time_base,
    )


def audio_from_wire(data: tuple[Any, ...]) -> av.AudioFrame:
    array, format_name, layout, rate, pts, time_base = data
    frame = av.AudioFrame.from_ndarray(array, format=format_name, layout=layout)
    frame.sample_rate, frame.pts = rate, pts
    if time_base is not None:  # a frame without one keeps PyAV's default
        frame.time_base = time_base
    return frame
