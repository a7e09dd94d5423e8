"""Memory two processes share, and how a video frame is laid out in it.

A :class:`SharedBuffer` is a file in ``/dev/shm`` (the temporary directory elsewhere) that both the
runtime and a worker map. The runtime creates it; the worker opens it by path; the runtime unlinks the
path as soon as the worker has it mapped, so nothing is left behind whichever process dies.

Each session has one buffer with two regions: the frame going to the worker (``input``) and the frame
coming back (``output``). A frame travels as ``yuv420p`` when it is one (even width and height): the
decoder's planes are copied once, straight into the buffer, and no colour conversion happens unless the
processor asks for ``Frame.rgb``. Anything else travels as ``rgb24``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

__all__ = ["FrameLayout", "SharedBuffer", "read_frame", "write_frame"]

_SHM = Path("/dev/shm")


class SharedBuffer:
    """A memory block two processes map, by path."""

    def __init__(self, path: str, size: int, *, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path, self.size = path, size
        self.linked = True

    @classmethod
    def create(cls, size: int) -> SharedBuffer:
        directory = _SHM if _SHM.is_dir() else Path(tempfile.gettempdir())
        return cls(str(directory / f"byoc-{os.getpid()}-{secrets.token_hex(8)}"), size, create=True)

    @classmethod
    def open(cls, path: str, size: int) -> SharedBuffer:
        return cls(path, size, create=False)

    def unlink(self) -> None:
        """Forget the path (the mappings stay valid): once both processes have mapped it."""
        if self.linked:
            self.linked = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def array(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 view of the buffer from ``offset`` (no copy)."""
        count = int(np.prod(shape))
        return np.frombuffer(self._map, dtype=np.uint8, count=count, offset=offset).reshape(shape)

    def close(self) -> None:
        self.unlink()
        with contextlib.suppress(BufferError):  # a view still exists: the mapping goes with it
            self._map.close()


@dataclass(frozen=True, slots=True)
class FrameLayout:
    """How one frame lies in a buffer: its pixel format (``yuv420p`` or ``rgb24``) and size."""

    format: str
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, ...]:
        if self.format == "yuv420p":
            return (self.height * 3 // 2, self.width)
        return (self.height, self.width, 3)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    @staticmethod
    def largest(width: int, height: int) -> int:
        """Bytes any frame of this size needs (``rgb24``, the larger layout)."""
        return width * height * 3


def write_frame(frame: av.VideoFrame, buffer: SharedBuffer, offset: int) -> FrameLayout:
    """Copy ``frame``'s pixels into ``buffer`` at ``offset`` (which must have room for
    ``FrameLayout.largest``); the layout says how they lie."""
    width, height = frame.width, frame.height
    if frame.format.name == "yuv420p" and width % 2 == 0 and height % 2 == 0:
        layout = FrameLayout("yuv420p", width, height)
        target = buffer.array(offset, layout.shape)
        sizes = ((height, width), (height // 2, width // 2), (height // 2, width // 2))
        row = 0
        chroma = target[height:].reshape(height // 2, width)  # U then V, each (h/2) x (w/2), packed
        for index, (plane, (rows, columns)) in enumerate(zip(frame.planes, sizes, strict=True)):
            lines = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(rows, plane.line_size)
            source = lines[:, :columns]
            if index == 0:
                target[:height] = source
            else:
                flat = chroma.reshape(-1)[row : row + rows * columns]
                flat.reshape(rows, columns)[:] = source
                row += rows * columns
        return layout
    layout = FrameLayout("rgb24", width, height)
    rgb = frame.to_ndarray(format="rgb24")
    buffer.array(offset, layout.shape)[:] = rgb
    return layout


def read_frame(buffer: SharedBuffer, offset: int, layout: FrameLayout) -> np.ndarray:
    """The frame at ``offset`` as an array in its layout (a view: no copy)."""
    return buffer.array(offset, layout.shape)
