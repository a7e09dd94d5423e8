"""A sepia tone, as an example of a processor that lives outside the byoc package.

The image copies ``examples/`` to ``/app/examples`` and puts ``/app`` on ``PYTHONPATH``, so this
processor is selected with::

    BYOC_PROCESSOR=examples.sepia_processor:SepiaProcessor
    BYOC_PROCESSOR_OPTION=strength=0.8        # optional: the container-wide default strength

Your own processor goes in the same way: ``COPY my_model.py /app/`` in a Dockerfile that starts
``FROM`` the byoc image, then ``BYOC_PROCESSOR=my_model:MyModel``. Options arrive as strings, as
keyword arguments of the class.

Each stream may choose its own strength with ``{"strength": 0.5}`` in its start parameters, and change
it later with a parameter update. 0 leaves frames untouched (without even converting their pixels),
1 is full sepia.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from byoc import Frame, Processor, SessionContext

__all__ = ["SEPIA_MATRIX", "SepiaProcessor", "parse_strength"]

log = logging.getLogger(__name__)

SEPIA_MATRIX: npt.NDArray[np.float32] = np.array(
    [
        [0.393, 0.769, 0.189],
        [0.349, 0.686, 0.168],
        [0.272, 0.534, 0.131],
    ],
    dtype=np.float32,
)
"""Rows give the output red, green and blue as weights of the input red, green and blue."""


def parse_strength(value: Any) -> float:
    """A strength from an option or a parameter: a number within 0..1 (ValueError otherwise)."""
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number within 0..1, got {value!r}") from None
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be within 0..1, got {strength}")
    return strength


class SepiaProcessor(Processor):
    """Tones every frame sepia; ``strength`` blends between the original (0) and full sepia (1)."""

    def __init__(self, strength: str | float = 1.0) -> None:
        self.default_strength = parse_strength(strength)
        # Transposed once, so that an H x W x 3 picture times it gives the toned picture.
        self._weights: npt.NDArray[np.float32] = np.ascontiguousarray(SEPIA_MATRIX.T)

    def on_start(self, session: SessionContext) -> None:
        session.state["strength"] = self._strength_from(session.params, self.default_strength)

    def on_params(self, session: SessionContext, params: Mapping[str, Any]) -> None:
        current = float(session.state.get("strength", self.default_strength))
        session.state["strength"] = self._strength_from(params, current)

    def process(self, frame: Frame, session: SessionContext) -> Frame | npt.NDArray[np.uint8]:
        strength = float(session.state.get("strength", self.default_strength))
        if strength <= 0.0:
            return frame
        return self.tone(frame.rgb, strength)

    def tone(self, rgb: npt.NDArray[np.uint8], strength: float = 1.0) -> npt.NDArray[np.uint8]:
        """The sepia version of an H x W x 3 uint8 RGB picture."""
        original = rgb.astype(np.float32)
        toned = original @ self._weights
        if strength < 1.0:
            toned = strength * toned + (1.0 - strength) * original
        result: npt.NDArray[np.uint8] = np.clip(toned, 0.0, 255.0).astype(np.uint8)
        return result

    @staticmethod
    def _strength_from(params: Mapping[str, Any], fallback: float) -> float:
        if "strength" not in params:
            return fallback
        try:
            return parse_strength(params["strength"])
        except ValueError as exc:
            log.warning("ignoring %s; keeping strength %s", exc, fallback)
            return fallback
