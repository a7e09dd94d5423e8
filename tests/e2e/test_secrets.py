"""Secrets of ``byoc serve``: read from files, and a warning when one is given as a flag (any process on
the machine can read a command line in /proc/PID/cmdline). Real subprocesses, their log read from stderr."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.serve import ServeProcess
from tests.support import FakeOrchestrator

pytestmark = pytest.mark.e2e

FLAG_WARNING = "on the command line is visible to every process"


async def registered(orchestrator: FakeOrchestrator, name: str = "byoc") -> dict[str, object]:
    async with asyncio.timeout(20):
        while name not in orchestrator.registered:
            await orchestrator.wait_for("/capability/register")
            await asyncio.sleep(0.05)
    return orchestrator.registered[name]


async def status_code(http: aiohttp.ClientSession, serve: ServeProcess, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(f"{serve.url}/stream/status", headers=headers) as response:
        return response.status


async def test_secrets_from_files_work_without_a_warning(
    http: aiohttp.ClientSession, fake_orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    fake_orchestrator.secret = "orch-secret-from-a-file"
    (tmp_path / "orch").write_text(fake_orchestrator.secret + "\n")
    (tmp_path / "token").write_text("token-from-a-file\n")
    args = ["--orchestrator-url", fake_orchestrator.url, "--orch-secret-file", str(tmp_path / "orch")]
    async with ServeProcess(*args, "--token-file", str(tmp_path / "token")) as serve:
        await serve.wait_ready(http)
        registration = await registered(fake_orchestrator)
        assert registration["token"] == "token-from-a-file"  # so the orchestrator sends it
        assert await status_code(http, serve, None) == 401
        assert await status_code(http, serve, "token-from-a-file") == 200
        serve.signal()
        assert await serve.wait_exit() == 0
    assert FLAG_WARNING not in serve.log
    assert "from-a-file" not in serve.log


async def test_secrets_given_as_flags_are_warned_about(
    http: aiohttp.ClientSession, fake_orchestrator: FakeOrchestrator
) -> None:
    args = ["--orchestrator-url", fake_orchestrator.url, f"--orch-secret={fake_orchestrator.secret}"]
    async with ServeProcess(*args, "--token", "token-as-a-flag") as serve:
        await serve.wait_ready(http)
        await registered(fake_orchestrator)
        orch_warning = await serve.wait_for_log(f"--orch-secret {FLAG_WARNING}")
        token_warning = await serve.wait_for_log(f"--token {FLAG_WARNING}")
        assert await status_code(http, serve, "token-as-a-flag") == 200  # still works
        serve.signal()
        await serve.wait_exit()
    assert "WARNING" in orch_warning
    assert "--orch-secret-file" in orch_warning
    assert "BYOC_ORCH_SECRET" in orch_warning
    assert "--token-file" in token_warning
    assert "BYOC_TOKEN" in token_warning
    assert "token-as-a-flag" not in serve.log
