"""Stage threads: daemon threads, errors kept, and an optional lower priority."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from byoc.media.stage import Stage


class Probe(Stage):
    def __init__(self, nice: int = 0) -> None:
        super().__init__("probe", nice=nice)
        self.niceness: int | None = None
        self.daemon = False

    def _run(self) -> None:
        self.daemon = threading.current_thread().daemon
        self.niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is a Linux feature")
def test_nice_lowers_only_the_stage_thread() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    stage = Probe(nice=7)
    stage.start()
    assert stage.join(5)
    assert stage.niceness == min(19, before + 7)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the rest of the process is untouched
    assert stage.daemon
    assert not stage.running
