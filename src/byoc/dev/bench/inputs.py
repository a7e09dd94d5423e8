"""What the benchmarks feed a session: a corpus case (default ``h264-aac``, as gateways send it) or
``synthetic``.

A corpus case (:mod:`byoc.dev.corpus`, made by ffmpeg) is generated once, :data:`LOOP_S` seconds long,
and replayed in a loop with every timestamp moved forward by the loop's length
(:meth:`byoc.dev.synthetic.LoopingSource.replaying`), so a benchmark of any length gets a continuous
stream. The loop's length is the span of all its streams together: where ffmpeg's audio runs a little
longer than the video (whole AAC frames), the video has that small gap at each loop point, and no
timestamp ever goes back. ``synthetic`` is byoc's own video-only test pattern
(:class:`byoc.dev.synthetic.SyntheticStream`), one chunk per frame.

``--delivery`` maps onto :data:`byoc.dev.synthetic.DELIVERIES` (:meth:`BenchInput.delivery`):
``spread`` sends each segment's bytes in even pieces over its duration (the synthetic input, whose
chunks are one frame each: each frame's bytes when the frame is due), ``burst`` the whole segment in
one write when it is due.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av

from byoc.dev import corpus
from byoc.dev.synthetic import LoopingSource, SyntheticStream

__all__ = [
    "DEFAULT_DELIVERY",
    "DEFAULT_INPUT",
    "DELIVERY_CHOICES",
    "INPUT_ALIASES",
    "LOOP_S",
    "BenchInput",
    "add_arguments",
    "bench_input",
    "choices",
]

DEFAULT_INPUT = "h264-aac"
INPUT_ALIASES = {"aac": DEFAULT_INPUT}
"""Other names ``--input`` takes: ``aac`` is the default, H.264 with AAC audio."""
DELIVERY_CHOICES = ("spread", "burst")
DEFAULT_DELIVERY = "spread"
LOOP_S = 8.0
"""Seconds of a corpus case generated for a benchmark (then looped)."""
SYNTHETIC = "synthetic"
_TICKS = 90000


@dataclass(frozen=True)
class BenchInput:
    """A benchmark's input: ``segments`` (each a list of TS-aligned chunks) and what they hold."""

    name: str
    description: str
    segments: list[list[bytes]]
    segment_s: float
    """Seconds of media per segment (the pace at which they are published)."""
    fps: float
    """Video frames per second of media (what a real-time session puts out)."""
    has_audio: bool
    more: Callable[[], list[bytes]]
    """The segment after the last one handed out (``segments``, then every call): the stream goes on."""

    @property
    def seconds(self) -> float:
        return self.segment_s * len(self.segments)

    def stream(self, seconds: float) -> Iterator[list[bytes]]:
        """``segments``, then as many more as make ``seconds`` of input, made as they are needed."""
        yield from self.segments
        for _ in range(math.ceil(seconds / self.segment_s) - len(self.segments)):
            yield self.more()

    def delivery(self, choice: str) -> str:
        """The :func:`byoc.dev.synthetic.publish_live` delivery for the ``--delivery`` ``choice``."""
        if choice not in DELIVERY_CHOICES:
            raise ValueError(f"delivery must be one of {', '.join(DELIVERY_CHOICES)}, got {choice!r}")
        return "frames" if choice == "spread" and self.name == SYNTHETIC else choice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--input`` and ``--delivery``, as both benchmarks take them."""
    parser.add_argument(
        "--input",
        default=DEFAULT_INPUT,
        type=lambda name: INPUT_ALIASES.get(name, name),
        choices=choices(),
        help=f"a corpus case made by ffmpeg, looped (default {DEFAULT_INPUT}, also called aac: H.264 + "
        "AAC, as gateways send), or synthetic (byoc's own video-only test pattern)",
    )
    parser.add_argument(
        "--delivery",
        default=DEFAULT_DELIVERY,
        choices=DELIVERY_CHOICES,
        help="spread: each segment's bytes spread over its duration; burst: the whole segment in one "
        "write when it is due",
    )


def choices() -> list[str]:
    """The ``--input`` names: ``synthetic`` and every corpus case with video."""
    return [SYNTHETIC, *(name for name, case in corpus.CASES.items() if case.video is not None or case.parts)]


def bench_input(name: str, seconds: float) -> BenchInput:
    """At least ``seconds`` of input ``name`` (whole segments). A corpus case needs ffmpeg
    (:class:`byoc.dev.corpus.FfmpegNotFound` without it)."""
    if name == SYNTHETIC:
        source = SyntheticStream()
        count = max(1, math.ceil(seconds * source.fps / source.segment_frames))
        return BenchInput(
            SYNTHETIC,
            f"synthetic {source.width}x{source.height} {source.fps} fps H.264, no audio, one chunk per frame",
            [source.segment() for _ in range(count)],
            source.segment_frames / source.fps,
            float(source.fps),
            False,
            source.segment,
        )
    if name not in corpus.CASES:
        raise ValueError(f"unknown input {name!r}: one of {', '.join(choices())}")
    case = corpus.CASES[name]
    if not case.parts and case.post is None and case.seconds < LOOP_S:
        case = dataclasses.replace(case, seconds=LOOP_S)
    made = corpus.segments(case)
    loop = _describe(b"".join(made))
    if loop.frames == 0:
        raise ValueError(f"input {name!r} has no video")
    looping = LoopingSource.replaying([[segment] for segment in made], loop.ticks)
    count = max(1, math.ceil(seconds * len(made) * _TICKS / loop.ticks))
    return BenchInput(
        name,
        f"ffmpeg {name}: {loop.streams}; {loop.ticks / _TICKS:.2f} s looped",
        [looping.segment() for _ in range(count)],
        loop.ticks / _TICKS / len(made),
        loop.frames * _TICKS / loop.ticks,
        loop.has_audio,
        looping.segment,
    )


@dataclass(frozen=True)
class _Loop:
    ticks: int
    frames: int
    has_audio: bool
    streams: str


def _describe(data: bytes) -> _Loop:
    """The span (90 kHz) of all streams in ``data`` together, its video frames, and its streams in words."""
    start: int | None = None
    end = 0
    frames = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        streams = [_stream_words(stream) for stream in container.streams if stream.type in ("video", "audio")]
        has_audio = any(stream.type == "audio" for stream in container.streams)
        for packet in container.demux():
            if packet.pts is None or packet.time_base is None:
                continue
            scale = packet.time_base * _TICKS
            first = int(packet.pts * scale)
            last = int((packet.pts + (packet.duration or 0)) * scale)
            start = first if start is None else min(start, first)
            end = max(end, last)
            frames += packet.stream.type == "video"
    return _Loop(max(1, end - (start or 0)), frames, has_audio, ", ".join(streams))


def _stream_words(stream: av.stream.Stream) -> str:
    context = stream.codec_context
    if isinstance(context, av.VideoCodecContext):
        rate = f" {float(stream.average_rate):g} fps" if stream.average_rate else ""
        return f"{context.width}x{context.height}{rate} {context.name}"
    if isinstance(context, av.AudioCodecContext):
        return f"{context.name} {context.sample_rate} Hz {context.layout.name}"
    return str(context.name)
