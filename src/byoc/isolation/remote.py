"""The processor as sessions see it when it runs in worker processes: every hook is a request over the
session's link to its worker (byoc/isolation/wire.py), frames cross in shared memory.

:class:`RemoteProcessor` is an ordinary :class:`~byoc.processor.Processor` to the session's worker
thread (byoc/session/worker.py), which calls it as it would the model author's own: the processor
contract is the same in both modes. A worker that dies makes the hook in flight raise
:class:`~byoc.errors.ProcessorLost`, which ends the session with the cause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from typing import TYPE_CHECKING, Any, Protocol

import av
import numpy as np

from byoc.errors import ProcessorLost
from byoc.isolation import wire
from byoc.isolation.child import audio_from_wire, audio_to_wire
from byoc.isolation.shared import FrameLayout, SharedBuffer, write_frame
from byoc.processor import Frame, Processor, SessionContext

if TYPE_CHECKING:
    from byoc.isolation.pool import Worker

__all__ = ["RemoteAudioProcessor", "RemoteHookError", "RemoteProcessor", "Workers"]

log = logging.getLogger(__name__)

_GROWTH = 1.25  # a buffer that must grow takes this much room to spare


class Workers(Protocol):
    """What the remote processor needs of the pool."""

    def assign(self) -> Worker: ...

    def released(self, worker: Worker) -> None: ...

    def death_cause(self, worker: Worker) -> str: ...


class RemoteHookError(Exception):
    """A hook raised in the worker. Its class is named after the worker's exception, so that logs and
    error kinds (byoc.errors.error_kind) read the same in both modes."""

    @classmethod
    def of(cls, type_name: str, message: str, trace: str) -> RemoteHookError:
        subclass = _REMOTE_TYPES.get(type_name)
        if subclass is None:
            subclass = _REMOTE_TYPES[type_name] = type(type_name, (cls,), {"__module__": __name__})
        error = subclass(message)
        error.add_note("in the processor's worker process:\n" + trace.rstrip())
        return error


_REMOTE_TYPES: dict[str, type[RemoteHookError]] = {}


@dataclass(eq=False)
class _Session:
    worker: Worker
    link: Connection
    context: SessionContext
    buffer: SharedBuffer | None = None
    fresh_buffer: bool = False
    """The buffer was made since the last frame: the worker must map it."""
    given_up: str = ""
    """Why this side stopped waiting for the worker (a hook that did not answer in time)."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class RemoteProcessor(Processor):
    """Forwards each hook of a session to the worker process the pool gave it."""

    def __init__(self, workers: Workers, reply_timeout_s: float | None = None) -> None:
        """``reply_timeout_s``: how long a hook may go unanswered before this side stops waiting for it
        (None: for ever). The session's own watchdog (``--process-timeout-s``) ends the session before
        that; giving up the link then lets the session's thread end instead of being left behind, while
        the hook hangs on in the worker."""
        self._workers = workers
        self._reply_timeout_s = reply_timeout_s
        self._sessions: dict[int, _Session] = {}

    # --- the hooks -----------------------------------------------------------------------------

    def on_start(self, session: SessionContext) -> None:
        worker = self._workers.assign()
        try:
            link = Client(worker.address, family="AF_UNIX", authkey=worker.authkey)
        except OSError as exc:
            self._workers.released(worker)
            raise ProcessorLost(f"processor worker {worker.number} cannot be reached: {exc}") from exc
        state = _Session(worker, link, session)
        self._sessions[id(session)] = state
        try:
            self._ask(
                state, (wire.START, session.stream_id, session.width, session.height, dict(session.params))
            )
        except BaseException:
            self._end(session)
            raise

    def process(self, frame: Frame, session: SessionContext) -> Any:
        state = self._sessions[id(session)]
        source = frame.av_frame
        needed = 2 * FrameLayout.largest(source.width, source.height)
        if state.buffer is None or state.buffer.size < needed:
            if state.buffer is not None:
                state.buffer.close()
            state.buffer = SharedBuffer.create(int(needed * _GROWTH))
            state.fresh_buffer = True
        buffer = state.buffer
        layout = write_frame(source, buffer, wire.INPUT_OFFSET)
        announce = (buffer.path, buffer.size) if state.fresh_buffer else None
        reply = self._ask(state, (wire.FRAME, frame.index, frame.pts, frame.time_base, layout, announce))
        if state.fresh_buffer:
            state.fresh_buffer = False
            buffer.unlink()  # mapped on both sides now
        if reply[0] == "same":
            return frame
        if reply[0] == "none":
            return None
        if reply[0] == "rgb":
            _, height, width = reply
            offset = FrameLayout.largest(layout.width, layout.height)
            return av.VideoFrame.from_ndarray(buffer.array(offset, (height, width, 3)), format="rgb24")
        array: np.ndarray = reply[1]
        return array

    def on_params(self, session: SessionContext, params: Mapping[str, Any]) -> None:
        self._ask(self._sessions[id(session)], (wire.PARAMS, dict(params)))

    def on_stop(self, session: SessionContext) -> None:
        state = self._sessions.get(id(session))
        if state is None:
            return
        try:
            self._ask(state, (wire.STOP,))
        except ProcessorLost:
            pass  # the worker died with the session: nothing is left to stop, the session knows why
        finally:
            self._end(session)

    # --- the link --------------------------------------------------------------------------------

    def _ask(self, state: _Session, request: tuple[Any, ...]) -> tuple[Any, ...]:
        """Send one request and wait for its reply, passing on what the processor emitted meanwhile."""
        with state.lock:
            if state.given_up:
                raise ProcessorLost(state.given_up)
            timeout = self._reply_timeout_s
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                state.link.send(request)
                while True:
                    if deadline is not None and not state.link.poll(max(0.0, deadline - time.monotonic())):
                        state.given_up = (
                            f"the processor's {request[0]} in worker {state.worker.number} did not answer "
                            f"within {timeout:g}s; this session no longer waits for it"
                        )
                        state.link.close()  # a late answer must not be taken for the next request's
                        raise ProcessorLost(state.given_up)
                    reply: tuple[Any, ...] = state.link.recv()
                    if reply[0] == wire.DATA:
                        state.context.send_data(reply[1])
                    elif reply[0] == wire.EVENT:
                        state.context.send_event(reply[1])
                    else:
                        break
            except (EOFError, OSError) as exc:
                cause = self._workers.death_cause(state.worker)
                raise ProcessorLost(f"processor worker {state.worker.number} died: {cause}") from exc
        if reply[0] == wire.ERROR:
            raise RemoteHookError.of(*reply[1:])
        return reply

    def _end(self, session: SessionContext) -> None:
        state = self._sessions.pop(id(session), None)
        if state is None:
            return
        state.link.close()
        if state.buffer is not None:
            state.buffer.close()
        self._workers.released(state.worker)


class RemoteAudioProcessor(RemoteProcessor):
    """The same, for a processor that overrides ``process_audio``: audio frames go to the worker too."""

    def process_audio(self, frame: av.AudioFrame, session: SessionContext) -> Any:
        reply = self._ask(self._sessions[id(session)], (wire.AUDIO, audio_to_wire(frame)))
        return audio_from_wire(reply[1]) if reply[0] == wire.AUDIO else None
