"""What the operating system says about memory and CPU (Linux; harmless elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

__all__ = ["cpu_seconds", "memory_limit", "resident_bytes", "trim_memory"]

_UNLIMITED = 1 << 60


def memory_limit(root: Path = Path("/")) -> tuple[int, str]:
    """Memory this process may use: its cgroup limit (v2, then v1), else the host's RAM."""
    for path, source in (
        ("sys/fs/cgroup/memory.max", "cgroup"),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "cgroup"),
    ):
        with contextlib.suppress(OSError, ValueError):
            text = (root / path).read_text().strip()
            if text != "max" and int(text) < _UNLIMITED:
                return int(text), source
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "host"
    return 0, "unknown"


def resident_bytes(pid: int | None = None) -> int:
    """Resident memory (RSS) of a process (this one by default); 0 if it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU time of a process (this one by default), every thread included."""
    fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_memory() -> bool:
    """Give freed heap memory back to the system (glibc's malloc_trim); False where that is not possible.

    A session frees its decoder, encoder and frames when it ends, but glibc keeps much of that memory
    for reuse; trimming after a session makes resident memory follow the sessions actually running.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
