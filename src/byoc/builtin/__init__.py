"""Built-in processors: ``passthrough``, ``invert`` (a visible effect) and ``load`` (a load generator)."""

from __future__ import annotations

from byoc.builtin.invert import InvertProcessor
from byoc.builtin.load import AsyncLoadProcessor, LoadProcessor
from byoc.builtin.passthrough import PassthroughProcessor

__all__ = ["AsyncLoadProcessor", "InvertProcessor", "LoadProcessor", "PassthroughProcessor"]
