"""``byoc serve`` and its listener process (byoc.serve.listener) under signals: the pair ends together
and cleanly, whichever of them the signal reached."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.serve import ServeProcess
from tests.support import listener_pids

pytestmark = pytest.mark.e2e


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("to_both", [True, False], ids=["ctrl-c to the group", "sigterm to byoc serve"])
async def test_a_signal_drains_and_both_processes_exit(http: aiohttp.ClientSession, to_both: bool) -> None:
    async with ServeProcess() as serve:
        await serve.wait_ready(http)
        (pid,) = listener_pids(serve.pid)
        async with http.get(f"{serve.url}/health") as response:
            assert response.status == 200
        if to_both:  # what a terminal's Ctrl-C does: every process of the group gets SIGINT
            serve.signal(signal.SIGINT)
            os.kill(pid, signal.SIGINT)
        else:  # what Kubernetes and Docker do: PID 1 only
            serve.signal(signal.SIGTERM)
        assert await serve.wait_exit() == 0
    assert not running(pid)
    assert "drained in" in serve.log
    assert "Traceback" not in serve.log, serve.log[-3000:]
    assert "listener process" not in serve.log, serve.log[-3000:]  # it never ended on its own
