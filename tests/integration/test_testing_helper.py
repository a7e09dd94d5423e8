"""byoc.testing: a processor run through a real session over loopback trickle, on generated media."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from byoc import Frame, Processor, SessionContext
from byoc.builtin.passthrough import PassthroughProcessor
from byoc.testing import ProcessorRun, run_processor, run_processor_async


class FailsEveryThird(Processor):
    def process(self, frame: Frame, session: SessionContext) -> Frame:
        if frame.index % 3 == 2:
            raise RuntimeError(f"cannot process frame {frame.index}")
        return frame


class Shrinking(Processor):
    """Returns a picture a quarter of the size asked for."""

    def process(self, frame: Frame, session: SessionContext) -> np.ndarray:
        return np.asarray(frame.rgb[::4, ::4])


class FourChannels(Processor):
    """Returns RGBA, which process() may not return."""

    def process(self, frame: Frame, session: SessionContext) -> np.ndarray:
        return np.zeros((frame.height, frame.width, 4), dtype=np.uint8)


class Hooks(Processor):
    """Records its hooks and the start parameters."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.params: dict[str, Any] = {}
        self.lock = threading.Lock()

    def _note(self, hook: str) -> None:
        with self.lock:
            self.calls.append(hook)

    def setup(self) -> None:
        self._note("setup")

    def on_start(self, session: SessionContext) -> None:
        self._note("on_start")
        self.params = dict(session.params)

    def on_params(self, session: SessionContext, params: Mapping[str, Any]) -> None:
        self._note("on_params")

    def on_stop(self, session: SessionContext) -> None:
        self._note("on_stop")

    def teardown(self) -> None:
        self._note("teardown")


def test_passthrough_puts_out_every_frame_it_takes_in() -> None:
    run = run_processor(PassthroughProcessor(), seconds=2.0, size=(256, 144), audio=True)
    assert run.end_reason == "input_ended", run.summary()
    assert run.frames_sent == 60
    assert run.frames_in == run.frames_out == run.frames_received == 60, run.summary()
    assert (run.frames_dropped, run.errors, run.last_error) == (0, {}, None)
    assert run.output_size == (256, 144)
    assert run.latency_ms_p50 is not None
    assert run.latency_ms_p99 is not None
    assert run.latency_ms_p99 >= run.latency_ms_p50 > 0
    assert 1.5 < run.audio_seconds_out <= 2.1  # the AAC tone went out as Opus
    assert run.ok


def test_a_processor_that_raises_shows_its_frames_as_errors() -> None:
    run = run_processor(FailsEveryThird(), seconds=1.0)
    assert run.end_reason == "input_ended", run.summary()
    assert run.frames_in == 30
    assert run.errors == {"process": 10}  # frames 2, 5, ..., 29
    assert run.dropped == {"processor": 10}
    assert run.frames_dropped == 10
    assert run.frames_out == run.frames_received == 20
    assert run.last_error is not None
    assert "cannot process frame" in run.last_error
    assert not run.ok
    assert "process 10" in run.summary()


def test_a_wrong_size_picture_is_scaled_to_the_stream_size() -> None:
    run = run_processor(Shrinking(), seconds=1.0, size=(320, 192))
    assert run.errors == {}, run.summary()
    assert run.frames_out == run.frames_received == run.frames_in == 30
    assert run.output_size == (320, 192)  # the encoder scales what process() returned


def test_a_processor_that_fails_every_frame_ends_the_session() -> None:
    run = run_processor(FourChannels(), seconds=1.0)
    # SessionSettings.max_consecutive_errors (10) failures in a row are tolerated, the next one ends it
    assert run.end_reason == "processor_error", run.summary()
    assert run.errors["process"] == 11
    assert (run.frames_out, run.frames_received, run.output_size) == (0, 0, None)
    assert run.last_error is not None
    assert "H x W x 3 uint8" in run.last_error


async def test_the_async_entry_runs_every_hook_with_the_start_params() -> None:
    hooks = Hooks()
    run: ProcessorRun = await run_processor_async(hooks, params={"strength": 0.5}, seconds=0.5, fps=20)
    assert run.frames_out == run.frames_in == 10, run.summary()
    assert hooks.calls == ["setup", "on_start", "on_stop", "teardown"]
    assert hooks.params == {"strength": 0.5}


async def test_the_synchronous_entry_says_to_await_inside_a_loop() -> None:
    with pytest.raises(RuntimeError, match="run_processor_async"):
        run_processor(PassthroughProcessor())


def test_a_built_in_processor_by_name_without_setup() -> None:
    run = run_processor("invert", seconds=0.5, realtime=False, setup=False)
    assert run.ok, run.summary()
    assert run.frames_received == 15


@pytest.mark.parametrize("size", [(255, 256), (0, 256)])
def test_sizes_the_encoder_cannot_take_are_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="size must be two positive even numbers"):
        run_processor(PassthroughProcessor(), size=size)
