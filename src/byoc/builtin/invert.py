"""A visible effect: every pixel inverted (255 - value)."""

from __future__ import annotations

import numpy as np

from byoc.processor import Frame, Processor, SessionContext

__all__ = ["InvertProcessor"]


class InvertProcessor(Processor):
    def process(self, frame: Frame, session: SessionContext) -> np.ndarray:
        inverted: np.ndarray = np.bitwise_not(frame.rgb)  # 255 - value for uint8
        return inverted
