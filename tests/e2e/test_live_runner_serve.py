"""``byoc serve --protocol live-runner`` as a real subprocess: SIGTERM hides the runner first, ends its
sessions with their final events, unregisters, and exits 0 (docs/protocol.md §10)."""

from __future__ import annotations

import signal

import aiohttp
import pytest

from byoc.dev.trickle_server import RunningTrickle
from tests.e2e.serve import ServeProcess
from tests.fake_live_orchestrator import RUNNER_ID, fake_live_orchestrator
from tests.integration.test_live_runner import start_session

pytestmark = pytest.mark.e2e


async def test_sigterm_hides_the_runner_ends_its_sessions_then_unregisters(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    # a heartbeat a minute away: a draining heartbeat can only come from the signal
    async with fake_live_orchestrator(trickle, http, interval="1m") as orch:
        args = (
            "passthrough",
            "--protocol",
            "live-runner",
            "--orchestrator-url",
            orch.url,
            "--drain-timeout-s",
            "8",
        )
        async with ServeProcess(*args, env={"BYOC_ORCH_SECRET": orch.secret}) as serve:
            await serve.wait_ready(http)
            await orch.wait_for(lambda: any(call.status == 200 for call in orch.heartbeats()))
            client = await start_session(http, serve.url, orch, "s1")
            before = len(orch.calls)
            serve.signal(signal.SIGTERM)
            code = await serve.wait_exit(timeout=15)
            await client.ended()
    assert code == 0, serve.log
    assert client.events[-1]["event"]["type"] == "stream_stopped"
    assert client.events[-1]["event"]["reason"] == "shutdown"
    after = [(call.method, call.path, call.authorization) for call in orch.calls[before:]]
    session = f"/runner/{RUNNER_ID}/session/s1"
    assert after == [
        ("POST", "/runners/heartbeat", "hb-secret-1"),
        ("DELETE", f"{session}/channels", ""),
        ("POST", f"{session}/stop", ""),
        ("POST", f"/runners/{RUNNER_ID}/unregister", "hb-secret-1"),
    ]
    draining = orch.calls[before]
    assert draining.body["status"] == "draining"
    assert draining.body["session_ids"] == ["s1"]  # hidden, not released
    assert orch.calls[before + 1].headers["Livepeer-Session-Token"] == "token-s1"
    assert orch.secret not in serve.log
