"""Built-in processors: ``passthrough``, ``invert`` (a visible effect) and ``load`` (a load generator)."""

from __future__ import annotations

from byoc.processors.invert import InvertProcessor
from byoc.processors.load import AsyncLoadProcessor, LoadProcessor
from byoc.processors.passthrough import PassthroughProcessor

__all__ = ["AsyncLoadProcessor", "InvertProcessor", "LoadProcessor", "PassthroughProcessor"]
