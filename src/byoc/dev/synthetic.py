"""A synthetic live source: a moving test pattern as MPEG-TS segments, with optional audio.

Every frame carries its index in its pixels (:func:`read_frame_index`), so tests and tools can tell
exactly which frames came out of a pipeline, in which order, and whether any was lost or repeated.
Each segment is one GOP in its own TS container (PAT/PMT + IDR first), timestamps continue across
segments, and :meth:`SyntheticStream.segment` returns the segment as per-frame byte chunks so that a
publisher can send every frame when it is due, as a live encoder would.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import av
import numpy as np

from byoc.media.encoder import EncoderSettings, open_video_encoder
from byoc.media.ts import shift_timestamps


class _SegmentPublisher(Protocol):
    def segment(self) -> Any: ...


__all__ = [
    "DELIVERIES",
    "INDEX_BITS",
    "LoopingSource",
    "SyntheticStream",
    "pattern",
    "publish_live",
    "read_frame_index",
]

INDEX_BITS = 16
_ROWS = 2  # the index, then its complement as a check
_TIME_BASE = Fraction(1, 90000)


@functools.lru_cache(maxsize=8)
def _gradients(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.broadcast_to((np.arange(width) % 256).astype(np.uint8)[None, :], (height, width))
    y = np.broadcast_to((np.arange(height) % 256).astype(np.uint8)[:, None], (height, width))
    diagonal = ((np.arange(width)[None, :] + np.arange(height)[:, None]) // 2 % 256).astype(np.uint8)
    return x, y, diagonal


def pattern(index: int, width: int, height: int) -> np.ndarray:
    """An RGB test picture for frame ``index``: moving gradients and the index as a bit code on top."""
    x, y, diagonal = _gradients(width, height)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    np.add(x, np.uint8(4 * index % 256), out=rgb[..., 0])
    np.add(y, np.uint8(2 * index % 256), out=rgb[..., 1])
    np.add(diagonal, np.uint8(8 * index % 256), out=rgb[..., 2])
    bar = (index * 7) % max(1, width - width // 8)
    rgb[height // 2 : height // 2 + height // 8, bar : bar + width // 8] = 255
    block = width // INDEX_BITS
    bits = (index >> np.arange(INDEX_BITS)) & 1
    code = np.where(np.stack([bits, 1 - bits]) == 1, 235, 16).astype(np.uint8)  # rows: index, complement
    cells = np.repeat(np.repeat(code, block, axis=0), block, axis=1)
    rgb[: _ROWS * block, : INDEX_BITS * block] = cells[:, :, None]
    return rgb


def read_frame_index(rgb: np.ndarray, *, inverted: bool = False) -> int | None:
    """The index :func:`pattern` drew into a (decoded) frame, or None if the code is unreadable."""
    width = rgb.shape[1]
    block = width // INDEX_BITS
    if block < 4 or rgb.shape[0] < _ROWS * block:
        return None
    margin = block // 4
    luma = rgb.astype(np.float32).mean(axis=2)
    if inverted:
        luma = 255.0 - luma
    index = 0
    for bit in range(INDEX_BITS):
        cells = [
            luma[
                r * block + margin : (r + 1) * block - margin,
                bit * block + margin : (bit + 1) * block - margin,
            ]
            for r in range(_ROWS)
        ]
        on, check = (float(cell.mean()) > 128.0 for cell in cells)
        if on == check:
            return None
        index |= int(on) << bit
    return index


@dataclass
class SyntheticStream:
    """Encodes the test pattern as live MPEG-TS segments (H.264; AAC or Opus audio optionally)."""

    width: int = 512
    height: int = 512
    fps: int = 30
    segment_frames: int = 30
    audio: str | None = None
    """None, "aac" or "opus"."""
    preset: str = "veryfast"
    start_pts: int = 900_000
    _encoder: av.VideoCodecContext | None = field(default=None, init=False, repr=False)
    _audio_encoder: av.AudioCodecContext | None = field(default=None, init=False, repr=False)
    _next_frame: int = field(default=0, init=False)
    _next_sample: int = field(default=0, init=False)

    @property
    def frame_ticks(self) -> int:
        return 90000 // self.fps

    def segment(self) -> list[bytes]:
        """The next segment, as one chunk of TS bytes per video frame (the first has the tables)."""
        sink = io.BytesIO()
        options = {"flush_packets": "1", "max_delay": "0", "mpegts_flags": "initial_discontinuity"}
        container = av.open(sink, "w", format="mpegts", options=options)
        video = container.add_mux_stream("h264", rate=self.fps, width=self.width, height=self.height)
        video.time_base = _TIME_BASE
        sound = None
        if self.audio is not None:
            sound = container.add_mux_stream(self.audio, rate=48000 if self.audio == "opus" else 44100)
            sound.time_base = _TIME_BASE
        chunks: list[bytes] = []
        taken = 0
        for n in range(self.segment_frames):
            index = self._next_frame + n
            for packet in self._encode_video(index, key=n == 0):
                packet.stream = video
                container.mux(packet)
            if sound is not None:
                for packet in self._encode_audio(until_pts=self._pts(index + 1)):
                    packet.stream = sound
                    container.mux(packet)
            if n < self.segment_frames - 1:
                chunks.append(sink.getvalue()[taken:])
                taken = sink.tell()
        container.close()
        chunks.append(sink.getvalue()[taken:])
        self._next_frame += self.segment_frames
        return chunks

    def segments(self, count: int) -> Iterator[list[bytes]]:
        for _ in range(count):
            yield self.segment()

    def _pts(self, index: int) -> int:
        return self.start_pts + index * self.frame_ticks

    def _encode_video(self, index: int, *, key: bool) -> list[av.Packet[Any]]:
        if self._encoder is None:
            settings = EncoderSettings(self.width, self.height, fps=self.fps, preset=self.preset)
            self._encoder = open_video_encoder(settings)
        frame = av.VideoFrame.from_ndarray(pattern(index, self.width, self.height), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts, frame.time_base = self._pts(index), _TIME_BASE
        frame.pict_type = av.video.frame.PictureType.I if key else av.video.frame.PictureType.NONE
        return list(self._encoder.encode(frame))

    def _encode_audio(self, until_pts: int) -> list[av.Packet[Any]]:
        assert self.audio is not None
        if self._audio_encoder is None:
            encoder = av.CodecContext.create("libopus" if self.audio == "opus" else "aac", "w")
            assert isinstance(encoder, av.AudioCodecContext)
            encoder.sample_rate = 48000 if self.audio == "opus" else 44100
            encoder.layout = "stereo"
            encoder.format = "flt" if self.audio == "opus" else "fltp"
            encoder.time_base = Fraction(1, encoder.sample_rate)
            encoder.open()
            self._audio_encoder = encoder
        encoder = self._audio_encoder
        rate = encoder.sample_rate
        size = encoder.frame_size or 1024
        packets: list[av.Packet[Any]] = []
        start_sample = self.start_pts * rate // 90000
        while (start_sample + self._next_sample) * 90000 // rate < until_pts:
            t = (self._next_sample + np.arange(size)) / rate
            tone = (0.2 * np.sin(2 * math.pi * 440.0 * t)).astype(np.float32)
            if encoder.format.is_planar:
                samples = np.stack([tone, tone])
            else:
                samples = np.stack([tone, tone], axis=1).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format=encoder.format.name, layout="stereo")
            frame.sample_rate = rate
            frame.pts = start_sample + self._next_sample
            frame.time_base = Fraction(1, rate)
            for packet in encoder.encode(frame):
                if self.audio == "aac":
                    packet = _with_adts_header(packet, rate)
                packets.append(packet)
            self._next_sample += size
        return packets


_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def _with_adts_header(packet: av.Packet[Any], rate: int) -> av.Packet[Any]:
    """Raw AAC-LC stereo framed with an ADTS header, which MPEG-TS needs when there is no extradata."""
    payload = bytes(packet)
    length = len(payload) + 7
    index = _ADTS_RATES.index(rate)
    header = bytes(
        [
            0xFF,
            0xF1,  # MPEG-4, layer 0, no CRC
            (1 << 6) | (index << 2),  # profile AAC LC (1 + 1), sampling frequency index, channel config msb 0
            (2 << 6) | (length >> 11),  # channel configuration 2 (stereo), frame length high bits
            (length >> 3) & 0xFF,
            ((length & 0x7) << 5) | 0x1F,
            0xFC,
        ]
    )
    framed = av.Packet(header + payload)
    framed.pts, framed.dts, framed.time_base = packet.pts, packet.dts, packet.time_base
    return framed


DELIVERIES = ("frames", "spread", "burst", "chunks")
"""How :func:`publish_live` hands a segment's bytes to the publisher:

* ``frames``: each chunk when its frame is due (the chunks are one frame each, as
  :meth:`SyntheticStream.segment` returns them): a live encoder writing as it encodes;
* ``spread``: the segment's bytes in even pieces (one per frame) spread over its duration;
* ``burst``: the whole segment in one write when it is due: a publisher that writes finished
  segments, or a gateway catching up after a stall;
* ``chunks``: the whole segment when it is due, in back-to-back 1 KiB writes.
"""

_CHUNK_BYTES = 1024


async def publish_live(
    publisher: _SegmentPublisher,
    segments: Iterable[list[bytes]],
    *,
    fps: float = 30.0,
    realtime: bool = True,
    delivery: str = "frames",
    segment_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_segment: Callable[[list[bytes], float], None] | None = None,
) -> list[float]:
    """Publish segments as a live source would: by default each frame's bytes when the frame is due.

    ``delivery`` is one of :data:`DELIVERIES`. A segment lasts ``segment_s`` (default: one frame per
    chunk at ``fps``); segment ``k`` is due ``k`` segment durations after the start. Without
    ``realtime`` every write goes out at once. Returns the time (``clock()``) at which each segment was
    complete (``on_segment`` gets each segment and that time as it happens, for endless sources).
    """
    if delivery not in DELIVERIES:
        raise ValueError(f"delivery must be one of {', '.join(DELIVERIES)}, got {delivery!r}")
    ends: list[float] = []
    start = clock()
    due = 0.0  # when the current segment starts, in seconds after the start

    async def wait_until(offset: float) -> None:
        if realtime:
            await asyncio.sleep(max(0.0, start + offset - clock()))

    for chunks in segments:
        duration = segment_s if segment_s is not None else len(chunks) / fps
        async with publisher.segment() as segment:
            if delivery == "frames":
                for n, chunk in enumerate(chunks):
                    await wait_until(due + n / fps)
                    await segment.write(chunk)
            else:
                data = b"".join(chunks)
                if delivery == "spread":
                    pieces = max(1, round(duration * fps))
                    bounds = [len(data) * n // pieces for n in range(pieces + 1)]
                    writes = [
                        (due + n * duration / pieces, data[a:b])
                        for n, (a, b) in enumerate(itertools.pairwise(bounds))
                    ]
                elif delivery == "burst":
                    writes = [(due, data)]
                else:
                    writes = [(due, data[i : i + _CHUNK_BYTES]) for i in range(0, len(data), _CHUNK_BYTES)]
                for offset, piece in writes:
                    await wait_until(offset)
                    if piece:
                        await segment.write(piece)
        due += duration
        ends.append(clock())
        if on_segment is not None:
            on_segment(chunks, ends[-1])
    return ends


class LoopingSource:
    """A synthetic stream that never ends, at almost no CPU: a few encoded seconds replayed in a loop.

    Each replay moves every timestamp forward by the loop's length, so the stream a consumer sees has
    continuous, increasing timestamps (the frame index drawn in the pixels repeats with the loop). The
    loop is encoded once per process and shared by every source with the same parameters.
    :meth:`replaying` loops given segments instead (any TS: every PID's timestamps move).
    """

    def __init__(self, seconds: int = 4, audio: str | None = None) -> None:
        self._loop, self._loop_ticks = _encoded_loop(seconds, audio)
        self._position = 0

    @classmethod
    def replaying(cls, segments: Sequence[list[bytes]], ticks: int) -> LoopingSource:
        """A source that replays ``segments`` (each a list of TS-aligned chunks), each round ``ticks``
        (90 kHz) later than the one before."""
        if not segments or ticks <= 0:
            raise ValueError("a loop needs at least one segment and a positive length")
        source = cls.__new__(cls)
        source._loop, source._loop_ticks, source._position = list(segments), ticks, 0
        return source

    def __iter__(self) -> Iterator[list[bytes]]:
        while True:
            yield self.segment()

    def segment(self) -> list[bytes]:
        """The next segment, as per-frame chunks."""
        rounds, index = divmod(self._position, len(self._loop))
        self._position += 1
        chunks = self._loop[index]
        if rounds == 0:
            return chunks
        return [shift_timestamps(chunk, rounds * self._loop_ticks) for chunk in chunks]


@functools.lru_cache(maxsize=4)
def _encoded_loop(seconds: int, audio: str | None) -> tuple[list[list[bytes]], int]:
    source = SyntheticStream(audio=audio)
    return [source.segment() for _ in range(seconds)], seconds * source.segment_frames * source.frame_ticks
