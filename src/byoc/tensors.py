"""Frames to and from torch tensors, for processors that use torch (torch is not a byoc dependency).

``to_tensor(frame, device)`` gives a float tensor of shape (1, H, W, 3) with values in 0..1 on the
chosen device (the layout the Livepeer reference pipelines use); ``to_rgb(tensor)`` turns a tensor of
that shape, or (H, W, 3), back into an H x W x 3 uint8 array that ``process()`` can return.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from byoc.errors import ConfigError
from byoc.processor import Frame

if TYPE_CHECKING:
    import torch

__all__ = ["release_cached_memory", "to_rgb", "to_tensor", "torch_module"]


def release_cached_memory() -> None:
    """Give the torch CUDA allocator's cached blocks back to the device, after an out-of-memory error;
    nothing when torch is not imported or this process never used CUDA."""
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return
    with contextlib.suppress(Exception):  # a broken driver must not turn one error into two
        cuda.empty_cache()


def torch_module() -> Any:
    """The torch module, or a ConfigError that says how to get it."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ConfigError(
            "this processor needs torch, which byoc does not install: pip install torch "
            "(a CUDA build for GPUs)"
        ) from exc


def to_tensor(frame: Frame, device: str = "cuda", dtype: Any = None) -> torch.Tensor:
    """The frame as a (1, H, W, 3) tensor with values in 0..1 (float32 unless ``dtype`` says otherwise)."""
    torch = torch_module()
    tensor = torch.from_numpy(frame.rgb).to(device=device, non_blocking=True)
    return tensor.to(dtype or torch.float32).div_(255.0).unsqueeze(0)


def to_rgb(tensor: torch.Tensor) -> np.ndarray:
    """A (1, H, W, 3) or (H, W, 3) tensor with values in 0..1 as an H x W x 3 uint8 array."""
    if tensor.dim() == 4:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[-1] != 3:
        raise ValueError(f"expected a (1, H, W, 3) or (H, W, 3) tensor, got shape {tuple(tensor.shape)}")
    scaled = tensor.detach().clamp(0.0, 1.0).mul(255.0).round().to("cpu")
    return np.ascontiguousarray(scaled.numpy().astype(np.uint8))
