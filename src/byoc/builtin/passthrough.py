"""The identity processor: frames go out as they came in, with no pixel conversion at all."""

from __future__ import annotations

from byoc.processor import Frame, Processor, SessionContext

__all__ = ["PassthroughProcessor"]


class PassthroughProcessor(Processor):
    def process(self, frame: Frame, session: SessionContext) -> Frame:
        return frame
