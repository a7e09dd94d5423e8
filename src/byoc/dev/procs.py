"""A process and the processes it started, read from /proc: what ``byoc bench serve`` and ``byoc check``
count as the container's memory and CPU, the worker processes of ``--isolation process`` included
(docs/architecture.md, "Process isolation")."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from byoc.serve.system import cpu_seconds, resident_bytes

__all__ = ["descendants", "family", "machine_cpu", "tree_cpu", "tree_rss"]


def _parents() -> dict[int, int]:
    """Every process's parent: pid → ppid (the field after the state in ``/proc/PID/stat``)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # a process that ended meanwhile
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and the ones they started, and so on (not ``pid`` itself)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found and child != pid:
                found.append(child)
                pending.append(child)
    return found


def family(pid: int) -> list[int]:
    """``pid`` first, then its descendants."""
    return [pid, *descendants(pid)]


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants together (bytes; a process that ended counts 0)."""
    return sum(resident_bytes(member) for member in family(pid))


def tree_cpu(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` and its descendants that are still running."""
    total = 0.0
    for member in family(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):  # a worker that ended meanwhile
            total += cpu_seconds(member)
    return total


def machine_cpu() -> tuple[float, float]:
    """The whole machine's CPU time so far, from the first line of ``/proc/stat``: (busy, idle) in
    seconds summed over its cores; idle includes waiting for I/O. (0, 0) where there is no /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0, 0.0
    ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    hertz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hertz, idle / hertz
