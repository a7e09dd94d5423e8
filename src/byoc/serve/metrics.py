"""Prometheus metrics at ``/metrics``, from a registry the runtime owns.

Per-frame figures are observed as they happen (the latency histograms, the error counter); everything
that is state — sessions, capacity, GPU memory, frame totals, the health state — is read at scrape time
from one source, so nothing can drift. Stream ids are never labels (their number is unbounded).

Required by the production checklist: ``byoc_sessions_active``, ``byoc_frame_latency_ms`` (histogram),
``byoc_gpu_memory_bytes`` and ``byoc_errors_total``. Without a GPU, ``byoc_gpu_memory_bytes`` has no
samples rather than made-up ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from byoc.serve.gpu import DeviceMemory, TorchMemory

__all__ = ["CONTENT_TYPE", "ERROR_TYPES", "FrameTotals", "MetricsSource", "RuntimeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ERROR_TYPES = (
    "decode",
    "process",
    "encode",
    "audio_decode",
    "audio_encode",
    "trickle",
    "output",
    "oom",
    "hung",
    "start",
    "params",
    "registration",
    "http",
    "other",
)
"""The bounded values of byoc_errors_total's ``type`` label."""

# Around the 33 ms budget of a frame at 30 fps.
LATENCY_BUCKETS_MS = (2.5, 5, 10, 16, 25, 33, 50, 66, 100, 150, 250, 500, 1000, 2500)
STATES = ("LOADING", "IDLE", "OK", "DRAINING", "ERROR")


@dataclass(frozen=True, slots=True)
class FrameTotals:
    """Frames since the runtime started, ended sessions included."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)
    sessions_started: int = 0
    sessions_ended: Mapping[str, int] = field(default_factory=dict)


class MetricsSource(Protocol):
    """What the runtime exposes for scraping."""

    def sessions_active(self) -> int: ...

    def capacity(self) -> int: ...

    def state(self) -> str: ...

    def gpu_devices(self) -> Sequence[DeviceMemory]: ...

    def torch_devices(self) -> Sequence[TorchMemory]: ...

    def memory_limit(self) -> tuple[int, str]: ...

    def frame_totals(self) -> FrameTotals: ...


class _StateCollector(Collector):
    def __init__(self, source: MetricsSource, version: str, processor: str) -> None:
        self._source = source
        self._version = version
        self._processor = processor

    def collect(self) -> Iterable[Metric]:
        source = self._source
        yield GaugeMetricFamily(
            "byoc_sessions_active", "Sessions running now.", value=source.sessions_active()
        )
        yield GaugeMetricFamily(
            "byoc_sessions_capacity", "Sessions this container accepts.", value=source.capacity()
        )
        gpu = GaugeMetricFamily(
            "byoc_gpu_memory_bytes",
            "GPU memory per device (absent without a GPU).",
            labels=["device", "kind"],
        )
        for device in source.gpu_devices():
            gpu.add_metric([str(device.index), "used"], device.used_bytes)
            gpu.add_metric([str(device.index), "total"], device.total_bytes)
        yield gpu
        torch = GaugeMetricFamily(
            "byoc_torch_memory_bytes",
            "The torch CUDA allocator of this process, per device (absent without torch and CUDA).",
            labels=["device", "kind"],
        )
        for allocator in source.torch_devices():
            torch.add_metric([str(allocator.index), "allocated"], allocator.allocated_bytes)
            torch.add_metric([str(allocator.index), "reserved"], allocator.reserved_bytes)
            torch.add_metric([str(allocator.index), "peak"], allocator.peak_allocated_bytes)
        yield torch
        limit, where = source.memory_limit()
        memory = GaugeMetricFamily(
            "byoc_memory_limit_bytes",
            "Memory the process may use: its cgroup limit, else the host's RAM.",
            labels=["source"],
        )
        memory.add_metric([where], limit)
        yield memory
        totals = source.frame_totals()
        yield CounterMetricFamily("byoc_frames_in", "Frames decoded.", value=totals.frames_in)
        yield CounterMetricFamily("byoc_frames_out", "Frames encoded and published.", value=totals.frames_out)
        dropped = CounterMetricFamily("byoc_frames_dropped", "Frames dropped, by reason.", labels=["reason"])
        for reason, count in sorted(totals.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            "byoc_sessions_started", "Sessions admitted.", value=totals.sessions_started
        )
        ended = CounterMetricFamily("byoc_sessions_ended", "Sessions ended, by reason.", labels=["reason"])
        for reason, count in sorted(totals.sessions_ended.items()):
            ended.add_metric([reason], count)
        yield ended
        state = GaugeMetricFamily("byoc_state", "1 for the runtime's current state.", labels=["state"])
        current = source.state()
        for name in STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        info = GaugeMetricFamily("byoc_info", "Version and processor.", labels=["version", "processor"])
        info.add_metric([self._version, self._processor], 1.0)
        yield info


class RuntimeMetrics:
    """The runtime's registry; also the SessionObserver every session reports to (from any thread)."""

    def __init__(self, source: MetricsSource, *, version: str, processor: str) -> None:
        self.registry = CollectorRegistry()
        self._frame_latency = Histogram(
            "byoc_frame_latency_ms",
            "Per-frame latency inside the container, decoded to encoded (ms).",
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )
        self._process_latency = Histogram(
            "byoc_process_latency_ms",
            "Time the processor takes per frame (ms).",
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )
        self._errors = Counter("byoc_errors", "Errors, by type.", ["type"], registry=self.registry)
        for kind in ERROR_TYPES:
            self._errors.labels(kind)
        self._restarts = Counter(
            "byoc_worker_restarts",
            "Processor worker processes that died and were started again, by how they ended "
            "(signal_11, exit_1, ...).",
            ["reason"],
            registry=self.registry,
        )
        self._recycles = Counter(
            "byoc_processor_recycles",
            "Processors recycled, by why: leak (memory above the idle baseline) or sessions (served "
            "--recycle-after-sessions).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("leak", "sessions"):
            self._recycles.labels(reason)
        self.registry.register(_StateCollector(source, version, processor))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total

    def frame_done(self, latency_s: float) -> None:
        self._frame_latency.observe(latency_s * 1000.0)

    def processed(self, seconds: float) -> None:
        self._process_latency.observe(seconds * 1000.0)

    def error(self, kind: str) -> None:
        self._errors.labels(kind if kind in ERROR_TYPES else "other").inc()

    def worker_restarted(self, reason: str) -> None:
        self._restarts.labels(reason).inc()

    def processor_recycled(self, reason: str) -> None:
        self._recycles.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
