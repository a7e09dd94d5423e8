"""The processor contract: loading by reference, frames, and what process() may return."""

from __future__ import annotations

import importlib.util
from fractions import Fraction

import av
import numpy as np
import pytest

from byoc.builtin import AsyncLoadProcessor, InvertProcessor, LoadProcessor, PassthroughProcessor
from byoc.dev.synthetic import pattern
from byoc.errors import ConfigError, ProcessorLoadError
from byoc.processor import BUILTIN_PROCESSORS, Frame, Processor, SessionContext, is_async_hook, load_processor
from byoc.session.worker import to_video_frame


def _frame(index: int = 3) -> Frame:
    video = av.VideoFrame.from_ndarray(pattern(index, 64, 48), format="rgb24").reformat(format="yuv420p")
    video.pts, video.time_base = 123_000, Fraction(1, 90000)
    return Frame(video, index)


class _Sink:
    def send_data(self, message: object) -> None:
        pass

    def send_event(self, event: object) -> None:
        pass


def _context() -> SessionContext:
    return SessionContext("s", 64, 48, {}, _Sink())


@pytest.mark.parametrize(
    ("reference", "options", "expected"),
    [
        ("passthrough", {}, PassthroughProcessor),
        ("invert", {}, InvertProcessor),
        ("load", {"ms": "5", "memory_mb": "1"}, LoadProcessor),
        ("load", {"mode": "async"}, AsyncLoadProcessor),
        ("byoc.builtin.invert:InvertProcessor", {}, InvertProcessor),
        ("tests.processors:Recording", {}, Processor),
    ],
)
def test_load_processor(reference: str, options: dict[str, str], expected: type) -> None:
    assert isinstance(load_processor(reference, options), expected)


@pytest.mark.parametrize(
    ("reference", "options", "message"),
    [
        ("nope", {}, "neither a built-in"),
        ("no_such_package.module:Thing", {}, "cannot import module 'no_such_package.module'"),
        ("byoc.builtin.invert:Missing", {}, "has no attribute 'Missing'"),
        ("byoc.builtin.invert:__doc__", {}, "not a Processor class or factory"),
        ("byoc.builtin.invert:InvertProcessor", {"bogus": "1"}, "cannot create processor"),
        ("fractions:Fraction", {}, "returned Fraction, not a byoc Processor"),
        ("load", {"mode": "warp"}, "mode must be"),
    ],
)
def test_load_processor_says_precisely_what_failed(
    reference: str, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_processor(reference, options)


def test_every_builtin_loads() -> None:
    for name in BUILTIN_PROCESSORS:
        assert isinstance(load_processor(name), Processor)
    assert isinstance(ProcessorLoadError("x"), ConfigError)


def test_frame_exposes_rgb_timestamp_and_the_av_frame() -> None:
    frame = _frame()
    assert frame.rgb.shape == (48, 64, 3)
    assert frame.rgb.dtype == np.uint8
    assert frame.rgb is frame.rgb  # converted once
    assert frame.timestamp == pytest.approx(123_000 / 90_000)
    assert (frame.width, frame.height) == (64, 48)
    assert isinstance(frame.av_frame, av.VideoFrame)


def test_invert_returns_the_inverted_picture() -> None:
    frame = _frame()
    out = InvertProcessor().process(frame, _context())
    assert np.array_equal(out, 255 - frame.rgb)


def test_process_results_become_frames_with_the_source_timestamp() -> None:
    source = _frame()
    same = to_video_frame(source, source.av_frame)
    assert same is source.av_frame
    array = to_video_frame(np.zeros((48, 64, 3), np.uint8), source.av_frame)
    assert array is not None
    assert (array.width, array.height, array.pts) == (64, 48, 123_000)
    assert to_video_frame(None, source.av_frame) is None
    with pytest.raises(TypeError, match="H x W x 3 uint8"):
        to_video_frame(np.zeros((48, 64), np.uint8), source.av_frame)
    with pytest.raises(TypeError, match="expected a Frame"):
        to_video_frame("a picture", source.av_frame)


def test_async_hooks_are_recognised() -> None:
    assert is_async_hook(AsyncLoadProcessor().process)
    assert not is_async_hook(LoadProcessor().process)


def test_load_processor_holds_memory_per_session_and_releases_it() -> None:
    processor = LoadProcessor(ms=0, memory_mb=8, device="cpu")
    processor.setup()
    context = _context()
    processor.on_start(context)
    ballast = context.state["ballast"]
    assert ballast.nbytes == 8 * 1024 * 1024
    processor.on_stop(context)
    assert "ballast" not in context.state


def test_load_processor_refuses_cuda_without_it() -> None:
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        LoadProcessor(device="cuda").setup()
