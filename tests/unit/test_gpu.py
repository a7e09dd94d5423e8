"""GPU memory readings and admission by memory, driven through a fake NVML and a fake torch."""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from byoc.serve.gpu import (
    DeviceMemory,
    GpuMonitor,
    MemoryBudget,
    TorchMemory,
    reset_torch_peaks,
    torch_memory,
)

MIB = 1024 * 1024
GIB = 1024 * MIB


class FakeNvmlError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class _MemoryInfo:
    used: int
    total: int

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None  # pynvml's name


@dataclass
class _Device:
    name: bytes | str
    used: int
    total: int
    processes: list[_Process] = field(default_factory=list)


@dataclass
class FakeNvml:
    """The slice of the pynvml API that byoc.serve.gpu uses, with switches for failures."""

    devices: list[_Device] = field(default_factory=list)
    fail_init: bool = False
    fail_reads: bool = False
    init_calls: int = 0
    shutdown_calls: int = 0
    NVMLError: type[Exception] = FakeNvmlError

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.fail_init:
            raise FakeNvmlError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        if self.fail_reads:
            raise FakeNvmlError("GPU is lost")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index >= len(self.devices):
            raise FakeNvmlError("Invalid Argument")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _MemoryInfo:
        if self.fail_reads:
            raise FakeNvmlError("GPU is lost")
        device = self.devices[handle]
        return _MemoryInfo(used=device.used, total=device.total)

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        return self.devices[handle].name

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Process]:
        if self.fail_reads:
            raise FakeNvmlError("GPU is lost")
        return self.devices[handle].processes


def one_gpu(used: int = 1 * GIB, total: int = 80 * GIB) -> FakeNvml:
    return FakeNvml(devices=[_Device(name=b"NVIDIA H100 80GB HBM3", used=used, total=total)])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- GpuMonitor ------------------------------------------------------------------------------------------


def test_available_monitor_reads_every_device_and_decodes_names() -> None:
    nvml = FakeNvml(
        devices=[
            _Device(name=b"NVIDIA H100 80GB HBM3", used=3 * GIB, total=80 * GIB),
            _Device(name="NVIDIA H200", used=0, total=141 * GIB),
        ]
    )
    monitor = GpuMonitor(nvml)

    assert monitor.available
    assert monitor.devices() == [
        DeviceMemory(index=0, name="NVIDIA H100 80GB HBM3", used_bytes=3 * GIB, total_bytes=80 * GIB),
        DeviceMemory(index=1, name="NVIDIA H200", used_bytes=0, total_bytes=141 * GIB),
    ]
    assert monitor.devices()[0].free_bytes == 77 * GIB
    assert monitor.device(1) is not None
    assert monitor.device(2) is None


def test_each_call_is_a_fresh_reading() -> None:
    nvml = one_gpu(used=1 * GIB)
    monitor = GpuMonitor(nvml)
    assert monitor.devices()[0].used_bytes == 1 * GIB
    nvml.devices[0].used = 5 * GIB
    assert monitor.devices()[0].used_bytes == 5 * GIB


def test_free_bytes_never_negative() -> None:
    assert DeviceMemory(index=0, name="x", used_bytes=10, total_bytes=8).free_bytes == 0


def test_init_failure_makes_the_monitor_unavailable_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    nvml = one_gpu()
    nvml.fail_init = True
    with caplog.at_level(logging.INFO, logger="byoc.serve.gpu"):
        monitor = GpuMonitor(nvml)

    assert not monitor.available
    assert monitor.devices() == []
    assert monitor.device(0) is None
    assert any("Driver Not Loaded" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    monitor.close()
    assert nvml.shutdown_calls == 0  # never initialised, so nothing to shut down


def test_missing_pynvml_makes_the_monitor_unavailable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.INFO, logger="byoc.serve.gpu"):
        monitor = GpuMonitor()
    assert not monitor.available
    assert monitor.devices() == []
    assert any("not installed" in r.getMessage() for r in caplog.records)


def test_real_monitor_on_this_machine() -> None:
    monitor = GpuMonitor()
    try:
        readings = monitor.devices()
        if monitor.available:
            pytest.skip("NVML is usable here; the absent-GPU assertion does not apply")
        assert readings == []
    finally:
        monitor.close()
        monitor.close()


def test_read_error_mid_run_returns_empty_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    nvml = one_gpu()
    monitor = GpuMonitor(nvml)
    assert len(monitor.devices()) == 1

    nvml.fail_reads = True
    with caplog.at_level(logging.WARNING, logger="byoc.serve.gpu"):
        assert monitor.devices() == []
    assert any("GPU is lost" in r.getMessage() for r in caplog.records)
    assert monitor.available  # a failed read is not a failed init

    nvml.fail_reads = False
    assert len(monitor.devices()) == 1


def test_read_error_warning_is_rate_limited_per_message(caplog: pytest.LogCaptureFixture) -> None:
    nvml = one_gpu()
    clock = FakeClock()
    monitor = GpuMonitor(nvml, clock=clock)
    nvml.fail_reads = True

    def warnings() -> int:
        return sum(1 for r in caplog.records if r.levelno == logging.WARNING)

    with caplog.at_level(logging.WARNING, logger="byoc.serve.gpu"):
        for _ in range(5):
            monitor.devices()
        assert warnings() == 1
        clock.now += 30
        monitor.devices()
        assert warnings() == 1
        clock.now += 31
        monitor.devices()
        assert warnings() == 2


def test_close_shuts_down_once_and_stops_readings() -> None:
    nvml = one_gpu()
    monitor = GpuMonitor(nvml)
    monitor.close()
    monitor.close()
    assert nvml.shutdown_calls == 1
    assert not monitor.available
    assert monitor.devices() == []


# -- torch ------------------------------------------------------------------------------------------------


class FakeCuda:
    def __init__(self, *, available: bool = True, devices: int = 2, initialized: bool = True) -> None:
        self.available = available
        self.count = devices
        self.initialized = initialized
        self.resets: list[int] = []
        self.raise_on_read = False

    def is_available(self) -> bool:
        return self.available

    def is_initialized(self) -> bool:
        return self.initialized

    def device_count(self) -> int:
        return self.count

    def memory_allocated(self, i: int) -> int:
        if self.raise_on_read:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return (i + 1) * 100 * MIB

    def memory_reserved(self, i: int) -> int:
        return (i + 1) * 200 * MIB

    def max_memory_allocated(self, i: int) -> int:
        return (i + 1) * 150 * MIB

    def reset_peak_memory_stats(self, i: int) -> None:
        self.resets.append(i)


def install_fake_torch(monkeypatch: pytest.MonkeyPatch, cuda: FakeCuda) -> None:
    torch: Any = types.ModuleType("torch")
    torch.cuda = cuda
    monkeypatch.setitem(sys.modules, "torch", torch)


def test_torch_memory_is_empty_when_torch_is_not_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert torch_memory() == []
    reset_torch_peaks()  # must not raise
    assert "torch" not in sys.modules  # and must not import it


def test_torch_memory_reads_each_device(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_torch(monkeypatch, FakeCuda(devices=2))
    assert torch_memory() == [
        TorchMemory(
            index=0, allocated_bytes=100 * MIB, reserved_bytes=200 * MIB, peak_allocated_bytes=150 * MIB
        ),
        TorchMemory(
            index=1, allocated_bytes=200 * MIB, reserved_bytes=400 * MIB, peak_allocated_bytes=300 * MIB
        ),
    ]


def test_a_pinned_process_reads_its_one_device_under_the_pinned_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # --gpu 3: CUDA shows that device alone, as device 0; the reading names it 3, as NVML's do
    install_fake_torch(monkeypatch, FakeCuda(devices=1))
    assert torch_memory(pinned=3) == [
        TorchMemory(
            index=3, allocated_bytes=100 * MIB, reserved_bytes=200 * MIB, peak_allocated_bytes=150 * MIB
        )
    ]


def test_torch_memory_without_cuda_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(available=False)
    install_fake_torch(monkeypatch, cuda)
    assert torch_memory() == []
    reset_torch_peaks()
    assert cuda.resets == []


def test_torch_errors_become_empty_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.raise_on_read = True
    install_fake_torch(monkeypatch, cuda)
    assert torch_memory() == []


def test_reset_torch_peaks_resets_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(devices=3)
    install_fake_torch(monkeypatch, cuda)
    reset_torch_peaks()
    assert cuda.resets == [0, 1, 2]


def test_reset_torch_peaks_does_not_create_a_cuda_context(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(initialized=False)
    install_fake_torch(monkeypatch, cuda)
    reset_torch_peaks()
    assert cuda.resets == []


# -- MemoryBudget -----------------------------------------------------------------------------------------


def test_configured_cost_fits_then_refuses_with_numbers() -> None:
    nvml = one_gpu(used=10 * GIB, total=16 * GIB)  # 6144 MiB free
    budget = MemoryBudget(GpuMonitor(nvml), per_session_bytes=2 * GIB, headroom_bytes=512 * MIB)
    assert budget.per_session_bytes == 2 * GIB
    assert budget.refusal() is None

    nvml.devices[0].used = 16 * GIB - 812 * MIB
    reason = budget.refusal()
    assert reason == "GPU 0 has 812 MiB free; a session needs 2048 MiB plus 512 MiB headroom"


def test_fit_is_inclusive_of_the_exact_amount() -> None:
    nvml = one_gpu(used=16 * GIB - (2 * GIB + 512 * MIB), total=16 * GIB)
    budget = MemoryBudget(GpuMonitor(nvml), per_session_bytes=2 * GIB, headroom_bytes=512 * MIB)
    assert budget.refusal() is None
    nvml.devices[0].used += 1
    assert budget.refusal() is not None


def test_unknown_cost_requires_only_headroom() -> None:
    nvml = one_gpu(used=16 * GIB - 600 * MIB, total=16 * GIB)
    budget = MemoryBudget(GpuMonitor(nvml), per_session_bytes=None, headroom_bytes=512 * MIB)
    assert budget.per_session_bytes is None
    assert budget.refusal() is None

    nvml.devices[0].used = 16 * GIB - 300 * MIB
    reason = budget.refusal()
    assert reason is not None
    assert "300 MiB free" in reason
    assert "512 MiB headroom" in reason


def test_learned_cost_keeps_the_largest_per_session_observation() -> None:
    nvml = one_gpu(used=4 * GIB, total=80 * GIB)
    budget = MemoryBudget(GpuMonitor(nvml), per_session_bytes=None, headroom_bytes=0)

    budget.observe(1)  # no baseline yet: ignored
    before_baseline = budget.per_session_bytes
    assert before_baseline is None

    budget.set_baseline()
    assert budget.baseline_bytes == 4 * GIB

    nvml.devices[0].used = 4 * GIB + 1 * GIB  # 1 session: 1 GiB each
    budget.observe(1)
    assert budget.per_session_bytes == 1 * GIB

    nvml.devices[0].used = 4 * GIB + 3 * GIB  # 2 sessions: 1.5 GiB each
    budget.observe(2)
    assert budget.per_session_bytes == 3 * GIB // 2

    nvml.devices[0].used = 4 * GIB + 3 * GIB  # 3 sessions: 1 GiB each; the peak stays
    budget.observe(3)
    assert budget.per_session_bytes == 3 * GIB // 2

    budget.observe(0)  # idle readings say nothing about sessions
    assert budget.per_session_bytes == 3 * GIB // 2

    nvml.devices[0].used = 80 * GIB - 1 * GIB
    assert budget.refusal() == "GPU 0 has 1024 MiB free; a session needs 1536 MiB plus 0 MiB headroom"


def test_configured_cost_wins_over_observations() -> None:
    nvml = one_gpu(used=1 * GIB)
    budget = MemoryBudget(GpuMonitor(nvml), per_session_bytes=512 * MIB, headroom_bytes=0)
    budget.set_baseline()
    nvml.devices[0].used = 9 * GIB
    budget.observe(1)
    assert budget.per_session_bytes == 512 * MIB


def test_budget_uses_the_chosen_device() -> None:
    nvml = FakeNvml(
        devices=[
            _Device(name="a", used=0, total=8 * GIB),
            _Device(name="b", used=8 * GIB - 100 * MIB, total=8 * GIB),
        ]
    )
    monitor = GpuMonitor(nvml)
    assert MemoryBudget(monitor, per_session_bytes=GIB, headroom_bytes=0, device=0).refusal() is None
    reason = MemoryBudget(monitor, per_session_bytes=GIB, headroom_bytes=0, device=1).refusal()
    assert reason is not None
    assert reason.startswith("GPU 1 has 100 MiB free")


def test_unavailable_monitor_never_refuses_and_learns_nothing() -> None:
    nvml = one_gpu(used=80 * GIB, total=80 * GIB)
    nvml.fail_init = True
    budget = MemoryBudget(GpuMonitor(nvml), per_session_bytes=None, headroom_bytes=GIB)
    budget.set_baseline()
    budget.observe(2)
    assert budget.refusal() is None
    assert budget.baseline_bytes is None
    assert budget.per_session_bytes is None


def test_read_failure_does_not_refuse() -> None:
    nvml = one_gpu(used=80 * GIB, total=80 * GIB)
    budget = MemoryBudget(GpuMonitor(nvml), per_session_bytes=GIB, headroom_bytes=0)
    assert budget.refusal() is not None
    nvml.fail_reads = True
    assert budget.refusal() is None


@pytest.mark.parametrize(("per_session", "headroom"), [(-1, 0), (None, -1)])
def test_negative_sizes_are_rejected(per_session: int | None, headroom: int) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        MemoryBudget(GpuMonitor(one_gpu()), per_session_bytes=per_session, headroom_bytes=headroom)


def test_process_memory_is_summed_over_devices_for_that_pid_only() -> None:
    nvml = FakeNvml(
        devices=[
            _Device("a", used=0, total=GIB, processes=[_Process(7, 300 * MIB), _Process(8, 5 * MIB)]),
            _Device("b", used=0, total=GIB, processes=[_Process(7, 200 * MIB), _Process(7, None)]),
        ]
    )
    monitor = GpuMonitor(nvml)
    assert monitor.process_bytes(7) == 500 * MIB  # an unknown amount (None) adds nothing
    assert monitor.process_bytes(9) == 0
    nvml.fail_reads = True
    assert monitor.process_bytes(7) == 0
    assert GpuMonitor(FakeNvml(fail_init=True)).process_bytes(7) == 0
