"""The torch helpers (they run where torch is installed; byoc itself does not need it)."""

from __future__ import annotations

import importlib.util
from fractions import Fraction

import av
import numpy as np
import pytest

from byoc.dev.synthetic import pattern
from byoc.errors import ConfigError
from byoc.processor import Frame
from byoc.tensors import to_rgb, to_tensor, torch_module


def test_without_torch_the_error_says_how_to_get_it() -> None:
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed")
    with pytest.raises(ConfigError, match="pip install torch"):
        torch_module()


def test_round_trip_through_a_tensor() -> None:
    pytest.importorskip("torch")
    video = av.VideoFrame.from_ndarray(pattern(5, 64, 32), format="rgb24")
    video.pts, video.time_base = 0, Fraction(1, 90000)
    frame = Frame(video)
    tensor = to_tensor(frame, device="cpu")
    assert tuple(tensor.shape) == (1, 32, 64, 3)
    assert float(tensor.max()) <= 1.0
    assert np.array_equal(to_rgb(tensor), frame.rgb)
    with pytest.raises(ValueError, match="expected a"):
        to_rgb(tensor[0, :, :, 0])
