"""``byoc bench pipeline``: what a session costs compared with the bare PyAV work it wraps.

One run does both measurements on the same input (``--input``: by default ffmpeg-made 512x512 30 fps
H.264 with 48 kHz AAC, one GOP per 1 s segment, as gateways send; see :mod:`byoc.dev.bench.inputs`):

* a passthrough session in its own process, fed over loopback trickle at real-time pace (``--delivery``
  spread or burst); its CPU time is read inside that process from the session's start to its end, so
  the trickle server, publisher and reader of this benchmark are not counted;
* the raw loop ``decode -> encode`` of the same bytes with the same encoder settings (video to H.264,
  audio to Opus, as the session does), at the same live pace, in a second process running at the same
  time (so both see the same machine load); and once flat out, for reference.

It prints CPU milliseconds per video frame for both and their ratio, the audio the session put out
beside the video frames, and the added latency of every segment: when the output segment was complete
minus when the input segment was complete. It measures :data:`_DEFAULT_RUNS` times (``--runs N``) and
reports the median ratio as well (why: see there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av

from byoc.dev.bench.inputs import (
    DEFAULT_DELIVERY,
    DEFAULT_INPUT,
    DELIVERY_CHOICES,
    BenchInput,
    add_arguments,
    bench_input,
)
from byoc.dev.corpus import FfmpegNotFound
from byoc.dev.synthetic import publish_live
from byoc.dev.trickle_server import serve_trickle
from byoc.media.decoder import FrameFitter
from byoc.media.encoder import EncoderSettings, open_audio_encoder, open_video_encoder
from byoc.media.ts import first_video_pts
from byoc.session.stats import percentile
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.layout import StreamChannels
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = ["PipelineReport", "raw_live_cpu_ms_per_frame", "run_pipeline_bench"]

_VIDEO_PID = 0x100
_CHILD_COMMAND = ["-m", "byoc.dev.bench.pipeline"]
_STREAM = "b"


@dataclass(frozen=True)
class PipelineReport:
    input: str
    delivery: str
    seconds: float
    frames_in: int
    frames_out: int
    audio_seconds_in: float
    audio_packets_out: int
    audio_seconds_out: float
    audio_dropped: int
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
            f"input: {self.seconds:.2f} s of {self.input} ({self.frames_in} frames), "
            f"{self.delivery} delivery, passthrough",
            f"video frames out: {self.frames_out}, dropped: {self.dropped}",
            f"audio out: {self.audio_packets_out} packets, {self.audio_seconds_out:.2f} s "
            f"(of {self.audio_seconds_in:.2f} s in), dropped: {self.audio_dropped} frames",
            f"CPU per frame, session: {self.session_cpu_ms_per_frame:.2f} ms ({by_thread})",
            f"CPU per frame, raw PyAV decode+encode: {self.raw_cpu_ms_per_frame:.2f} ms at live pace, "
            f"{self.raw_flat_out_cpu_ms_per_frame:.2f} ms flat out",
            f"ratio session / raw at live pace: {self.ratio:.2f} (target <= 1.10)",
            f"added latency, output segment end - input segment end: p50 {self.added_latency_ms_p50:.1f} ms, "
            f"p95 {self.added_latency_ms_p95:.1f} ms (target p50 <= 20 ms)",
            f"frame latency inside the session (decoded -> encoded): p50 {self.frame_latency_ms_p50} ms",
        ]


_DEFAULT_RUNS = 3
"""Runs a measurement takes by default. The two processes of one run do the same codec work, yet their
codec's CPU time alone differs by up to ~6 % within a run (README), so one run's ratio moves by a few
hundredths: the figure to go by is the median of several."""

_SAMPLE_S = 1.0
"""How often the session process reads its threads' CPU times. A stage's thread that ended since its
last sample used some more, reported together as :data:`_ENDED`. Reading /proc costs the process CPU
too, about 1 % of a session's at this rate: the main thread's CPU time spent on it is taken off the
session's."""
_ENDED = "ended threads after their last sample"


def _raw_cpu_ms_per_frame(data: bytes, settings: EncoderSettings, *, fps: float | None) -> tuple[float, int]:
    """The bare loop: decode every frame and encode it again with the session's encoder settings.

    Video frames are fitted to the output size and encoded to H.264; audio, when there is some, is
    resampled to 48 kHz stereo and encoded to Opus, as the session does. With ``fps`` each video frame
    is decoded and encoded when it is due, at the pace of a live stream (work done in bursts with pauses
    costs more CPU than the same work flat out: cold caches, idle cores). Returns CPU ms per video frame
    and the number of video frames.
    """
    start = time.process_time()
    started = time.monotonic()
    frames = 0
    with av.open(io.BytesIO(data), mode="r") as source:
        video = source.streams.video[0]
        video.codec_context.thread_count = 1
        audio = source.streams.audio[0] if source.streams.audio else None
        encoder = open_video_encoder(settings)
        fitter = FrameFitter(settings.width, settings.height)
        sink = io.BytesIO()
        with av.open(sink, mode="w", format="mpegts") as output:
            stream = output.add_mux_stream(
                "h264", rate=settings.fps, width=settings.width, height=settings.height
            )
            sound = output.add_mux_stream("opus", rate=48000) if audio is not None else None
            opus = open_audio_encoder(settings) if audio is not None else None
            frame_size = opus.frame_size if opus is not None else None  # the Opus encoder's frames
            resampler = av.AudioResampler(format="flt", layout="stereo", rate=48000, frame_size=frame_size)
            next_sample = 0

            def encode_audio(frame: av.AudioFrame | None) -> None:
                nonlocal next_sample
                assert opus is not None
                assert sound is not None
                for chunk in resampler.resample(frame):
                    chunk.pts, chunk.time_base = next_sample, opus.time_base
                    next_sample += chunk.samples
                    for packet in opus.encode(chunk):
                        packet.stream = sound
                        output.mux(packet)

            for packet in source.demux(*(s for s in (video, audio) if s is not None)):
                if packet.stream is audio:
                    for sound_frame in packet.decode():
                        assert isinstance(sound_frame, av.AudioFrame)
                        encode_audio(sound_frame)
                    continue
                for frame in packet.decode():
                    assert isinstance(frame, av.VideoFrame)
                    if fps:
                        time.sleep(max(0.0, started + frames / fps - time.monotonic()))
                    frame = fitter.fit(frame)
                    frame.pict_type = av.video.frame.PictureType.NONE
                    for out in encoder.encode(frame):
                        out.stream = stream
                        output.mux(out)
                    frames += 1
            for out in encoder.encode(None):
                out.stream = stream
                output.mux(out)
            if opus is not None and sound is not None:
                encode_audio(None)
                for out in opus.encode(None):
                    out.stream = sound
                    output.mux(out)
    return (time.process_time() - start) * 1000 / max(frames, 1), frames


async def _child_process(*args: str, profile: str | None = None) -> dict[str, Any]:
    """Run ``python -m byoc.dev.bench.pipeline ARGS`` and return the JSON it prints last; with
    ``profile``, under cProfile (its main thread: the session's event loop), the statistics to that file."""
    profiler = ["-m", "cProfile", "-o", profile] if profile else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, *profiler, *_CHILD_COMMAND, *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the benchmark process {args[0]} failed with exit code {process.returncode}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def raw_live_cpu_ms_per_frame(
    data: bytes, fps: float, settings: EncoderSettings | None = None
) -> tuple[float, int]:
    """The raw loop (decode and encode, as a session does) on the TS bytes ``data`` at live pace, in
    a process of its own, with the encoder ``settings`` (default: the defaults): CPU ms a video frame,
    and the number of video frames."""
    encoding = json.dumps(asdict(settings or EncoderSettings()))
    with tempfile.NamedTemporaryFile(suffix=".ts") as input_file:
        input_file.write(data)
        input_file.flush()
        report = await _child_process(
            "--raw", input_file.name, "--raw-fps", str(fps), "--raw-settings", encoding
        )
    return report["cpu_ms_per_frame"], report["frames"]


async def run_pipeline_bench(
    seconds: float = 20,
    *,
    input_name: str = DEFAULT_INPUT,
    delivery: str = DEFAULT_DELIVERY,
    profile_session: str | None = None,
) -> PipelineReport:
    """Both measurements on ``seconds`` of input ``input_name`` (see :mod:`byoc.dev.bench.inputs`),
    published with ``delivery`` (``spread`` or ``burst``); ``profile_session``: a file for cProfile's
    statistics of the session process's event loop (it slows that loop: its figures are not the
    session's cost)."""
    if delivery not in DELIVERY_CHOICES:
        raise ValueError(f"delivery must be one of {', '.join(DELIVERY_CHOICES)}, got {delivery!r}")
    source: BenchInput = await asyncio.to_thread(bench_input, input_name, seconds)
    segments = source.segments
    data = b"".join(b"".join(chunks) for chunks in segments)
    first_pts = [first_video_pts(b"".join(chunks), _VIDEO_PID) for chunks in segments]
    settings = EncoderSettings()
    async with serve_trickle() as trickle, create_client_session(TrickleClientSettings()) as http:
        channels = StreamChannels(_STREAM)
        for role, name in channels.names().items():
            trickle.server.create_channel(name, channels.mime_type(role))
        spec = channels.container_urls(trickle.base_url)
        child = asyncio.create_task(_child_process("--child", json.dumps(spec), profile=profile_session))
        await trickle.server.wait_for_request(
            lambda r: (r.method, r.channel) == ("GET", channels.name("input")), timeout=30
        )
        output_ends: dict[int, float] = {}

        async def read_output() -> None:
            output = channels.url(trickle.base_url, "output")
            async with TrickleSubscriber(output, session=http, start_seq=0) as subscriber:
                async for segment in subscriber:
                    body = await segment.read()
                    pts = first_video_pts(body, _VIDEO_PID)
                    if pts is not None:
                        output_ends[pts] = time.monotonic()

        reader = asyncio.create_task(read_output())
        publisher = TricklePublisher(channels.url(trickle.base_url, "input"), session=http)
        # The raw loop runs at the same time, in a process of its own: same machine, same load.
        raw = asyncio.create_task(raw_live_cpu_ms_per_frame(data, source.fps))
        input_ends = await publish_live(
            publisher,
            segments,
            fps=source.fps,
            delivery=source.delivery(delivery),
            segment_s=source.segment_s,
        )
        await publisher.close()
        report, (raw_ms, raw_frames) = await asyncio.gather(child, raw)
        await reader
    flat_out_ms, _ = _raw_cpu_ms_per_frame(data, settings, fps=None)
    latencies = sorted(
        (output_ends[pts] - end) * 1000
        for pts, end in zip(first_pts, input_ends, strict=True)
        if pts is not None and pts in output_ends
    )
    session_ms = report["cpu_s"] * 1000 / max(report["frames_out"], 1)
    audio = report["audio"]
    return PipelineReport(
        input=source.description,
        delivery=delivery,
        seconds=round(source.seconds, 3),
        frames_in=raw_frames,
        frames_out=report["frames_out"],
        audio_seconds_in=audio["seconds_in"],
        audio_packets_out=audio["packets_out"],
        audio_seconds_out=audio["seconds_out"],
        audio_dropped=audio["frames_dropped"],
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
        probe_s = 0.0  # the CPU the samples take: the benchmark's, not the session's

        def sample() -> dict[str, float]:
            nonlocal probe_s
            began = time.thread_time()
            threads = _thread_cpu_s()
            probe_s += time.thread_time() - began
            return threads

        start = sample()
        per_thread: dict[str, float] = {}
        while True:  # sample the threads while they exist, and those still there once the session ended
            per_thread = {**per_thread, **sample()}
            if run.done():
                break
            await asyncio.wait([run], timeout=_SAMPLE_S)
        after = resource.getrusage(resource.RUSAGE_SELF)
        per_thread = {name: cpu - start.get(name, 0.0) for name, cpu in per_thread.items()}
        per_thread["MainThread"] = per_thread.get("MainThread", 0.0) - probe_s
        cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime - probe_s
        # The threads that ended after their last sample: what the process used and no sample shows.
        per_thread[_ENDED] = cpu_s - sum(per_thread.values())
    stats = session.statistics()
    return {
        "thread_cpu_s": per_thread,
        "cpu_s": cpu_s,
        "frames_out": stats.frames_out,
        "dropped": stats.frames_dropped,
        "audio": stats.audio.as_dict(),
        "frame_latency_ms_p50": None
        if stats.latency_ms["p50"] is None
        else round(stats.latency_ms["p50"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="byoc bench pipeline")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of input (whole segments)")
    add_arguments(parser)
    parser.add_argument(
        "--runs",
        type=int,
        help="measure N times, one after another, and report every run and the median ratio "
        f"(default {_DEFAULT_RUNS}, 1 with --profile-session: one run's ratio moves by a few hundredths "
        "between runs)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--profile-session",
        metavar="PATH",
        help="write cProfile statistics of the session process's event loop to PATH "
        "(read them with python -m pstats; the profiler slows the loop)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--raw-fps", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--raw-settings", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_child(json.loads(args.child)))))
        return 0
    if args.raw:
        settings = EncoderSettings(**json.loads(args.raw_settings))
        ms, frames = _raw_cpu_ms_per_frame(Path(args.raw).read_bytes(), settings, fps=args.raw_fps)
        print(json.dumps({"cpu_ms_per_frame": ms, "frames": frames}))
        return 0
    runs = args.runs if args.runs is not None else 1 if args.profile_session else _DEFAULT_RUNS
    if runs < 1:
        parser.error("--runs must be at least 1")
    if runs > 1 and args.profile_session:
        parser.error("--profile-session profiles one run: leave out --runs")
    reports: list[PipelineReport] = []
    try:
        for _ in range(runs):
            reports.append(
                asyncio.run(
                    run_pipeline_bench(
                        args.seconds,
                        input_name=args.input,
                        delivery=args.delivery,
                        profile_session=args.profile_session,
                    )
                )
            )
    except FfmpegNotFound as exc:
        print(f"byoc bench pipeline: {exc}", file=sys.stderr)
        return 2
    if len(reports) == 1:
        print(json.dumps(asdict(reports[0])) if args.json else "\n".join(reports[0].lines()))
        return 0
    ratios = [report.ratio for report in reports]
    summary = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    if args.json:
        print(json.dumps({"runs": [asdict(report) for report in reports], **summary}))
        return 0
    for number, report in enumerate(reports, 1):
        print(f"run {number} of {len(reports)}:", *report.lines(), sep="\n  ")
    print(
        f"ratio session / raw at live pace over {len(reports)} runs: median {summary['ratio_median']:.2f} "
        f"({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f}) (target <= 1.10)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
