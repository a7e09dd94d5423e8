"""The encoder stage: H.264 (+ Opus) in MPEG-TS, cut into segments that each start with an IDR.

It runs on its own thread. Video frames are encoded by one libx264 context (no B-frames, zero
latency, one thread) and audio by one libopus context at 48 kHz; each output segment is its own
MPEG-TS container, so every segment starts with PAT/PMT and its first video frame is a forced IDR.
Timestamps pass through unchanged. A segment ends right after the last frame of an input segment (a
:class:`Boundary`) once it has lasted half of ``segment_s``, and is cut before a frame that would make
it longer than ``segment_s``. Bytes go to the :class:`OutputSink` as each packet is muxed, so the first
bytes of a segment leave long before the segment is complete.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import av
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

from byoc.errors import MediaError
from byoc.media.items import TIME_BASE, AudioItem, Boundary, InputInfo, Item, VideoItem
from byoc.media.queues import Closed, StageQueue
from byoc.media.stage import Stage

__all__ = [
    "MAX_SEGMENT_S",
    "Encoder",
    "EncoderSettings",
    "EncoderStatistics",
    "OutputSink",
    "open_video_encoder",
]

log = logging.getLogger(__name__)

MAX_SEGMENT_S = 2.0
_OUTPUT_OPTIONS = {
    "flush_packets": "1",  # every muxed packet reaches the sink at once
    "max_delay": "0",  # no muxing delay added to timestamps
    "max_interleave_delta": "1",  # never hold packets waiting for the other stream
    "mpegts_flags": "initial_discontinuity",  # a new container per segment: no continuity errors
}
_AUDIO_RATE = 48000
_MAX_PENDING_AUDIO = 100
_MAX_CONSECUTIVE_ERRORS = 30


class OutputSink(Protocol):
    """Where encoded segments go. Called from the encoder thread."""

    def write(self, segment: int, data: bytes) -> None: ...

    def end(self, segment: int) -> None: ...

    def close(self) -> None:
        """No more segments: the encoder has finished."""


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    width: int = 512
    height: int = 512
    fps: int = 30
    """Frame rate hint for rate control; timestamps come from the frames."""
    segment_s: float = 1.0
    preset: str = "superfast"
    crf: int = 23

    def __post_init__(self) -> None:
        if not 0.1 <= self.segment_s <= MAX_SEGMENT_S:
            raise ValueError(f"segment_s must be within 0.1..{MAX_SEGMENT_S} s, got {self.segment_s}")
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(
                f"width and height must be positive even numbers, got {self.width}x{self.height}"
            )


@dataclass(frozen=True, slots=True)
class EncoderStatistics:
    frames_out: int
    segments_out: int
    bytes_out: int


def open_video_encoder(settings: EncoderSettings) -> av.VideoCodecContext:
    """An open libx264 context for live segments: one thread, zero latency, no B-frames, and IDRs only
    where a frame asks for one (the start of each segment)."""
    encoder = av.CodecContext.create("libx264", "w")
    assert isinstance(encoder, av.VideoCodecContext)
    encoder.width, encoder.height, encoder.pix_fmt = settings.width, settings.height, "yuv420p"
    encoder.time_base, encoder.framerate = TIME_BASE, Fraction(settings.fps, 1)
    encoder.thread_count = 1
    encoder.options = {
        "preset": settings.preset,
        "tune": "zerolatency",
        "crf": str(settings.crf),
        "forced-idr": "1",
        "x264-params": "bframes=0:keyint=infinite:scenecut=0",
    }
    encoder.open()
    return encoder


def _ends_before(frame: av.AudioFrame, pts: int) -> bool:
    if frame.pts is None or frame.time_base != TIME_BASE or not frame.sample_rate:
        return False
    return frame.pts + frame.samples * 90000 // frame.sample_rate <= pts


class _SegmentWriter:
    """The file object of one segment's container: forwards every write to the sink."""

    def __init__(self, sink: OutputSink, segment: int, counter: Callable[[int], None]) -> None:
        self._sink = sink
        self._segment = segment
        self._count = counter

    def write(self, data: bytes | memoryview) -> int:
        chunk = bytes(data)
        self._count(len(chunk))
        self._sink.write(self._segment, chunk)
        return len(chunk)


class Encoder(Stage):
    """Encodes one session's processed frames on a thread; see the module docstring."""

    def __init__(
        self,
        source: StageQueue[Item],
        sink: OutputSink,
        settings: EncoderSettings,
        *,
        name: str = "encoder",
        nice: int = 0,
        on_frame: Callable[[VideoItem], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, nice=nice)
        self._source = source
        self._sink = sink
        self.settings = settings
        self._want_audio = False  # until the decoder says the input has audio
        self._first_pts: int | None = None
        self._on_frame = on_frame or (lambda item: None)
        self._on_error = on_error or (lambda kind: None)
        self._clock = clock
        self._segment_ticks = round(settings.segment_s * 90000)
        self._video: av.VideoCodecContext | None = None
        self._audio: av.AudioCodecContext | None = None
        self._resampler: av.AudioResampler | None = None
        self._reformatter = VideoReformatter()
        self._container: av.container.OutputContainer | None = None
        self._video_stream: av.stream.Stream | None = None
        self._audio_stream: av.stream.Stream | None = None
        self._pending_audio: deque[av.AudioFrame] = deque(maxlen=_MAX_PENDING_AUDIO)
        self._segment = -1
        self._segment_start = 0
        self._last_pts: int | None = None
        self._step = 3000
        self._consecutive_errors = 0
        self._frames_out = self._segments = self._bytes = 0

    def statistics(self) -> EncoderStatistics:
        return EncoderStatistics(self._frames_out, self._segments, self._bytes)

    # --- the encoder thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._video_encoder()  # open x264 now: the first frame must not wait for it
            while True:
                try:
                    item = self._source.get()
                except Closed:
                    break
                if isinstance(item, VideoItem):
                    self._encode_video(item)
                elif isinstance(item, AudioItem):
                    self._encode_audio(item.frame)
                elif isinstance(item, Boundary):
                    self._input_segment_ended()
                elif isinstance(item, InputInfo):
                    self._want_audio = item.has_audio
            self._finish()
        except BaseException as exc:  # reported to the session, which ends with this error
            log.exception("encoder failed")
            self.error = exc
            self._close_segment()
        finally:
            self._source.close()  # nothing upstream may wait on this stage any more
            self._sink.close()

    def _count_bytes(self, size: int) -> None:
        self._bytes += size

    def _error(self, exc: Exception) -> None:
        self._consecutive_errors += 1
        self._on_error("encode")
        log.warning("encoding failed: %s", exc)
        if self._consecutive_errors >= _MAX_CONSECUTIVE_ERRORS:
            raise MediaError(f"{self._consecutive_errors} encoding failures in a row, last: {exc}") from exc

    def _open_segment(self, pts: int) -> av.container.OutputContainer:
        self._close_segment()
        self._segment += 1
        writer = _SegmentWriter(self._sink, self._segment, self._count_bytes)
        container = av.open(writer, mode="w", format="mpegts", options=_OUTPUT_OPTIONS)
        s = self.settings
        self._video_stream = container.add_mux_stream("h264", rate=s.fps, width=s.width, height=s.height)
        self._video_stream.time_base = TIME_BASE
        if self._audio is not None:
            self._audio_stream = container.add_mux_stream("opus", rate=_AUDIO_RATE)
            self._audio_stream.time_base = TIME_BASE
        self._container = container
        self._segment_start = pts
        return container

    def _close_segment(self) -> None:
        container, self._container = self._container, None
        if container is None:
            return
        try:
            container.close()  # writes whatever the muxer still holds
        finally:
            self._segments += 1
            self._sink.end(self._segment)

    def _video_encoder(self) -> av.VideoCodecContext:
        if self._video is None:
            self._video = open_video_encoder(self.settings)
        if self._want_audio and self._audio is None:
            self._audio = self._audio_encoder()
        return self._video

    def _audio_encoder(self) -> av.AudioCodecContext:
        encoder = av.CodecContext.create("libopus", "w")
        assert isinstance(encoder, av.AudioCodecContext)
        encoder.sample_rate, encoder.layout, encoder.format = _AUDIO_RATE, "stereo", "flt"
        encoder.time_base = Fraction(1, _AUDIO_RATE)
        encoder.bit_rate = 96000
        self._resampler = av.AudioResampler(format="flt", layout="stereo", rate=_AUDIO_RATE, frame_size=960)
        return encoder

    def _encode_video(self, item: VideoItem) -> None:
        encoder = self._video_encoder()
        frame = item.frame
        s = self.settings
        if frame.width != s.width or frame.height != s.height or frame.format.name != "yuv420p":
            pts = frame.pts
            frame = self._reformatter.reformat(frame, s.width, s.height, "yuv420p", threads=1)
            frame.pts, frame.time_base = pts, TIME_BASE
        pts = int(frame.pts or 0)
        if self._last_pts is not None:
            if pts <= self._last_pts:
                pts = self._last_pts + 1  # a processor returned a stale timestamp
            self._step = min(pts - self._last_pts, 90000)
        new_segment = self._container is None or pts - self._segment_start >= self._segment_ticks
        container = self._open_segment(pts) if new_segment else self._container
        assert container is not None
        frame.pts, frame.time_base = pts, TIME_BASE
        frame.pict_type = PictureType.I if new_segment else PictureType.NONE
        try:
            packets = encoder.encode(frame)
        except av.error.FFmpegError as exc:
            self._error(exc)
            return
        self._consecutive_errors = 0
        self._last_pts = pts
        if self._first_pts is None:
            self._first_pts = pts
        for packet in packets:
            packet.stream = self._video_stream
            container.mux(packet)
        self._frames_out += 1
        self._on_frame(item)
        if new_segment:
            while self._pending_audio:
                self._encode_audio(self._pending_audio.popleft())

    def _encode_audio(self, frame: av.AudioFrame) -> None:
        if not self._want_audio:
            return
        if self._container is None or self._audio is None:
            self._pending_audio.append(frame)
            return
        if self._segment == 0 and self._first_pts is not None and _ends_before(frame, self._first_pts):
            return  # older than the first video frame
        assert self._resampler is not None
        try:
            for resampled in self._resampler.resample(frame):
                self._mux_audio(self._audio.encode(resampled))
        except av.error.FFmpegError as exc:
            self._error(exc)

    def _mux_audio(self, packets: list[av.Packet[Any]]) -> None:
        assert self._container is not None
        for packet in packets:
            packet.stream = self._audio_stream
            self._container.mux(packet)

    def _input_segment_ended(self) -> None:
        if self._container is None or self._last_pts is None:
            return
        if self._last_pts + self._step - self._segment_start >= self._segment_ticks // 2:
            self._close_segment()

    def _finish(self) -> None:
        if self._video is not None and self._container is not None:
            for packet in self._video.encode(None):
                packet.stream = self._video_stream
                self._container.mux(packet)
            if self._audio is not None and self._resampler is not None:
                for resampled in self._resampler.resample(None):
                    self._mux_audio(self._audio.encode(resampled))
                self._mux_audio(self._audio.encode(None))
        self._close_segment()
