"""GPU memory readings (NVML for the device, torch for this process) and admission by memory.

Everything here degrades to "no reading" rather than raising: a machine without a GPU, without the
NVIDIA driver or without ``nvidia-ml-py`` gets an unavailable monitor whose readings are empty, and a
budget that never refuses. torch is never imported here; its allocator is read only when the
processor already imported it.

``--gpu INDEX`` pins a process to one device: :meth:`GpuMonitor.pin` restricts the readings to it,
:func:`pin_cuda_environment` makes CUDA show only that device (as ``cuda:0``), and :func:`device_label`
names it for the orchestrator.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from byoc.errors import ConfigError

__all__ = [
    "DeviceMemory",
    "GpuMonitor",
    "MemoryBudget",
    "TorchMemory",
    "cuda_initialised",
    "device_label",
    "pin_cuda_environment",
    "reset_torch_peaks",
    "torch_memory",
]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
_WARN_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """One device's memory as NVML reports it (all processes together)."""

    index: int
    name: str
    used_bytes: int
    total_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)


@dataclass(frozen=True, slots=True)
class TorchMemory:
    """The calling process's CUDA caching allocator on one device."""

    index: int
    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int


class GpuMonitor:
    """Device memory through NVML. ``nvml`` is a module with the pynvml API; None imports pynvml.

    When the module is missing or ``nvmlInit`` fails the monitor is unavailable and ``devices()`` is
    always empty. Safe to call from several threads.
    """

    def __init__(self, nvml: Any | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._last_warning: dict[str, float] = {}
        self._nvml: Any | None = None
        self._initialised = False
        self._pinned: int | None = None
        """The one device read after :meth:`pin` (NVML's index); None: every device."""
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                logger.info("GPU monitoring unavailable: nvidia-ml-py (pynvml) is not installed")
                return
            nvml = pynvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError, or an OSError from a broken driver install
            logger.info(
                "GPU monitoring unavailable: NVML did not initialise (%s: %s)", type(exc).__name__, exc
            )
            return
        self._nvml = nvml
        self._initialised = True

    @property
    def available(self) -> bool:
        return self._initialised

    @property
    def pinned(self) -> int | None:
        """The device :meth:`pin` chose, or None."""
        return self._pinned

    def pin(self, index: int) -> None:
        """From now on read only device ``index`` (NVML's index: every device of the machine, in PCI bus
        order). ConfigError when the index is negative, or when NVML answers and has no such device;
        without NVML the index cannot be checked and is taken as given."""
        if index < 0:
            raise ConfigError(f"gpu must be >= 0, got {index}")
        with self._lock:
            nvml = self._nvml
            if self._initialised and nvml is not None:
                try:
                    count = int(nvml.nvmlDeviceGetCount())
                except Exception as exc:
                    raise ConfigError(
                        f"gpu {index}: NVML did not count the devices ({type(exc).__name__}: {exc})"
                    ) from exc
                if index >= count:
                    seen = f"devices 0 to {count - 1}" if count else "no device"
                    raise ConfigError(f"gpu {index} does not exist: NVML sees {seen}")
            self._pinned = index

    def _indices(self, nvml: Any) -> range | list[int]:
        """The device indices to read: every device, or the pinned one while it exists."""
        count = int(nvml.nvmlDeviceGetCount())
        if self._pinned is None:
            return range(count)
        return [self._pinned] if self._pinned < count else []

    def devices(self) -> list[DeviceMemory]:
        """Every device's memory now (only the pinned one after :meth:`pin`); [] when unavailable or
        when NVML fails to answer."""
        with self._lock:
            nvml = self._nvml
            if not self._initialised or nvml is None:
                return []
            try:
                readings = []
                for index in self._indices(nvml):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    info = nvml.nvmlDeviceGetMemoryInfo(handle)
                    name = nvml.nvmlDeviceGetName(handle)
                    if isinstance(name, bytes):
                        name = name.decode("utf-8", errors="replace")
                    readings.append(DeviceMemory(index, str(name), int(info.used), int(info.total)))
            except Exception as exc:
                self._warn_rate_limited(f"GPU memory read failed ({type(exc).__name__}: {exc})")
                return []
            return readings

    def process_bytes(self, pid: int) -> int:
        """Device memory NVML attributes to process ``pid`` (its compute contexts), summed over every
        device (the pinned one after :meth:`pin`); 0 when unavailable or unknown. Inside a container
        without the host's PID namespace NVML reports host pids, which match no pid here: then this is 0,
        and only resident memory is compared."""
        with self._lock:
            nvml = self._nvml
            if not self._initialised or nvml is None:
                return 0
            try:
                total = 0
                for index in self._indices(nvml):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        if process.pid == pid and isinstance(process.usedGpuMemory, int):
                            total += process.usedGpuMemory
            except Exception as exc:
                self._warn_rate_limited(f"GPU process memory read failed ({type(exc).__name__}: {exc})")
                return 0
            return total

    def device(self, index: int) -> DeviceMemory | None:
        """One device's memory now, or None when it cannot be read."""
        return next((d for d in self.devices() if d.index == index), None)

    def close(self) -> None:
        """Shut NVML down if this monitor initialised it. Idempotent."""
        with self._lock:
            if not self._initialised or self._nvml is None:
                return
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                logger.debug("nvmlShutdown failed: %s", exc)

    def _warn_rate_limited(self, message: str) -> None:
        now = self._clock()
        last = self._last_warning.get(message)
        if last is not None and now - last < _WARN_INTERVAL_S:
            return
        self._last_warning[message] = now
        logger.warning("%s", message)


def device_label(index: int, devices: Sequence[DeviceMemory]) -> str:
    """How a pinned device is named to the orchestrator: ``gpu 1: NVIDIA H100 80GB HBM3``, or ``gpu 1``
    when NVML does not read it."""
    name = next((device.name for device in devices if device.index == index and device.name), None)
    return f"gpu {index}: {name}" if name else f"gpu {index}"


def pin_cuda_environment(index: int, environ: MutableMapping[str, str]) -> str | None:
    """Make CUDA show only device ``index``, as device 0 (``cuda:0`` for torch), to this process and the
    processes it starts: ``CUDA_VISIBLE_DEVICES=index``, and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA
    counts devices in NVML's order (its default puts the fastest first). Takes effect only where CUDA
    has not been initialised yet. Returns the ``CUDA_VISIBLE_DEVICES`` it replaced, when that differed."""
    previous = environ.get("CUDA_VISIBLE_DEVICES")
    environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return previous if previous is not None and previous != str(index) else None


def cuda_initialised() -> bool:
    """Whether torch, already imported, has set CUDA up in this process (too late to pin a device)."""
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    is_initialized = getattr(cuda, "is_initialized", None)
    try:
        return bool(is_initialized()) if is_initialized is not None else False
    except Exception:
        return False


def _torch_cuda() -> Any | None:
    """torch.cuda when torch is already imported and CUDA is usable; never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_available():
        return None
    return cuda


def torch_memory(pinned: int | None = None) -> list[TorchMemory]:
    """This process's torch allocator per device; [] when torch is not imported or CUDA is unusable.

    ``pinned``: the device ``--gpu`` chose. CUDA then shows only that one, as device 0, and its reading
    carries the pinned index, the device's number in NVML's readings (``byoc_gpu_memory_bytes``)."""
    try:
        cuda = _torch_cuda()
        if cuda is None:
            return []
        count = int(cuda.device_count())
        names = {i: i for i in range(count)} if pinned is None else {0: pinned} if count else {}
        return [
            TorchMemory(
                index=name,
                allocated_bytes=int(cuda.memory_allocated(i)),
                reserved_bytes=int(cuda.memory_reserved(i)),
                peak_allocated_bytes=int(cuda.max_memory_allocated(i)),
            )
            for i, name in names.items()
        ]
    except Exception as exc:
        logger.debug("torch memory reading failed: %s", exc, exc_info=True)
        return []


def reset_torch_peaks() -> None:
    """Restart torch's peak-allocation counters on every device. No-op without torch or CUDA."""
    try:
        cuda = _torch_cuda()
        if cuda is None:
            return
        is_initialized = getattr(cuda, "is_initialized", None)
        if is_initialized is not None and not is_initialized():
            return  # no CUDA context in this process: nothing to reset, and do not create one
        for i in range(int(cuda.device_count())):
            cuda.reset_peak_memory_stats(i)
    except Exception as exc:
        logger.debug("torch peak reset failed: %s", exc, exc_info=True)


def _mib(value: int) -> int:
    return value // MIB


class MemoryBudget:
    """Admission by GPU memory: is there room for one more session?

    ``per_session_bytes`` is the configured cost of one session; None learns it from ``observe``:
    the largest (used - baseline) / sessions ever seen, since peaks matter more than averages.
    """

    def __init__(
        self, monitor: GpuMonitor, *, per_session_bytes: int | None, headroom_bytes: int, device: int = 0
    ) -> None:
        if per_session_bytes is not None and per_session_bytes < 0:
            raise ValueError(f"per_session_bytes must be >= 0, got {per_session_bytes}")
        if headroom_bytes < 0:
            raise ValueError(f"headroom_bytes must be >= 0, got {headroom_bytes}")
        self._monitor = monitor
        self._configured = per_session_bytes
        self._headroom = headroom_bytes
        self._device = device
        self._lock = threading.Lock()
        self._baseline: int | None = None
        self._learned: int | None = None
        self._wall: int | None = None
        """The cost a session proved to have by running out of memory (out_of_memory)."""

    @property
    def baseline_bytes(self) -> int | None:
        return self._baseline

    @property
    def per_session_bytes(self) -> int | None:
        """The configured cost, else the learned one, else None; never below what an out-of-memory error
        proved."""
        cost = self._configured if self._configured is not None else self._learned
        if self._wall is not None and (cost is None or self._wall > cost):
            return self._wall
        return cost

    def out_of_memory(self, active_sessions: int) -> int | None:
        """A session ran out of device memory with ``active_sessions`` running: the device was full, so a
        session costs at least (total - baseline) / sessions. Admission uses that from now on so that it
        does not admit into the same wall again; the new cost, or None when nothing changed."""
        baseline = self._baseline
        reading = self._monitor.device(self._device)
        if baseline is None or reading is None or active_sessions <= 0:
            return None
        wall = max(0, reading.total_bytes - baseline) // active_sessions
        with self._lock:
            before = self.per_session_bytes
            if self._wall is None or wall > self._wall:
                self._wall = wall
            after = self.per_session_bytes
        return after if after != before else None

    def set_baseline(self) -> None:
        """Remember the device's used memory as the base: call with the processor loaded and no session."""
        reading = self._monitor.device(self._device)
        if reading is not None:
            with self._lock:
                self._baseline = reading.used_bytes

    def observe(self, active_sessions: int) -> None:
        """Fold one reading with ``active_sessions`` running into the learned per-session cost."""
        baseline = self._baseline
        if active_sessions <= 0 or baseline is None:
            return
        reading = self._monitor.device(self._device)
        if reading is None:
            return
        estimate = max(0, reading.used_bytes - baseline) // active_sessions
        with self._lock:
            if self._learned is None or estimate > self._learned:
                self._learned = estimate

    def refusal(self) -> str | None:
        """None when one more session fits; else why not, in MiB. Never refuses without a reading."""
        if not self._monitor.available:
            return None
        reading = self._monitor.device(self._device)
        if reading is None:
            return None
        per_session = self.per_session_bytes
        needed = (per_session or 0) + self._headroom
        if reading.free_bytes >= needed:
            return None
        free = _mib(reading.free_bytes)
        if per_session is None:
            return (
                f"GPU {self._device} has {free} MiB free; {_mib(self._headroom)} MiB headroom is required "
                "(per-session cost not yet measured)"
            )
        return (
            f"GPU {self._device} has {free} MiB free; a session needs {_mib(per_session)} MiB "
            f"plus {_mib(self._headroom)} MiB headroom"
        )
