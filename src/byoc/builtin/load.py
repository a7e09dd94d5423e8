"""A load generator, so that the production checks have something real to measure.

Per frame it burns ``ms`` milliseconds of CPU; per session it holds ``memory_mb`` MiB, in RAM or, when
torch with CUDA is present (``device=auto`` or ``cuda``), on the GPU. Two variants:

* ``mode=gil`` (``LoadProcessor``): a pure-Python busy loop that holds the GIL while it burns;
* ``mode=async`` (``AsyncLoadProcessor``): the same loop inside ``async def process``, blocking the
  coroutine's event loop the way careless async model code does.

Options arrive as strings from the command line (``--processor-option ms=40``), so the constructors
accept both strings and numbers.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import numpy as np

from byoc.errors import ConfigError
from byoc.processor import Frame, Processor, SessionContext

__all__ = ["AsyncLoadProcessor", "LoadProcessor", "burn_cpu", "create"]

_MIB = 1024 * 1024


def burn_cpu(ms: float) -> None:
    """Spin in Python (holding the GIL) until this thread has used ``ms`` of CPU time."""
    if ms <= 0:
        return
    end = time.thread_time() + ms / 1000.0
    x = 0
    while time.thread_time() < end:
        for _ in range(200):
            x += 1


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class LoadProcessor(Processor):
    """Burns CPU per frame (holding the GIL) and holds memory per session."""

    def __init__(self, ms: float | str = 10.0, memory_mb: float | str = 0.0, device: str = "auto") -> None:
        self.ms = float(ms)
        self.memory_bytes = int(float(memory_mb) * _MIB)
        if self.ms < 0 or self.memory_bytes < 0:
            raise ConfigError(f"load processor: ms and memory_mb must be >= 0 (got {ms}, {memory_mb})")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"load processor: device must be auto, cpu or cuda (got {device!r})")
        self.device = device

    def setup(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if _cuda_available() else "cpu"
        elif self.device == "cuda" and not _cuda_available():
            raise ConfigError("load processor: device=cuda but torch with CUDA is not available")

    def on_start(self, session: SessionContext) -> None:
        session.state["ballast"] = self._allocate(self.memory_bytes)

    def _allocate(self, size: int) -> Any:
        if size <= 0:
            return None
        if self.device == "cuda":
            import torch

            return torch.ones(size, dtype=torch.uint8, device="cuda")
        return np.ones(size, dtype=np.uint8)  # ones, not zeros: the pages must really be resident

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        burn_cpu(float(session.params.get("load_ms", self.ms)))
        return frame

    def on_stop(self, session: SessionContext) -> None:
        session.state.pop("ballast", None)


class AsyncLoadProcessor(LoadProcessor):
    """Like LoadProcessor, but the burn happens inside ``async def process`` and blocks its loop."""

    async def process(self, frame: Frame, session: SessionContext) -> Frame:  # type: ignore[override]
        burn_cpu(float(session.params.get("load_ms", self.ms)))
        return frame


def create(mode: str = "gil", **options: Any) -> LoadProcessor:
    """The ``load`` built-in: ``mode=gil`` or ``mode=async``; other options go to the processor."""
    if mode == "gil":
        return LoadProcessor(**options)
    if mode == "async":
        return AsyncLoadProcessor(**options)
    raise ConfigError(f"load processor: mode must be 'gil' or 'async' (got {mode!r})")
