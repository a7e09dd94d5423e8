"""The container's process family as ``byoc check`` and ``byoc bench serve`` read it from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from byoc.dev.procs import descendants, family, machine_cpu, tree_rss
from byoc.serve.system import resident_bytes

# a child that starts a grandchild, prints its pid, then waits for its stdin to close
_PARENT = (
    "import subprocess, sys\n"
    "grandchild = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=sys.stdin)\n"
    "print(grandchild.pid, flush=True)\n"
    "sys.stdin.read()\n"
    "grandchild.wait()\n"
)


def test_family_holds_children_and_grandchildren_and_tree_rss_sums_them() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        assert set(descendants(os.getpid())) >= {child.pid, grandchild}
        assert descendants(child.pid) == [grandchild]
        assert family(child.pid) == [child.pid, grandchild]
        total, alone = tree_rss(child.pid), resident_bytes(child.pid)
        assert total > alone > 0
        assert tree_rss(os.getpid()) > resident_bytes(os.getpid())
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    assert descendants(child.pid) == []


def test_machine_cpu_counts_busy_time_as_this_process_spends_it() -> None:
    busy_before, idle_before = machine_cpu()
    spent = time.process_time()
    while time.process_time() - spent < 0.3:  # CPU this process burns counts as the machine's busy time
        pass
    busy, idle = machine_cpu()
    assert busy - busy_before >= 0.25  # tick granularity: 10 ms
    assert idle >= idle_before
