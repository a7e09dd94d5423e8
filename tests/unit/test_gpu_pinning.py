"""``--gpu INDEX``: the setting, the CUDA environment it sets, the monitor pinned to one device (through
the fake NVML of tests/unit/test_gpu.py) and the name the orchestrator is given."""

from __future__ import annotations

import pytest

from byoc.errors import ConfigError
from byoc.serve.config import Settings, settings_from
from byoc.serve.gpu import DeviceMemory, GpuMonitor, MemoryBudget, device_label, pin_cuda_environment
from tests.unit.test_gpu import GIB, FakeNvml, _Device, _Process

__all__ = ["two_gpus"]


def two_gpus() -> FakeNvml:
    return FakeNvml(
        devices=[
            _Device(
                name=b"NVIDIA H100 80GB HBM3", used=70 * GIB, total=80 * GIB, processes=[_Process(7, GIB)]
            ),
            _Device("NVIDIA H200", used=2 * GIB, total=141 * GIB, processes=[_Process(7, 3 * GIB)]),
        ]
    )


# --- the setting ---------------------------------------------------------------------------------


def test_gpu_is_a_flag_and_an_environment_variable() -> None:
    assert settings_from([], environ={}).gpu is None
    assert settings_from(["--gpu", "1"], environ={}).gpu == 1
    assert settings_from([], environ={"BYOC_GPU": "3"}).gpu == 3
    assert settings_from(["--gpu", "0"], environ={"BYOC_GPU": "3"}).gpu == 0  # the flag wins


@pytest.mark.parametrize(("argv", "environ"), [(["--gpu", "-1"], {}), ([], {"BYOC_GPU": "-2"})])
def test_a_negative_gpu_is_a_config_error(argv: list[str], environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"gpu must be >= 0"):
        settings_from(argv, environ=environ)


def test_a_gpu_that_is_no_number_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"BYOC_GPU='first' is not a valid int"):
        settings_from([], environ={"BYOC_GPU": "first"})


# --- the CUDA environment ------------------------------------------------------------------------


def test_pinning_shows_cuda_one_device_in_nvml_order() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST", "PATH": "/bin"}
    assert pin_cuda_environment(1, environ) == "0,1"  # what it replaced, for the log
    assert environ == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PATH": "/bin"}
    assert pin_cuda_environment(1, environ) is None  # the same value again: nothing to report

    fresh: dict[str, str] = {}
    assert pin_cuda_environment(0, fresh) is None
    assert fresh == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


# --- the monitor ---------------------------------------------------------------------------------


def test_a_pinned_monitor_reads_only_its_device() -> None:
    monitor = GpuMonitor(two_gpus())
    assert [d.index for d in monitor.devices()] == [0, 1]
    assert monitor.process_bytes(7) == 4 * GIB

    monitor.pin(1)

    assert monitor.pinned == 1
    assert monitor.devices() == [
        DeviceMemory(index=1, name="NVIDIA H200", used_bytes=2 * GIB, total_bytes=141 * GIB)
    ]
    assert monitor.device(0) is None
    assert monitor.process_bytes(7) == 3 * GIB


def test_admission_on_a_pinned_device_reads_that_device() -> None:
    nvml = two_gpus()  # device 0 is nearly full, device 1 nearly empty
    monitor = GpuMonitor(nvml)
    monitor.pin(1)
    budget = MemoryBudget(monitor, per_session_bytes=20 * GIB, headroom_bytes=GIB, device=1)
    assert budget.refusal() is None
    nvml.devices[1].used = 130 * GIB
    refusal = budget.refusal()
    assert refusal is not None
    assert refusal.startswith("GPU 1 has 11264 MiB free")


@pytest.mark.parametrize(("index", "seen"), [(2, "devices 0 to 1"), (5, "devices 0 to 1")])
def test_pinning_a_device_nvml_does_not_see_is_a_clear_error(index: int, seen: str) -> None:
    monitor = GpuMonitor(two_gpus())
    with pytest.raises(ConfigError, match=rf"^gpu {index} does not exist: NVML sees {seen}$"):
        monitor.pin(index)
    assert monitor.pinned is None
    with pytest.raises(ConfigError, match=r"NVML sees no device"):
        GpuMonitor(FakeNvml()).pin(0)
    with pytest.raises(ConfigError, match=r"gpu must be >= 0"):
        monitor.pin(-1)


def test_without_nvml_any_index_is_taken_as_given() -> None:
    monitor = GpuMonitor(FakeNvml(fail_init=True))
    monitor.pin(7)
    assert monitor.pinned == 7
    assert monitor.devices() == []


def test_the_device_is_named_with_its_model_when_nvml_reads_it() -> None:
    devices = GpuMonitor(two_gpus()).devices()
    assert device_label(1, devices) == "gpu 1: NVIDIA H200"
    assert device_label(0, devices) == "gpu 0: NVIDIA H100 80GB HBM3"
    assert device_label(3, devices) == "gpu 3"
    assert device_label(1, []) == "gpu 1"


def test_settings_keep_the_index() -> None:
    assert Settings(gpu=2).gpu == 2
