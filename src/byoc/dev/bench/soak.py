"""``byoc bench soak``: does a ``byoc serve`` process stay the same over a long run?

It starts ``byoc serve`` (default processor ``invert``) as a subprocess and a trickle server in this
process, starts ``--sessions`` sessions (default 4) and feeds each the same real-time input as
``byoc bench serve`` does (``--input``, ``--delivery``) for ``--minutes`` (default 10), with a
keep-alive on each control channel every 10 s as a gateway sends (a trickle server closes a channel
nobody writes to for 5 minutes, and a session ends with its control channel). Every
``--interval`` seconds (default 5) it samples the container's resident memory, threads and open file
descriptors (from /proc) and the ``/health`` p99 over the interval (polled at 20 Hz from a separate
process, :mod:`byoc.dev.bench.probe`). At the end it fits a line through each figure's samples after the
warm-up (the first minute: allocator arenas, codec contexts and caches fill once) and holds each slope
to a bound (:data:`BOUNDS`), and checks that every session kept running without an error and that
every frame is accounted for: frames in minus frames out and dropped (the frames still in a session's
queues when the figures are read) at most two seconds' worth a session. How many frames were dropped is
reported, not judged: whether the sessions keep up is the machine's throughput (``byoc bench serve``,
``byoc check``), a soak is about what grows. The exit status is 0 when every
bound and check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from byoc.dev.bench.inputs import DEFAULT_DELIVERY, DEFAULT_INPUT, add_arguments, bench_input
from byoc.dev.bench.serve import start_streams
from byoc.dev.check.analysis import fit_line
from byoc.dev.children import ByocProcess
from byoc.dev.corpus import FfmpegNotFound
from byoc.dev.orchestrator.streams import KEEPALIVE_INTERVAL_S
from byoc.dev.synthetic import publish_live
from byoc.dev.trickle_server import serve_trickle
from byoc.serve.system import resident_bytes
from byoc.session.stats import percentile
from byoc.trickle.channels import KEEPALIVE
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.publisher import TricklePublisher

__all__ = ["BOUNDS", "Figure", "SoakReport", "run_soak"]

_MB = 1024 * 1024
_FPS = 30
WARM_UP_S = 60.0
"""Samples before this are not fitted: a process fills its arenas and caches once."""
BOUNDS = {
    "rss_mb": 1.0,
    "threads": 0.1,
    "fds": 0.1,
    "health_p99_ms": 1.0,
}
"""The largest slope per minute each figure may show after the warm-up. Memory: 1 MB a minute is 1.4 GB
a day, far less than any leak that matters and more than the noise of a steady process (glibc returns
freed memory unevenly); 4 sessions leaking one 256-byte object per frame would show 1.8 MB a minute.
Threads and file descriptors: a steady process has a constant count; 0.1 a minute allows a single
transient one near the end of the window. ``/health`` p99: 1 ms a minute, a response that doubles in an
hour."""


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss_mb: float
    threads: int
    fds: int
    health_p99_ms: float
    health_failures: int


@dataclass(frozen=True)
class Figure:
    name: str
    first: float
    last: float
    low: float
    high: float
    slope_per_min: float
    bound_per_min: float

    @property
    def holds(self) -> bool:
        return self.slope_per_min <= self.bound_per_min


@dataclass
class SoakReport:
    processor: str
    input: str
    sessions: int
    minutes: float
    samples: list[Sample] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sessions_running: int = 0
    health_failures: int = 0
    endings: list[str] = field(default_factory=list)
    """The container's log lines of sessions that ended while measured (with their reasons)."""

    @property
    def frames_in_flight(self) -> int:
        """Frames read but neither put out nor dropped yet when the figures were read."""
        return self.frames_in - self.frames_out - self.frames_dropped

    @property
    def passed(self) -> bool:
        return (
            all(figure.holds for figure in self.figures)
            and self.sessions_running == self.sessions
            and 0 <= self.frames_in_flight <= 2 * _FPS * self.sessions
            and not self.errors
            and self.health_failures == 0
        )

    def lines(self) -> list[str]:
        lines = [
            f"byoc serve {self.processor}: {self.sessions} sessions of {self.input} for {self.minutes:g} "
            f"min, {len(self.samples)} samples; slopes fitted after the first {WARM_UP_S:.0f} s",
            f"{'figure':<14} {'first':>9} {'last':>9} {'min':>9} {'max':>9} {'slope/min':>10} "
            f"{'bound':>7}  holds",
        ]
        for f in self.figures:
            lines.append(
                f"{f.name:<14} {f.first:>9.1f} {f.last:>9.1f} {f.low:>9.1f} {f.high:>9.1f} "
                f"{f.slope_per_min:>10.3f} {f.bound_per_min:>7.2f}  {'yes' if f.holds else 'NO'}"
            )
        lines.append(
            f"sessions running at the end: {self.sessions_running} of {self.sessions}; video frames in "
            f"{self.frames_in}, out {self.frames_out}, dropped {self.frames_dropped}, in flight "
            f"{self.frames_in_flight}; errors {self.errors or 'none'}; "
            f"/health failures {self.health_failures}"
        )
        lines += [f"ended early: {line}" for line in self.endings]
        lines.append("soak: " + ("passed" if self.passed else "FAILED"))
        return lines


def _count(path: str) -> int:
    try:
        return len(os.listdir(path))
    except OSError:
        return 0


async def _health_p99(port: int, seconds: float) -> tuple[float, int]:
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "byoc.dev.bench.probe",
        str(port),
        str(seconds),
        "20",
        stdout=asyncio.subprocess.PIPE,
    )
    polled = json.loads((await probe.communicate())[0])
    latencies = sorted(polled["latencies_ms"])
    return percentile(latencies, 0.99) or 0.0, sum(1 for status in polled["statuses"] if status != 200)


async def _keep_alive(publisher: TricklePublisher) -> None:
    message = json.dumps(dict(KEEPALIVE)).encode()
    while True:
        await publisher.write_segment(message)
        await asyncio.sleep(KEEPALIVE_INTERVAL_S)


def _figures(samples: list[Sample]) -> list[Figure]:
    fitted = [s for s in samples if s.at_s >= WARM_UP_S] or samples
    figures = []
    for name, bound in BOUNDS.items():
        values = [float(getattr(s, name)) for s in samples]
        _, slope, _ = fit_line([(s.at_s / 60.0, float(getattr(s, name))) for s in fitted])
        figures.append(Figure(name, values[0], values[-1], min(values), max(values), slope, bound))
    return figures


async def run_soak(
    *,
    minutes: float = 10.0,
    sessions: int = 4,
    processor: str = "invert",
    interval_s: float = 5.0,
    input_name: str = DEFAULT_INPUT,
    delivery: str = DEFAULT_DELIVERY,
    progress: bool = True,
) -> SoakReport:
    seconds = minutes * 60.0
    source = await asyncio.to_thread(bench_input, input_name, 1.0)
    report = SoakReport(processor, source.description, sessions, minutes)
    async with serve_trickle() as trickle, create_client_session(TrickleClientSettings()) as http:
        container = ByocProcess(
            "serve", processor, "--host", "127.0.0.1", "--port", "0", "--max-sessions", str(sessions)
        )
        try:
            await container.start()
            await container.wait_healthy(http)
            streams = await start_streams(http, container, trickle, [f"soak-{i}" for i in range(sessions)])
            publishers = [TricklePublisher(c.url(trickle.base_url, "input"), session=http) for c in streams]
            controls = [
                TricklePublisher(
                    c.url(trickle.base_url, "control"), session=http, mime_type=c.mime_type("control")
                )
                for c in streams
            ]
            # every publisher gets the same segments: one stream made once, shared
            shared = list(source.stream(seconds))
            feeding = asyncio.gather(
                *(
                    publish_live(
                        p,
                        shared,
                        fps=source.fps,
                        delivery=source.delivery(delivery),
                        segment_s=source.segment_s,
                    )
                    for p in publishers
                ),
                *(_keep_alive(control) for control in controls),
            )
            began = time.monotonic()
            while time.monotonic() - began < seconds - interval_s:
                p99, failures = await _health_p99(container.port, interval_s)
                pid = container.pid
                sample = Sample(
                    round(time.monotonic() - began, 1),
                    resident_bytes(pid) / _MB,
                    _count(f"/proc/{pid}/task"),
                    _count(f"/proc/{pid}/fd"),
                    p99,
                    failures,
                )
                report.samples.append(sample)
                if progress:
                    print(
                        f"{sample.at_s:7.1f}s rss {sample.rss_mb:6.1f} MB threads {sample.threads:3d} "
                        f"fds {sample.fds:3d} /health p99 {sample.health_p99_ms:6.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
            async with http.get(f"{container.url}/stream/status") as response:
                status: list[dict[str, Any]] = (await response.json())["sessions"]
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
            for publisher in (*publishers, *controls):
                await publisher.close()
            report.endings = [line for line in container.lines if ": ended (" in line]
        finally:
            await container.kill()
    report.figures = _figures(report.samples)
    report.health_failures = sum(s.health_failures for s in report.samples)
    report.sessions_running = sum(1 for s in status if s["state"] == "running")
    for s in status:
        report.frames_in += s["input"]["frames"]
        report.frames_out += s["output"]["frames"]
        report.frames_dropped += sum(s["dropped"].values())
        for kind, count in s["errors"].items():
            report.errors[kind] = report.errors.get(kind, 0) + count
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="byoc bench soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to feed the sessions")
    parser.add_argument("--sessions", type=int, default=4, help="sessions fed at once")
    parser.add_argument("--processor", default="invert")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    add_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the report, every sample included, as JSON"
    )
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(
            run_soak(
                minutes=args.minutes,
                sessions=args.sessions,
                processor=args.processor,
                interval_s=args.interval,
                input_name=args.input,
                delivery=args.delivery,
            )
        )
    except FfmpegNotFound as exc:
        print(f"byoc bench soak: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "passed": report.passed}))
    else:
        print("\n".join(report.lines()))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
