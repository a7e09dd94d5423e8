"""``byoc bench serve``: how many real-time sessions one ``byoc serve`` process sustains.

It starts ``byoc serve`` as a subprocess and a trickle server in this process, then for each step N
(1, 2, 4, …) starts N sessions through ``/stream/start``, feeds each the same input at real-time pace
(``--input``: by default ffmpeg-made 512x512 30 fps H.264 with AAC, as gateways send; ``--delivery``
spread or burst; see :mod:`byoc.dev.bench.inputs`), and measures in the container:

* the frames every session put out per second over the measured window (from ``/stream/status``)
  and the frames it dropped;
* the video frames and the audio (Opus packets, seconds) all sessions put out while measured;
* CPU milliseconds per output frame and resident memory of the container, its worker processes
  included (``--isolation process``; from /proc);
* the frames' latency inside the container (decoded to encoded), the median of the sessions' p50 and
  the largest p99;
* ``/health`` latency, polled at 20 Hz from a separate process (``byoc.dev.bench.probe``);
* beside the container's cores, the cores the benchmark itself used (trickle server, publishers,
  readers, probe) and the machine's idle cores, so that a step's CPU can be accounted for;
* the codec floor: the cores N streams would take doing nothing but decode and encode at live pace,
  from the CPU a frame of ``byoc bench pipeline``'s raw PyAV loop on the same input with the
  container's encoder settings (its BYOC_* variables included), measured alone (one stream, in a
  process of its own) before the steps.

A step is real-time when every session delivers at least 95 % of the input frame rate and drops at
most 1 % of its video frames. It also reports the container's cold start (spawn to ``/health`` 200).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from byoc.dev.bench.inputs import (
    DEFAULT_DELIVERY,
    DEFAULT_INPUT,
    DELIVERY_CHOICES,
    BenchInput,
    add_arguments,
    bench_input,
)
from byoc.dev.bench.pipeline import raw_live_cpu_ms_per_frame
from byoc.dev.children import ByocProcess
from byoc.dev.corpus import FfmpegNotFound
from byoc.dev.procs import machine_cpu, tree_cpu, tree_rss
from byoc.dev.synthetic import publish_live
from byoc.dev.trickle_server import RunningTrickle, serve_trickle
from byoc.media.encoder import EncoderSettings
from byoc.serve.config import settings_from
from byoc.session.stats import percentile
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.layout import StreamChannels
from byoc.trickle.publisher import TricklePublisher

__all__ = ["ServeReport", "StepReport", "container_encoder_settings", "run_serve_bench", "start_streams"]

_MB = 1024 * 1024
_FLOOR_S = 5.0
"""Seconds of input the codec floor is measured on."""


@dataclass(frozen=True)
class StepReport:
    sessions: int
    fps_min: float
    fps_mean: float
    dropped_fraction: float
    measured_s: float
    """The window the CPU, frame and audio figures cover."""
    frames_out: int
    """Video frames out of all sessions in the window."""
    audio_packets_out: int
    """Audio packets out of all sessions in the window."""
    audio_seconds_out: float
    """Seconds of audio out of all sessions in the window."""
    audio_dropped: int
    """Audio frames all sessions dropped, from their start."""
    cpu_ms_per_frame: float
    cpu_cores: float
    """The container's cores (its worker processes included) over the window."""
    rss_mb: float
    latency_p50_ms: float
    latency_p99_ms: float
    health_p50_ms: float
    health_p99_ms: float
    health_failures: int
    real_time: bool
    harness_cores: float = 0.0
    """The benchmark's own cores over the window: its trickle server, publishers and readers, and the
    /health probe. They share the machine with the container."""
    idle_cores: float = 0.0
    """The machine's idle cores over the window (/proc/stat): what neither took."""
    floor_cores: float = 0.0
    """The cores the sessions' codec work alone takes at live pace (:attr:`ServeReport.floor_ms`)."""


@dataclass(frozen=True)
class ServeReport:
    processor: str
    input: str
    delivery: str
    seconds: float
    cold_start_s: float
    base_rss_mb: float
    isolation: str = "thread"
    floor_ms: float = 0.0
    """CPU ms a video frame of the raw PyAV loop (decode, fit, encode; audio to Opus) on the input at
    live pace, one stream alone, before the steps: the machine's codec floor at the time."""
    steps: list[StepReport] = field(default_factory=list)

    @property
    def max_real_time(self) -> int:
        return max((step.sessions for step in self.steps if step.real_time), default=0)

    def lines(self) -> list[str]:
        lines = [
            f"byoc serve {self.processor} (isolation {self.isolation}): cold start to ready "
            f"{self.cold_start_s:.2f} s, "
            f"idle RSS {self.base_rss_mb:.0f} MB; each step {self.seconds:.0f} s a session of {self.input}, "
            f"{self.delivery} delivery; frames and audio out: all sessions over the measured window; "
            f"codec floor (raw PyAV at live pace, one stream alone): {self.floor_ms:.2f} ms a frame",
            f"{'N':>3} {'fps min':>8} {'fps mean':>9} {'dropped':>8} {'window':>7} {'frames':>7} "
            f"{'audio pk':>9} {'audio s':>8} {'CPU ms/fr':>10} {'cores':>6} {'RSS MB':>7} "
            f"{'latency p50':>12} {'p99':>7} {'health p50':>11} {'p99':>7} {'bench cores':>12} "
            f"{'idle':>5} {'floor cores':>12}  real-time",
        ]
        for s in self.steps:
            lines.append(
                f"{s.sessions:>3} {s.fps_min:>8.1f} {s.fps_mean:>9.1f} {s.dropped_fraction:>7.1%} "
                f"{s.measured_s:>6.1f}s {s.frames_out:>7} {s.audio_packets_out:>9} "
                f"{s.audio_seconds_out:>8.2f} "
                f"{s.cpu_ms_per_frame:>10.2f} {s.cpu_cores:>6.2f} {s.rss_mb:>7.0f} "
                f"{s.latency_p50_ms:>10.1f}ms {s.latency_p99_ms:>5.1f}ms {s.health_p50_ms:>9.1f}ms "
                f"{s.health_p99_ms:>5.1f}ms {s.harness_cores:>12.2f} {s.idle_cores:>5.2f} "
                f"{s.floor_cores:>12.2f}  {'yes' if s.real_time else 'NO'}"
            )
        lines.append(f"largest real-time step: {self.max_real_time} sessions in one process")
        return lines


async def _step(
    n: int,
    container: ByocProcess,
    trickle: RunningTrickle,
    http: aiohttp.ClientSession,
    source: BenchInput,
    delivery: str,
    seconds: float,
    floor_ms: float,
) -> StepReport:
    streams = await start_streams(http, container, trickle, [f"bench{n}-{i}" for i in range(n)])
    publishers = [
        TricklePublisher(channels.url(trickle.base_url, "input"), session=http) for channels in streams
    ]
    warmup = 2.0  # measure after the sessions have settled
    feeding = asyncio.gather(
        *(
            publish_live(
                p,
                source.segments,
                fps=source.fps,
                delivery=source.delivery(delivery),
                segment_s=source.segment_s,
            )
            for p in publishers
        )
    )
    await asyncio.sleep(warmup)
    cpu_before, began = tree_cpu(container.pid), time.monotonic()
    harness_before, machine_before = _own_cpu(), machine_cpu()
    earlier = await _sessions(http, container)
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "byoc.dev.bench.probe",
        str(container.port),
        str(seconds - warmup - 1),
        "20",
        stdout=asyncio.subprocess.PIPE,
    )
    rss = 0.0
    while probe.returncode is None:
        rss = max(rss, tree_rss(container.pid) / _MB)
        try:
            async with asyncio.timeout(0.5):
                await probe.wait()
        except TimeoutError:
            pass
    polled = json.loads((await probe.communicate())[0])
    sessions = await _sessions(http, container)
    cpu, elapsed = tree_cpu(container.pid) - cpu_before, time.monotonic() - began
    harness = _own_cpu() - harness_before
    idle = machine_cpu()[1] - machine_before[1]
    frames, audio_packets, audio_seconds = (
        b - a for a, b in zip(_totals(earlier), _totals(sessions), strict=True)
    )
    await feeding
    for publisher in publishers:
        await publisher.close()
    while (await _active(http, container)) > 0:  # noqa: ASYNC110 - another process: polled over HTTP
        await asyncio.sleep(0.1)
    frames_before = {s["stream_id"]: s["output"]["frames"] for s in earlier}
    fps = [(s["output"]["frames"] - frames_before.get(s["stream_id"], 0)) / elapsed for s in sessions]
    dropped = sum(sum(s["dropped"].values()) for s in sessions)
    decoded = max(1, sum(s["input"]["frames"] for s in sessions))
    latencies = sorted(polled["latencies_ms"])
    p50s = sorted(v for s in sessions if (v := s["frame_latency_ms"].get("p50")) is not None)
    p99s = [v for s in sessions if (v := s["frame_latency_ms"].get("p99")) is not None]
    return StepReport(
        sessions=n,
        fps_min=min(fps),
        fps_mean=sum(fps) / len(fps),
        dropped_fraction=dropped / decoded,
        measured_s=round(elapsed, 2),
        frames_out=int(frames),
        audio_packets_out=int(audio_packets),
        audio_seconds_out=round(audio_seconds, 3),
        audio_dropped=sum(s.get("audio", {}).get("frames_dropped", 0) for s in sessions),
        cpu_ms_per_frame=cpu * 1000 / max(frames, 1),
        cpu_cores=cpu / elapsed,
        rss_mb=rss,
        latency_p50_ms=percentile(p50s, 0.5) or 0.0,
        latency_p99_ms=max(p99s, default=0.0),
        health_p50_ms=percentile(latencies, 0.5) or 0.0,
        health_p99_ms=percentile(latencies, 0.99) or 0.0,
        health_failures=sum(1 for status in polled["statuses"] if status != 200),
        real_time=min(fps) >= 0.95 * source.fps and dropped / decoded <= 0.01,
        harness_cores=harness / elapsed,
        idle_cores=idle / elapsed,
        floor_cores=n * source.fps * floor_ms / 1000,
    )


def _first(source: BenchInput, seconds: float) -> bytes:
    """The input's first whole segments that last at least ``seconds`` (all of it if shorter)."""
    count = max(1, math.ceil(seconds / source.segment_s))
    return b"".join(b"".join(chunks) for chunks in source.segments[:count])


def _own_cpu() -> float:
    """CPU seconds of this process and of the children it has waited for (the /health probe)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


async def start_streams(
    http: aiohttp.ClientSession, container: ByocProcess, trickle: RunningTrickle, names: list[str]
) -> list[StreamChannels]:
    """The channels of one stream per name on ``trickle``, each stream started on ``container``
    (RuntimeError when a start is refused)."""
    streams = [StreamChannels(name) for name in names]
    for channels in streams:
        for role, name in channels.names().items():
            trickle.server.create_channel(name, channels.mime_type(role))
    for channels in streams:
        async with http.post(
            f"{container.url}/stream/start",
            json=channels.start_body(trickle.base_url),
            headers={"X-Stream-Id": channels.stream},
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"start {channels.stream}: {response.status} {await response.text()}")
    return streams


async def _sessions(http: aiohttp.ClientSession, container: ByocProcess) -> list[dict[str, Any]]:
    async with http.get(f"{container.url}/stream/status") as response:
        sessions: list[dict[str, Any]] = (await response.json())["sessions"]
    return sessions


def _totals(sessions: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Video frames, audio packets and audio seconds out, summed over ``sessions``."""
    audio = [s.get("audio", {}) for s in sessions]
    return (
        sum(s["output"]["frames"] for s in sessions),
        sum(a.get("packets_out", 0) for a in audio),
        sum(a.get("seconds_out", 0.0) for a in audio),
    )


async def _active(http: aiohttp.ClientSession, container: ByocProcess) -> int:
    async with http.get(f"{container.url}/health") as response:
        return int((await response.json()).get("sessions", 0))


def container_encoder_settings(serve_args: Sequence[str], environ: Mapping[str, str]) -> EncoderSettings:
    """The encoder settings ``byoc serve SERVE_ARGS`` uses in ``environ`` (its BYOC_* variables
    included): the codec floor is measured with the container's own."""
    return settings_from(list(serve_args), environ).encoder()


async def run_serve_bench(
    steps: list[int],
    *,
    seconds: float = 10.0,
    processor: str = "passthrough",
    stop_when_late: bool = True,
    input_name: str = DEFAULT_INPUT,
    delivery: str = DEFAULT_DELIVERY,
    isolation: str = "thread",
) -> ServeReport:
    if delivery not in DELIVERY_CHOICES:
        raise ValueError(f"delivery must be one of {', '.join(DELIVERY_CHOICES)}, got {delivery!r}")
    source = await asyncio.to_thread(bench_input, input_name, seconds)
    async with serve_trickle() as trickle, create_client_session(TrickleClientSettings()) as http:
        serve_args = (
            processor, "--host", "127.0.0.1", "--port", "0", "--max-sessions", str(max(steps)),
            "--isolation", isolation,
        )  # fmt: skip
        container = ByocProcess("serve", *serve_args)
        try:
            began = time.monotonic()
            await container.start()
            await container.wait_healthy(http)
            cold_start = time.monotonic() - began
            floor_ms, _ = await raw_live_cpu_ms_per_frame(
                _first(source, _FLOOR_S), source.fps, container_encoder_settings(serve_args, container.env)
            )
            report = ServeReport(
                processor,
                source.description,
                delivery,
                seconds,
                cold_start,
                tree_rss(container.pid) / _MB,
                isolation,
                floor_ms,
            )
            for n in steps:
                step = await _step(n, container, trickle, http, source, delivery, seconds, floor_ms)
                report.steps.append(step)
                print(report.lines()[2 + len(report.steps) - 1], file=sys.stderr, flush=True)
                if stop_when_late and not step.real_time:
                    break
        finally:
            await container.kill()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="byoc bench serve", description=__doc__)
    parser.add_argument("--sessions", default="1,2,4,6,8,10,12,14", help="the steps, e.g. 1,2,4,8")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of input per step")
    parser.add_argument("--processor", default="passthrough")
    parser.add_argument(
        "--isolation", choices=("thread", "process"), default="thread", help="byoc serve's --isolation"
    )
    add_arguments(parser)
    parser.add_argument("--all-steps", action="store_true", help="go on after a step that is not real-time")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    steps = [int(part) for part in args.sessions.split(",") if part.strip()]
    try:
        report = asyncio.run(
            run_serve_bench(
                steps,
                seconds=args.seconds,
                processor=args.processor,
                stop_when_late=not args.all_steps,
                input_name=args.input,
                delivery=args.delivery,
                isolation=args.isolation,
            )
        )
    except FfmpegNotFound as exc:
        print(f"byoc bench serve: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "max_real_time": report.max_real_time}))
    else:
        print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
