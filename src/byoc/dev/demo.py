"""``byoc demo``: a local orchestrator, a container and three live streams, watched for 20 seconds.

It starts ``byoc orchestrator`` and ``byoc serve invert`` as subprocesses (the container registers
with the orchestrator: its capability over BYOC, or with ``--protocol live-runner`` as a live
runner), starts streams through ``POST /live-video-to-video`` as the checklist's curl loop does,
shows a live table (per stream: fps, latency, dropped frames; the container: sessions, memory,
/health latency) and the address of the orchestrator's live page (thumbnails, charts, events: open
it in a browser while the demo runs), writes one processed stream to ``demo-output.ts`` and a
snapshot of a processed frame to ``demo-snapshot.png``, then sends SIGTERM to the container and
reports its drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import av

from byoc.dev.children import ByocProcess, free_port
from byoc.serve.protocols import PROTOCOLS
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = ["DemoResult", "run_demo", "snapshot_png"]

_SECRET = "byoc-demo-secret"
_MODEL = "demo"


@dataclass
class DemoResult:
    streams: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None
    snapshot: Path | None = None
    output_bytes: int = 0
    drain_s: float = 0.0
    exit_code: int | None = None
    health_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        frames = [s.get("frames_out", 0) for s in self.streams]
        return self.exit_code == 0 and bool(frames) and all(f > 0 for f in frames) and self.output_bytes > 0


def snapshot_png(ts: bytes) -> bytes | None:
    """A PNG of the last complete frame of an MPEG-TS byte string (None if it has no frame)."""
    last = None
    with contextlib.suppress(av.error.FFmpegError), av.open(io.BytesIO(ts), mode="r") as container:
        for frame in container.decode(video=0):
            last = frame
    if last is None:
        return None
    encoder = av.CodecContext.create("png", "w")
    assert isinstance(encoder, av.VideoCodecContext)
    encoder.width, encoder.height, encoder.pix_fmt = last.width, last.height, "rgb24"
    encoder.time_base = last.time_base or encoder.time_base
    packets = encoder.encode(last.reformat(format="rgb24"))
    packets += encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets) or None


async def _json(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


class _Table:
    """The live view: redrawn in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._drawn = 0
        self._last_print = 0.0

    def show(self, lines: list[str], *, final: bool = False) -> None:
        if self._tty:
            if self._drawn:
                self._out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._out.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        elif final or time.monotonic() - self._last_print >= 5:
            self._out.write("\n".join(lines) + "\n\n")
            self._last_print = time.monotonic()
        self._out.flush()


def _table(
    elapsed: float,
    streams: list[dict[str, Any]],
    health: dict[str, Any],
    health_ms: float,
    memory_mb: float | None,
) -> list[str]:
    lines = [
        f"byoc demo — {elapsed:5.1f} s   container: {health.get('state', '?')}, "
        f"{health.get('sessions', 0)}/{health.get('capacity', 0)} sessions, "
        f"memory {memory_mb or 0:.0f} MB, /health {health_ms:.1f} ms",
        f"{'stream':<22} {'state':<8} {'frames out':>10} {'fps':>6} {'latency p50':>12} {'dropped':>8}",
    ]
    for s in sorted(streams, key=lambda s: s["stream_id"]):
        latency = s.get("latency_ms_p50")
        lines.append(
            f"{s['stream_id']:<22} {s['state']:<8} {s['frames_out']:>10} {s['fps']:>6.1f} "
            f"{'-' if latency is None else f'{latency:.1f} ms':>12} {s.get('dropped_frames') or 0:>8}"
        )
    return lines


async def _resident_mb(http: aiohttp.ClientSession, container_url: str) -> float | None:
    async with http.get(f"{container_url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("process_resident_memory_bytes "):
                return float(line.split()[1]) / 1e6
    return None


async def _record(http: aiohttp.ClientSession, url: str, path: Path) -> int:
    """Write a stream's output segments to ``path`` as they arrive; returns the bytes written."""
    written = 0
    with path.open("wb") as file, contextlib.suppress(Exception):
        async with TrickleSubscriber(url, session=http, start_seq=0) as subscriber:
            async for segment in subscriber:
                data = await segment.read()
                file.write(data)
                file.flush()
                written += len(data)
    return written


def _write_snapshot(output: Path, snapshot: Path) -> bool:
    png = snapshot_png(output.read_bytes())
    if png:
        snapshot.write_bytes(png)
    return png is not None


async def run_demo(
    *,
    duration_s: float = 20.0,
    streams: int = 3,
    processor: str = "invert",
    output: Path = Path("demo-output.ts"),
    snapshot: Path = Path("demo-snapshot.png"),
    protocol: str = "byoc",
    out: TextIO = sys.stdout,
) -> DemoResult:
    result = DemoResult()
    container_port = free_port()
    orchestrator = ByocProcess("orchestrator", "--port", "0", "--orch-secret", _SECRET)
    container = ByocProcess(
        "serve", processor, "--host", "127.0.0.1", "--port", str(container_port),
        "--max-sessions", str(streams), "--capability-name", _MODEL,
        "--capability-url", f"http://127.0.0.1:{container_port}", "--protocol", protocol,
        env={"BYOC_ORCH_SECRET": _SECRET},  # not a flag: a flag is readable in /proc/PID/cmdline
    )  # fmt: skip
    table = _Table(out)
    async with (
        create_client_session(TrickleClientSettings()) as http,
        orchestrator,
        contextlib.AsyncExitStack() as stack,
    ):
        container.args += ["--orchestrator-url", orchestrator.url]
        print(f"local orchestrator on {orchestrator.url}; starting the container ({processor})", file=out)
        print(f"watch it live in a browser: {orchestrator.url}/", file=out)
        await container.start()
        stack.push_async_callback(container.kill)
        await container.wait_healthy(http)
        await container.wait_for_log("registered")
        began = time.monotonic()
        ids, outputs = [], []
        for _ in range(streams):
            body = (
                f'{{"model_id": "{_MODEL}", "duration_s": {duration_s + 30}}}'.encode()
            )  # as curl -d sends it
            status, answer = await _json(http, "POST", f"{orchestrator.url}/live-video-to-video", data=body)
            if status != 200:
                raise RuntimeError(f"could not start a stream: {status} {answer}")
            ids.append(answer["stream_id"])
            outputs.append(answer["subscribe_url"])  # the gateway's view: it subscribes to the output
            print(f"started {answer['stream_id']}", file=out)
        recorder = asyncio.create_task(_record(http, outputs[0], output))
        stop_at = began + duration_s
        interrupted = asyncio.Event()
        health: dict[str, Any] = {}
        health_ms, memory = 0.0, None
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
        while time.monotonic() < stop_at and not interrupted.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await interrupted.wait()
            t = time.perf_counter()
            _, health = await _json(http, "GET", f"{container.url}/health")
            health_ms = (time.perf_counter() - t) * 1000
            result.health_ms.append(health_ms)
            _, state = await _json(http, "GET", f"{orchestrator.url}/status")
            memory = await _resident_mb(http, container.url)
            result.streams = state["streams"]
            table.show(_table(time.monotonic() - began, state["streams"], health, health_ms, memory))
        table.show(_table(time.monotonic() - began, result.streams, health, health_ms, memory), final=True)
        print(f"sending SIGTERM to the container ({len(ids)} sessions running)", file=out)
        t = time.monotonic()
        container.signal(signal.SIGTERM)
        result.exit_code = await container.wait_exit(timeout=15)
        result.drain_s = time.monotonic() - t
        result.output_bytes = await asyncio.wait_for(recorder, 10)
        result.output = output
        if await asyncio.to_thread(_write_snapshot, output, snapshot):
            result.snapshot = snapshot
        orchestrator.signal(signal.SIGTERM)
        await orchestrator.wait_exit(timeout=15)
    _summary(result, out)
    return result


def _summary(result: DemoResult, out: TextIO) -> None:
    frames = sum(s.get("frames_out", 0) for s in result.streams)
    health = sorted(result.health_ms)
    print("", file=out)
    print("summary", file=out)
    print(f"  streams: {len(result.streams)}, frames out: {frames}", file=out)
    for s in sorted(result.streams, key=lambda s: s["stream_id"]):
        latency = s.get("latency_ms_p50")
        print(
            f"    {s['stream_id']}: {s['frames_out']} frames, {s['fps']:.1f} fps, latency p50 "
            f"{'-' if latency is None else f'{latency:.1f} ms'}, dropped {s.get('dropped_frames') or 0}",
            file=out,
        )
    if health:
        print(f"  /health: median {health[len(health) // 2]:.1f} ms, max {health[-1]:.1f} ms", file=out)
    print(f"  container drained in {result.drain_s:.2f} s, exit code {result.exit_code}", file=out)
    print(
        f"  processed stream: {result.output} ({result.output_bytes} bytes; play it with ffplay or VLC)",
        file=out,
    )
    if result.snapshot:
        print(f"  snapshot: {result.snapshot}", file=out)
    print("  demo " + ("OK" if result.ok else "FAILED"), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="byoc demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds to run (default 20; Ctrl-C ends earlier)"
    )
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--processor", default="invert")
    parser.add_argument("--output", type=Path, default=Path("demo-output.ts"))
    parser.add_argument("--snapshot", type=Path, default=Path("demo-snapshot.png"))
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="byoc",
        help="how the container joins the orchestrator: byoc (capability registration) or live-runner",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_demo(
            duration_s=args.duration,
            streams=args.streams,
            processor=args.processor,
            output=args.output,
            snapshot=args.snapshot,
            protocol=args.protocol,
        )
    )
    return 0 if result.ok else 1
