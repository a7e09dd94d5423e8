"""``byoc serve --gpu INDEX`` at start-up: the processor is imported with CUDA showing only that device,
the registration names the device for each protocol, and a device NVML does not see stops the start.

The fake NVML is the one of tests/unit/test_gpu.py; ``byoc serve`` itself runs as a subprocess where the
processor must see the environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.processor import Frame, Processor, SessionContext
from byoc.serve.config import Settings
from byoc.serve.gpu import GpuMonitor
from byoc.serve.runtime import EXIT_CONFIG, Runtime
from tests.fake_live_orchestrator import fake_live_orchestrator
from tests.support import FakeOrchestrator, serving_orchestrator
from tests.unit.test_gpu import FakeNvml
from tests.unit.test_gpu_pinning import two_gpus

ROOT = Path(__file__).resolve().parents[2]
SECRET = "orch-secret"
_CUDA = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


class EnvironmentRecorder(Processor):
    """Writes the CUDA environment it was imported and set up with to ``out`` (JSON), then passes frames."""

    IMPORTED = {name: os.environ.get(name) for name in _CUDA}

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def setup(self) -> None:
        seen = {"imported": self.IMPORTED, "setup": {name: os.environ.get(name) for name in _CUDA}}
        self.out.write_text(json.dumps(seen))

    def process(self, frame: Frame, session: SessionContext) -> Frame:
        return frame


@pytest.fixture
def cuda_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinning writes os.environ of this process: start without the variables, restore them after."""
    for name in _CUDA:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def orch() -> AsyncIterator[FakeOrchestrator]:
    async with serving_orchestrator(SECRET) as fake:
        yield fake


@asynccontextmanager
async def pinned(monitor: GpuMonitor, **settings: Any) -> AsyncIterator[Runtime]:
    """A runtime serving on loopback with the passthrough processor and ``monitor`` as its NVML."""
    runtime = Runtime(
        Settings(host="127.0.0.1", port=0, **settings), processor=PassthroughProcessor(), gpu=monitor
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(runtime.serve(shutdown=stop.wait()))
    await runtime.wait_listening()
    try:
        yield runtime
    finally:
        stop.set()
        assert await asyncio.wait_for(serving, 15) == 0


def _wait_for_file(path: Path, process: subprocess.Popen[str], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while not path.exists() or not path.read_text():
        if process.poll() is not None:
            raise AssertionError(f"byoc serve exited with {process.returncode}: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was not written within {deadline_s}s")
        time.sleep(0.05)


def test_the_processor_is_imported_with_cuda_pinned_to_the_device(tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOC_") and k not in _CUDA}
    env["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"  # what a machine with four GPUs may come with
    command = [
        sys.executable,
        "-m",
        "byoc",
        "serve",
        f"{__name__}:EnvironmentRecorder",
        "--processor-option",
        f"out={out}",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--gpu",
        "2",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for_file(out, process, 30)
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    pinned = {"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert json.loads(out.read_text()) == {"imported": pinned, "setup": pinned}
    assert process.returncode == 0, log
    assert "CUDA_VISIBLE_DEVICES was '0,1,2,3'; it is now 2" in log
    assert "pinned to gpu 2" in log


async def test_a_device_nvml_does_not_see_stops_the_start(
    cuda_environment: None, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = Runtime(Settings(host="127.0.0.1", port=0, gpu=2), gpu=GpuMonitor(two_gpus()))
    with caplog.at_level(logging.ERROR, logger="byoc.serve.runtime"):
        assert await asyncio.wait_for(runtime.serve(), 15) == EXIT_CONFIG
    assert "gpu 2 does not exist: NVML sees devices 0 to 1" in caplog.text
    assert runtime.port is None  # it never listened
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


async def test_byoc_registration_names_the_device(
    cuda_environment: None, orch: FakeOrchestrator, http: aiohttp.ClientSession
) -> None:
    options: dict[str, Any] = {"orchestrator_url": orch.url, "orch_secret": SECRET, "gpu": 1}
    async with pinned(GpuMonitor(two_gpus()), **options) as runtime:
        await orch.wait_for("/capability/register")
        registered = json.loads(orch.registers()[0].body)
        assert registered["description"] == "byoc live video container (gpu 1: NVIDIA H200)"
        assert [d.index for d in runtime.gpu_devices()] == [1]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        async with http.get(f"http://127.0.0.1:{runtime.port}/metrics") as response:
            metrics = await response.text()
        assert 'byoc_gpu_memory_bytes{device="1",kind="total"}' in metrics
        assert 'device="0"' not in metrics


async def test_byoc_registration_names_the_index_without_nvml(
    cuda_environment: None, orch: FakeOrchestrator
) -> None:
    options: dict[str, Any] = {"orchestrator_url": orch.url, "orch_secret": SECRET, "gpu": 3}
    async with pinned(GpuMonitor(FakeNvml(fail_init=True)), **options):
        await orch.wait_for("/capability/register")
        assert json.loads(orch.registers()[0].body)["description"] == "byoc live video container (gpu 3)"


async def test_live_runner_heartbeat_names_the_device(
    cuda_environment: None, trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with fake_live_orchestrator(trickle, http, interval="150ms") as orch:
        settings = Settings(
            host="127.0.0.1",
            port=0,
            protocol="live-runner",
            orchestrator_url=orch.url,
            orch_secret=orch.secret,
            gpu=1,
        )
        runtime = Runtime(settings, processor=PassthroughProcessor(), gpu=GpuMonitor(two_gpus()))
        stop = asyncio.Event()
        serving = asyncio.create_task(runtime.serve(shutdown=stop.wait()))
        try:
            await orch.wait_for(lambda: len(orch.heartbeats()) >= 1)
            body = orch.heartbeats()[0].body
            assert body["gpu"] == {"id": "1", "name": "NVIDIA H200", "vram_mb": 141 * 1024}
            assert json.loads(body["metadata"])["gpu"] == "gpu 1: NVIDIA H200"
        finally:
            stop.set()
            assert await asyncio.wait_for(serving, 15) == 0
