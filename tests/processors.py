"""Processors that misbehave on purpose, for tests (loadable as ``tests.processors:Name``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import av
import numpy as np

from byoc.processor import Frame, Processor, SessionContext


class Failing(Processor):
    """Raises on every frame."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        raise RuntimeError(f"cannot process frame {frame.index}")


class FailingSometimes(Processor):
    """Raises on every third frame."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        if frame.index % 3 == 2:
            raise RuntimeError(f"cannot process frame {frame.index}")
        return frame


class SendingBadEvents(Processor):
    """Sends an event that is not JSON on every third frame (the frame fails), a good one otherwise."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        if frame.index % 3 == 2:
            session.send_event({"type": "custom", "at": object()})
        else:
            session.send_event({"type": "custom", "index": frame.index})
        return frame


class FailingStart(Processor):
    """Refuses to start a session."""

    def on_start(self, session: SessionContext) -> None:
        raise RuntimeError("no room for another session")


class Recording(Processor):
    """Records hook calls, emits data and a custom event, drops every 'drop_every'-th frame."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _note(self, hook: str, session: SessionContext) -> None:
        with self.lock:
            self.calls.append((hook, session.stream_id))

    def on_start(self, session: SessionContext) -> None:
        self._note("on_start", session)
        session.state["seen"] = 0

    def on_params(self, session: SessionContext, params: Mapping[str, Any]) -> None:
        self._note("on_params", session)

    def process(self, frame: Frame, session: SessionContext) -> Frame | None:
        session.state["seen"] += 1
        if session.state["seen"] == 1:
            session.send_data({"first_frame": frame.index, "params": dict(session.params)})
            session.send_event({"type": "custom", "frame": frame.index})
        every = int(session.params.get("drop_every", 0))
        if every and frame.index % every == 0:
            return None
        return frame

    def on_stop(self, session: SessionContext) -> None:
        self._note("on_stop", session)


class Hanging(Processor):
    """Never returns from process() until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        self.release.wait()
        return frame


class LeakyAndStubborn(Processor):
    """Keeps every session's memory after the session ends, and never finishes its teardown."""

    def __init__(self, memory_mb: str = "96") -> None:
        self.size = int(float(memory_mb) * 1024 * 1024)
        self.kept: list[object] = []

    def on_start(self, session: SessionContext) -> None:
        import numpy as np

        self.kept.append(np.ones(self.size, dtype=np.uint8))  # never released

    def teardown(self) -> None:
        threading.Event().wait()  # ignores the shutdown


class NeverReady(Processor):
    """A setup() that never returns (a model load stuck on a download, say)."""

    def setup(self) -> None:
        threading.Event().wait()


class SlowToStop(Processor):
    """Takes ``stop_s`` seconds to end each session (a model flushing its state), so that a drain lasts
    long enough to be watched from outside."""

    def __init__(self, stop_s: str = "2") -> None:
        self.stop_s = float(stop_s)

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        return frame

    def on_stop(self, session: SessionContext) -> None:
        threading.Event().wait(self.stop_s)


class BusyStart(Processor):
    """An ``on_start`` that computes in Python for ``busy_s`` seconds of wall time, as a per-session model
    warm-up does: the interpreter is busy all along, with only the GIL's switch interval to share."""

    def __init__(self, busy_s: str = "3") -> None:
        self.busy_s = float(busy_s)

    def on_start(self, session: SessionContext) -> None:
        deadline = time.monotonic() + self.busy_s
        while time.monotonic() < deadline:
            sum(i * i for i in range(1000))

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        return frame


_LEAKED: list[bytearray] = []


class LeakingPerSession(Processor):
    """Keeps ``leak_mb`` MiB (written, so resident) for ever each time a session starts: memory that
    never comes back, as a native library's per-session context that is never freed."""

    def __init__(self, leak_mb: str = "50") -> None:
        self.leak_bytes = int(float(leak_mb) * 1024 * 1024)

    def on_start(self, session: SessionContext) -> None:
        _LEAKED.append(bytearray(b"\x01") * self.leak_bytes)

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        return frame


class OutOfMemoryError(RuntimeError):
    """Named as torch's CUDA out-of-memory error is (torch.cuda.OutOfMemoryError)."""


class OutOfMemoryOnRequest(Processor):
    """Fails every frame of a session whose params say ``oom`` as a GPU out of memory would."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        if session.params.get("oom"):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return frame


class Talking(Processor):
    """Sends a data message and an event for every frame it passes through."""

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        session.send_data({"frame": frame.index, "stream": session.stream_id})
        session.send_event({"type": "seen", "frame": frame.index})
        return frame


class Doubling(Processor):
    """Returns a picture twice the frame's width and height (an upscaler)."""

    def process(self, frame: Frame, session: SessionContext) -> np.ndarray:
        return np.repeat(np.repeat(frame.rgb, 2, axis=0), 2, axis=1)


class SlowSetup(Processor):
    """A ``setup()`` that takes ``setup_s`` seconds (a model load), then passes frames through."""

    def __init__(self, setup_s: str = "2") -> None:
        self.setup_s = float(setup_s)

    def setup(self) -> None:
        threading.Event().wait(self.setup_s)

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        return frame


class Quieter(Processor):
    """Halves the audio's amplitude (a processor of its own audio)."""

    def process_audio(self, frame: av.AudioFrame, session: SessionContext) -> av.AudioFrame:
        quieter = av.AudioFrame.from_ndarray(
            frame.to_ndarray() / 2, format=frame.format.name, layout=frame.layout.name
        )
        quieter.sample_rate, quieter.pts = frame.sample_rate, frame.pts
        return quieter
