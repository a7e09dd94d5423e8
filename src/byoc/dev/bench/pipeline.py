"""``byoc bench pipeline``: what a session costs compared with the bare PyAV work it wraps.

One run does both measurements on the same input (512x512 30 fps H.264, one GOP per 1 s segment):

* a passthrough session in its own process, fed over loopback trickle at real-time pace; its CPU time
  is read inside that process from the session's start to its end, so the trickle server, publisher
  and reader of this benchmark are not counted;
* the raw loop ``decode -> encode`` of the same bytes with the same encoder settings, at the same live
  pace, in a second process running at the same time (so both see the same machine load); and once
  flat out, for reference.

It prints CPU milliseconds per frame for both and their ratio, and the added latency of every segment:
when the output segment was complete minus when the input segment was complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av

from byoc.dev.synthetic import SyntheticStream, publish_live
from byoc.dev.trickle_server import serve_trickle
from byoc.media.encoder import EncoderSettings, open_video_encoder
from byoc.media.ts import first_video_pts
from byoc.session.stats import percentile
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.layout import StreamChannels
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = ["PipelineReport", "run_pipeline_bench"]

_VIDEO_PID = 0x100
_CHILD_COMMAND = ["-m", "byoc.dev.bench.pipeline"]
_STREAM = "b"


@dataclass(frozen=True)
class PipelineReport:
    seconds: int
    frames_in: int
    frames_out: int
    session_cpu_ms_per_frame: float
    raw_cpu_ms_per_frame: float
    raw_flat_out_cpu_ms_per_frame: float
    ratio: float
    added_latency_ms_p50: float
    added_latency_ms_p95: float
    frame_latency_ms_p50: float | None
    dropped: int
    thread_cpu_ms_per_frame: dict[str, float]

    def lines(self) -> list[str]:
        by_thread = ", ".join(
            f"{name} {ms:.2f} ms" for name, ms in sorted(self.thread_cpu_ms_per_frame.items())
        )
        return [
            f"input: {self.seconds} s of 512x512 30 fps H.264 ({self.frames_in} frames), passthrough",
            f"frames out: {self.frames_out}, dropped: {self.dropped}",
            f"CPU per frame, session: {self.session_cpu_ms_per_frame:.2f} ms ({by_thread})",
            f"CPU per frame, raw PyAV decode+encode: {self.raw_cpu_ms_per_frame:.2f} ms at live pace, "
            f"{self.raw_flat_out_cpu_ms_per_frame:.2f} ms flat out",
            f"ratio session / raw at live pace: {self.ratio:.2f} (target <= 1.15)",
            f"added latency, output segment end - input segment end: p50 {self.added_latency_ms_p50:.1f} ms, "
            f"p95 {self.added_latency_ms_p95:.1f} ms (target p50 <= 20 ms)",
            f"frame latency inside the session (decoded -> encoded): p50 {self.frame_latency_ms_p50} ms",
        ]


def _raw_cpu_ms_per_frame(data: bytes, settings: EncoderSettings, *, fps: float | None) -> tuple[float, int]:
    """The bare loop: decode every frame and encode it again with the session's encoder settings.

    With ``fps`` each frame is decoded and encoded when it is due, at the pace of a live stream (work
    done in bursts with pauses costs more CPU than the same work flat out: cold caches, idle cores).
    """
    start = time.process_time()
    started = time.monotonic()
    frames = 0
    with av.open(io.BytesIO(data), mode="r") as source:
        video = source.streams.video[0]
        video.codec_context.thread_count = 1
        encoder = open_video_encoder(settings)
        sink = io.BytesIO()
        with av.open(sink, mode="w", format="mpegts") as output:
            stream = output.add_mux_stream(
                "h264", rate=settings.fps, width=settings.width, height=settings.height
            )
            for frame in source.decode(video):
                if fps:
                    time.sleep(max(0.0, started + frames / fps - time.monotonic()))
                frame.pict_type = av.video.frame.PictureType.NONE
                for packet in encoder.encode(frame):
                    packet.stream = stream
                    output.mux(packet)
                frames += 1
            for packet in encoder.encode(None):
                packet.stream = stream
                output.mux(packet)
    return (time.process_time() - start) * 1000 / max(frames, 1), frames


async def _child_process(*args: str) -> dict[str, Any]:
    """Run ``python -m byoc.dev.bench.pipeline ARGS`` and return the JSON it prints last."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *_CHILD_COMMAND, *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the benchmark process {args[0]} failed with exit code {process.returncode}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def run_pipeline_bench(seconds: int = 20) -> PipelineReport:
    source = SyntheticStream()
    segments = [source.segment() for _ in range(seconds)]
    first_pts = [source.start_pts + k * source.segment_frames * source.frame_ticks for k in range(seconds)]
    settings = EncoderSettings()
    async with serve_trickle() as trickle, create_client_session(TrickleClientSettings()) as http:
        channels = StreamChannels(_STREAM)
        for role, name in channels.names().items():
            trickle.server.create_channel(name, channels.mime_type(role))
        spec = channels.container_urls(trickle.base_url)
        child = asyncio.create_task(_child_process("--child", json.dumps(spec)))
        await trickle.server.wait_for_request(
            lambda r: (r.method, r.channel) == ("GET", channels.name("input")), timeout=30
        )
        output_ends: dict[int, float] = {}

        async def read_output() -> None:
            output = channels.url(trickle.base_url, "output")
            async with TrickleSubscriber(output, session=http, start_seq=0) as subscriber:
                async for segment in subscriber:
                    data = await segment.read()
                    pts = first_video_pts(data, _VIDEO_PID)
                    if pts is not None:
                        output_ends[pts] = time.monotonic()

        reader = asyncio.create_task(read_output())
        publisher = TricklePublisher(channels.url(trickle.base_url, "input"), session=http)
        with tempfile.NamedTemporaryFile(suffix=".ts") as input_file:
            input_file.write(b"".join(b"".join(s) for s in segments))
            input_file.flush()
            # The raw loop runs at the same time, in a process of its own: same machine, same load.
            raw = asyncio.create_task(_child_process("--raw", input_file.name))
            input_ends = await publish_live(publisher, segments)
            await publisher.close()
            report, raw_report = await asyncio.gather(child, raw)
        await reader
    flat_out_ms, _ = _raw_cpu_ms_per_frame(b"".join(b"".join(s) for s in segments), settings, fps=None)
    latencies = sorted(
        (output_ends[pts] - end) * 1000
        for pts, end in zip(first_pts, input_ends, strict=True)
        if pts in output_ends
    )
    raw_ms, raw_frames = raw_report["cpu_ms_per_frame"], raw_report["frames"]
    session_ms = report["cpu_s"] * 1000 / max(report["frames_out"], 1)
    return PipelineReport(
        seconds=seconds,
        frames_in=raw_frames,
        frames_out=report["frames_out"],
        session_cpu_ms_per_frame=round(session_ms, 3),
        raw_cpu_ms_per_frame=round(raw_ms, 3),
        raw_flat_out_cpu_ms_per_frame=round(flat_out_ms, 3),
        ratio=round(session_ms / raw_ms, 3),
        added_latency_ms_p50=round(percentile(latencies, 0.5) or 0.0, 1),
        added_latency_ms_p95=round(percentile(latencies, 0.95) or 0.0, 1),
        frame_latency_ms_p50=report["frame_latency_ms_p50"],
        dropped=report["dropped"],
        thread_cpu_ms_per_frame={
            name: round(cpu * 1000 / max(report["frames_out"], 1), 3)
            for name, cpu in report["thread_cpu_s"].items()
        },
    )


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds per live thread of this process, by thread name (Linux; empty elsewhere)."""
    names = {t.native_id: t.name.split("-")[0] for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    result: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            name = names.get(int(tid), "other")
            result[name] = result.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return result


async def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the session process: run one passthrough session and report its CPU time."""
    from byoc.builtin.passthrough import PassthroughProcessor
    from byoc.session import Session
    from byoc.spec import StreamSpec

    async with create_client_session(TrickleClientSettings()) as http:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        session = Session(StreamSpec(stream_id=_STREAM, **spec), PassthroughProcessor(), http)
        run = asyncio.create_task(session.run())
        start = _thread_cpu_s()
        per_thread: dict[str, float] = {}
        while not run.done():  # sample the threads while they exist
            per_thread = {**per_thread, **_thread_cpu_s()}
            await asyncio.wait([run], timeout=0.25)
        per_thread = {name: cpu - start.get(name, 0.0) for name, cpu in per_thread.items()}
        after = resource.getrusage(resource.RUSAGE_SELF)
    stats = session.statistics()
    return {
        "thread_cpu_s": per_thread,
        "cpu_s": after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime,
        "frames_out": stats.frames_out,
        "dropped": stats.frames_dropped,
        "frame_latency_ms_p50": None
        if stats.latency_ms["p50"] is None
        else round(stats.latency_ms["p50"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="byoc bench pipeline")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_child(json.loads(args.child)))))
        return 0
    if args.raw:
        ms, frames = _raw_cpu_ms_per_frame(Path(args.raw).read_bytes(), EncoderSettings(), fps=30.0)
        print(json.dumps({"cpu_ms_per_frame": ms, "frames": frames}))
        return 0
    report = asyncio.run(run_pipeline_bench(args.seconds))
    print(json.dumps(asdict(report)) if args.json else "\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
