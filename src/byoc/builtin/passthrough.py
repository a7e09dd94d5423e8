"""The identity processor: frames go out as they came in, with no pixel conversion at all.

It keeps every hook of :class:`~byoc.processor.Processor` as it is, so a session runs no processing
stage for it: decoded frames go straight to the encoder (byoc.session.worker.does_nothing)."""

from __future__ import annotations

from byoc.processor import Processor

__all__ = ["PassthroughProcessor"]


class PassthroughProcessor(Processor):
    """``process`` returns the frame it is given (the base class's hooks, unchanged)."""
