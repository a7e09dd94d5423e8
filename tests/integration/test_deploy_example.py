"""What the image ships besides byoc: the example processor works, and the README's deploying section
names files that exist.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import av
import numpy as np
import pytest

from byoc.processor import Frame, Processor, SessionContext, load_processor
from tests.integration.deploy_support import (
    EXAMPLE_PROCESSOR,
    ROOT,
)

# --- the example processor the image ships -------------------------------------------------------


class _Sink:
    def send_data(self, message: Any) -> None:
        pass

    def send_event(self, event: Mapping[str, Any]) -> None:
        pass


def _frame(rgb: np.ndarray) -> Frame:
    return Frame(av.VideoFrame.from_ndarray(rgb, format="rgb24"))


def _session(params: dict[str, Any]) -> SessionContext:
    return SessionContext("s", 16, 16, params, _Sink())


@pytest.fixture
def sepia(monkeypatch: pytest.MonkeyPatch) -> Processor:
    monkeypatch.syspath_prepend(str(ROOT))
    return load_processor(EXAMPLE_PROCESSOR, {"strength": "0.5"})


def test_example_processor_tones_frames_sepia(sepia: Processor) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    session = _session({"strength": 1})
    sepia.on_start(session)
    out = np.asarray(sepia.process(_frame(rgb), session))
    assert out.shape == (16, 16, 3)
    assert out.dtype == np.uint8
    expected = np.clip(
        np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]]) @ [200, 100, 50],
        0,
        255,
    )
    assert np.abs(out[8, 8].astype(float) - expected).max() <= 1.0
    assert out[8, 8, 0] >= out[8, 8, 1] >= out[8, 8, 2]  # warm: red over green over blue


def test_example_processor_strength_comes_from_options_then_params(sepia: Processor) -> None:
    rgb = np.full((16, 16, 3), 128, dtype=np.uint8)
    session = _session({})
    sepia.on_start(session)
    assert session.state["strength"] == 0.5  # the container-wide option
    sepia.on_params(session, {"strength": "loud"})  # a bad update is ignored
    assert session.state["strength"] == 0.5
    sepia.on_params(session, {"strength": 0})
    frame = _frame(rgb)
    assert sepia.process(frame, session) is frame  # strength 0: untouched, not even converted
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        load_processor(EXAMPLE_PROCESSOR, {"strength": "2"})


def test_readme_deploying_section_names_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploying\n" in readme
    section = readme.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:deploy|examples)/[\w./-]+|Dockerfile|\.dockerignore)`", section))
    assert "deploy/compose.yaml" in named
    optional = {"deploy/secrets.env"}  # the user's own file, never in the repository
    missing = sorted(path for path in named - optional if not (ROOT / path).exists())
    assert not missing, missing
