"""The container's process family as ``byoc check`` and ``byoc bench serve`` read it from /proc."""

from __future__ import annotations

import os
import subprocess
import sys

from byoc.dev.procs import descendants, family, tree_rss
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
