"""The encoder stage: H.264 (+ Opus) in MPEG-TS, cut into segments that each start with an IDR.

It runs on its own thread. Video frames are encoded by one libx264 context (no B-frames, zero
latency, one thread), or by NVENC (``h264_nvenc``, the same live settings) where ``--codec`` chose it
(byoc/media/codecs.py; an NVENC that fails to open gives way to libx264 with a warning), and audio by
one libopus context at 48 kHz; each output segment is its own MPEG-TS container, so every segment
starts with PAT/PMT and its first video frame is a forced IDR.
Video timestamps pass through unchanged. A segment ends right after the last frame of an input segment
(a :class:`Boundary`) once it has lasted half of ``segment_s``, and is cut before a frame that would
make it longer than ``segment_s``. Bytes go to the :class:`OutputSink` as each packet is muxed, so the
first bytes of a segment leave long before the segment is complete.

Audio of any input rate and layout is resampled to 48 kHz stereo and cut into 20 ms Opus frames
(so at most 20 ms, plus the encoder's 6.5 ms look-ahead, waits at a segment's end for the next one).
Not shorter: every frame costs the thread a GIL hand-off per call (resample, encode, mux), and with many
sessions in one process those hand-offs, not the CPU, are what runs out first.
Its timestamps come from a sample clock anchored on the first input audio timestamp, which follows the
input's timestamps across gaps: an Opus packet's PTS is where its audio sat in the input, so the
input's audio/video offset is kept, and the audio DTS strictly increase within and across segments.
Audio older than the first video frame is not sent; audio that comes while no segment is open waits
for the next one. Audio that cannot be resampled, encoded or muxed (a processor's broken frame, say)
is dropped and counted as an ``audio_encode`` error: it never counts toward the video's
consecutive-failure limit nor ends the session. If no Opus encoder can be opened, the output has no
audio.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import av
import numpy as np
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

from byoc.errors import MediaError
from byoc.media.codecs import NVIDIA_ENCODER, PREFERENCES, SOFTWARE_ENCODER, ChosenCodecs, codecs_for
from byoc.media.items import TIME_BASE, AudioItem, Boundary, InputInfo, Item, VideoItem, rescale
from byoc.media.queues import Closed, StageQueue
from byoc.media.stage import Stage

__all__ = [
    "MAX_SEGMENT_S",
    "Encoder",
    "EncoderSettings",
    "EncoderStatistics",
    "OutputSink",
    "nvenc_options",
    "open_audio_encoder",
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
_AUDIO_TIME_BASE = Fraction(1, _AUDIO_RATE)
_TIME_BASE_RATIO = TIME_BASE.as_integer_ratio()
_OPUS_FRAME_MS = 20
_AUDIO_SLACK = _AUDIO_RATE // 50
"""Input audio timestamps within 20 ms of the sample clock are jitter, not a gap."""
_MAX_AUDIO_GAP = 10 * _AUDIO_RATE
"""A larger jump is a discontinuity (the decoder re-bases it), not a gap to keep."""
_MAX_PENDING_AUDIO_TICKS = 4 * 90000
"""Audio held while no segment is open; older audio is dropped (and counted)."""
_MAX_CONSECUTIVE_ERRORS = 30


class OutputSink(Protocol):
    """Where encoded segments go. Called from the encoder thread."""

    def write(self, segment: int, data: bytes) -> None:
        """More bytes of segment ``segment``; they may wait for the next :meth:`flush`."""

    def flush(self) -> None:
        """Hand on what was written: after each video frame, and before the encoder waits."""

    def end(self, segment: int, frames: int) -> None:
        """Segment ``segment`` is complete; it holds ``frames`` video frames."""

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
    """libx264's preset (NVENC always uses its fastest, ``p1``)."""
    crf: int = 23
    """libx264's constant rate factor; NVENC's constant-quality level (``cq``)."""
    codec: str = "auto"
    """Which video codecs: ``auto``, ``cpu`` or ``nvidia`` (byoc/media/codecs.py)."""
    audio_complexity: int = 5
    """libopus's complexity, 0-10: CPU for quality. Its own default, 10, cost twice as much as 5 (on
    the benchmark machine 0.25 against 0.13 ms a 20 ms frame: over a tenth of a passthrough
    session's CPU), for a difference hard to hear at 96 kb/s stereo."""

    def __post_init__(self) -> None:
        if self.codec not in PREFERENCES:
            raise ValueError(f"codec must be one of {', '.join(PREFERENCES)}, got {self.codec!r}")
        if self.codec == "nvidia":  # refused at start-up (ConfigError) where NVDEC/NVENC do not work
            codecs_for(self.codec, announce=False)
        if not 0.1 <= self.segment_s <= MAX_SEGMENT_S:
            raise ValueError(f"segment_s must be within 0.1..{MAX_SEGMENT_S} s, got {self.segment_s}")
        if not 0 <= self.audio_complexity <= 10:
            raise ValueError(f"audio_complexity must be within 0..10, got {self.audio_complexity}")
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(
                f"width and height must be positive even numbers, got {self.width}x{self.height}"
            )


@dataclass(frozen=True, slots=True)
class EncoderStatistics:
    frames_out: int
    segments_out: int
    bytes_out: int
    audio_frames_in: int = 0
    audio_seconds_in: float = 0.0
    audio_packets_out: int = 0
    audio_seconds_out: float = 0.0
    audio_frames_dropped: int = 0
    """Audio frames not sent: older than the first video frame, held too long, or failed."""


def nvenc_options(settings: EncoderSettings) -> dict[str, str]:
    """NVENC's options for live segments: its fastest preset tuned for ultra-low latency, no B-frames,
    no frame delay, constant quality ``crf``, and a frame that asks for a keyframe (the first of each
    segment) made an IDR. The GOP is one segment long."""
    return {
        "preset": "p1",
        "tune": "ull",
        "zerolatency": "1",
        "delay": "0",
        "bf": "0",
        "forced-idr": "1",
        "g": str(max(1, math.ceil(settings.segment_s * settings.fps))),
        "rc": "vbr",
        "cq": str(settings.crf),
        "b": "0",  # no bitrate target: constant quality
    }


def open_video_encoder(settings: EncoderSettings, name: str | None = None) -> av.VideoCodecContext:
    """An open encoder context for live segments: ``name`` (libx264 or h264_nvenc; default: what
    ``settings.codec`` chose). libx264 runs on one thread with zero latency, no B-frames, and IDRs only
    where a frame asks for one (the start of each segment); NVENC as :func:`nvenc_options` says."""
    name = name or codecs_for(settings.codec).encoder
    if name == NVIDIA_ENCODER:
        return _open_nvenc(settings)
    encoder = av.CodecContext.create(SOFTWARE_ENCODER, "w")
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


def open_audio_encoder(settings: EncoderSettings) -> av.AudioCodecContext:
    """An open Opus encoder for the output: 48 kHz stereo float, 96 kb/s, 20 ms frames, the
    settings' complexity."""
    encoder = av.CodecContext.create("libopus", "w")
    assert isinstance(encoder, av.AudioCodecContext)
    encoder.sample_rate, encoder.layout, encoder.format = _AUDIO_RATE, "stereo", "flt"
    encoder.time_base = _AUDIO_TIME_BASE
    encoder.bit_rate = 96000
    encoder.options = {
        "frame_duration": str(_OPUS_FRAME_MS),
        "compression_level": str(settings.audio_complexity),
    }
    encoder.open()
    return encoder


def _open_nvenc(settings: EncoderSettings) -> av.VideoCodecContext:
    encoder = av.CodecContext.create(NVIDIA_ENCODER, "w")
    assert isinstance(encoder, av.VideoCodecContext)
    encoder.width, encoder.height, encoder.pix_fmt = settings.width, settings.height, "yuv420p"
    encoder.time_base, encoder.framerate = TIME_BASE, Fraction(settings.fps, 1)
    encoder.options = nvenc_options(settings)
    encoder.open()
    return encoder


_PLANAR_STEREO = ("fltp", "stereo", _AUDIO_RATE)
"""What AAC decodes to at 48 kHz stereo: the Opus encoder's format but for the interleaving."""


class _Interleaver:
    """Planar float stereo at 48 kHz as the Opus encoder's interleaved float: the two planes copied into
    one frame, which is used again for the next (the FIFO copies what is written to it). It spares the
    usual input the resampler's filter graph, which costs several times as much for this copy."""

    def __init__(self) -> None:
        self._frame: av.AudioFrame | None = None
        self._samples: np.ndarray[Any, np.dtype[np.float32]] = np.empty(0, np.float32)

    def __call__(self, frame: av.AudioFrame) -> av.AudioFrame:
        count = frame.samples
        out = self._frame
        if out is None or out.samples != count:
            out = self._frame = av.AudioFrame(format="flt", layout="stereo", samples=count)
            out.sample_rate = _AUDIO_RATE
            self._samples = np.frombuffer(memoryview(out.planes[0]), np.float32, 2 * count)
        left, right = frame.planes
        self._samples[0::2] = np.frombuffer(memoryview(left), np.float32, count)
        self._samples[1::2] = np.frombuffer(memoryview(right), np.float32, count)
        return out


def _audio_ticks(frame: av.AudioFrame) -> int:
    """The frame's duration in 90 kHz ticks."""
    return frame.samples * 90000 // frame.sample_rate if frame.sample_rate else 0


class _SegmentWriter:
    """The file object of one segment's container: forwards every write to the sink."""

    def __init__(self, sink: OutputSink, segment: int) -> None:
        self._sink = sink
        self._segment = segment
        self.written = 0
        """Bytes written so far."""

    def write(self, data: bytes | memoryview) -> int:
        chunk = bytes(data)
        self.written += len(chunk)
        self._sink.write(self._segment, chunk)
        return len(chunk)


class EncodeInPlace:
    """The queue before an encoder that runs on its producer's thread: what is put in it is encoded at
    once, by the thread that puts it. A session without a processing stage gives it to its decoder, so
    a frame is decoded and encoded by one thread with no hand-off between two (what the bare decode ->
    encode loop does); the encoder's own thread is not started. An encoder failure ends the input
    (:class:`Closed`, as a queue that was closed) and is the encoder's error."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self._closed = False

    def put(self, item: Item, *, droppable: bool = True, block: bool = True, wake: bool = True) -> None:
        if self._closed:
            raise Closed("put() on a closed queue")
        try:
            self._encoder._handle(item)
        except BaseException as exc:
            self._encoder._failed(exc)
            self.close()
            raise Closed("the encoder failed") from exc

    def wake(self) -> None:
        """The producer is about to wait: what was muxed goes on now."""
        if not self._closed:
            self._encoder._sink.flush()

    def close(self) -> None:
        """The end of the input: the encoder finishes its last segment."""
        if self._closed:
            return
        self._closed = True
        encoder = self._encoder
        try:
            if encoder.error is None:
                encoder._finish()
        except BaseException as exc:
            encoder._failed(exc)
        finally:
            encoder._sink.close()


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
        on_error: Callable[[str, str | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        codecs: ChosenCodecs | None = None,
    ) -> None:
        super().__init__(name, nice=nice)
        self._codecs = codecs
        """The video codecs (default: what ``settings.codec`` chose for the process)."""
        self._source = source
        self._sink = sink
        self.settings = settings
        self._want_audio = False  # until the decoder says the input has audio
        self._first_pts: int | None = None
        self._on_frame = on_frame or (lambda item: None)
        self._on_error = on_error or (lambda kind, message: None)
        self._clock = clock
        self._segment_ticks = round(settings.segment_s * 90000)
        self._video: av.VideoCodecContext | None = None
        self._audio: av.AudioCodecContext | None = None
        self._audio_off = False  # no Opus encoder could be opened: video only
        self._audio_failures = 0  # in a row (the first of a run is logged as a warning)
        self._resampler: av.AudioResampler | None = None
        self._resampler_input: tuple[str, str, int] | None = None
        self._interleave = _Interleaver()  # instead of the resampler for 48 kHz stereo float input
        self._fifo = av.AudioFifo()
        self._audio_next: int | None = None
        """The 48 kHz sample clock at the next sample to encode (the first one in the FIFO)."""
        self._audio_last_pts: int | None = None  # of the last packet muxed, on the sample clock
        self._reformatter = VideoReformatter()
        self._container: av.container.OutputContainer | None = None
        self._video_stream: av.stream.Stream | None = None
        self._audio_stream: av.stream.Stream | None = None
        self._pending_audio: deque[AudioItem] = deque()
        self._pending_ticks = 0
        self._segment = -1
        self._segment_frames = 0  # video frames in the open segment
        self._segment_start = 0
        self._last_pts: int | None = None
        self._step = 3000
        self._consecutive_errors = 0
        self._frames_out = self._segments = 0
        self._bytes = 0  # of the segments closed; the open one's writer counts its own
        self._writer: _SegmentWriter | None = None
        self._audio_in = self._audio_in_ticks = self._audio_dropped = 0
        self._audio_out = self._audio_out_samples = 0

    def statistics(self) -> EncoderStatistics:
        return EncoderStatistics(
            self._frames_out,
            self._segments,
            self._bytes + (writer.written if (writer := self._writer) is not None else 0),
            self._audio_in,
            self._audio_in_ticks / 90000,
            self._audio_out,
            self._audio_out_samples / _AUDIO_RATE,
            self._audio_dropped,
        )

    # --- the encoder thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._video_encoder()  # open the encoder now: the first frame must not wait for it
            while True:
                try:
                    item = self._source.get_nowait()
                    if item is None:  # about to wait: what was muxed goes on first
                        self._sink.flush()
                        item = self._source.get()
                except Closed:
                    break
                self._handle(item)
            self._finish()
        except BaseException as exc:  # reported to the session, which ends with this error
            self._failed(exc)
        finally:
            self._source.close()  # nothing upstream may wait on this stage any more
            self._sink.close()

    def _handle(self, item: Item) -> None:
        if isinstance(item, VideoItem):
            self._encode_video(item)
        elif isinstance(item, AudioItem):
            self._receive_audio(item)
        elif isinstance(item, Boundary):
            self._input_segment_ended()
        elif isinstance(item, InputInfo):
            self._want_audio = item.has_audio

    def _failed(self, exc: BaseException) -> None:
        log.exception("encoder failed", exc_info=exc)
        self.error = exc
        self._close_segment()

    def _error(self, exc: Exception) -> None:
        self._consecutive_errors += 1
        self._on_error("encode", None)
        log.warning("encoding failed: %s", exc)
        if self._consecutive_errors >= _MAX_CONSECUTIVE_ERRORS:
            raise MediaError(f"{self._consecutive_errors} encoding failures in a row, last: {exc}") from exc

    def _open_segment(self, pts: int) -> av.container.OutputContainer:
        self._close_segment()
        self._segment += 1
        self._segment_frames = 0
        self._writer = _SegmentWriter(self._sink, self._segment)
        container = av.open(self._writer, mode="w", format="mpegts", options=_OUTPUT_OPTIONS)
        s = self.settings
        self._video_stream = container.add_mux_stream("h264", rate=s.fps, width=s.width, height=s.height)
        self._video_stream.time_base = TIME_BASE
        self._audio_stream = None
        if self._want_audio and not self._audio_off and self._audio is None:
            try:
                self._audio = open_audio_encoder(self.settings)
            except Exception as exc:  # no audio problem may end the session
                self._audio_failed(exc)
                self._audio_off = True
        if self._audio is not None and not self._audio_off:
            self._audio_stream = container.add_mux_stream("opus", rate=_AUDIO_RATE)
            self._audio_stream.time_base = TIME_BASE
        self._container = container
        self._segment_start = pts
        return container

    def _close_segment(self) -> None:
        container, self._container = self._container, None
        self._video_stream = self._audio_stream = None
        if container is None:
            return
        try:
            container.close()  # writes whatever the muxer still holds
        finally:
            if self._writer is not None:
                self._bytes += self._writer.written
                self._writer = None
            self._segments += 1
            self._sink.end(self._segment, self._segment_frames)

    def _video_encoder(self) -> av.VideoCodecContext:
        if self._video is None:
            name = (self._codecs or codecs_for(self.settings.codec)).encoder
            try:
                self._video = open_video_encoder(self.settings, name)
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                if name == SOFTWARE_ENCODER:
                    raise
                # e.g. the GPU's limit on concurrent NVENC sessions: this session encodes on the CPU
                log.warning(
                    "%s failed to open (%s); this stream is encoded with %s", name, exc, SOFTWARE_ENCODER
                )
                self._video = open_video_encoder(self.settings, SOFTWARE_ENCODER)
        return self._video

    def _encode_video(self, item: VideoItem) -> None:
        encoder = self._video if self._video is not None else self._video_encoder()
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
        self._sink.flush()  # the frame, and the audio muxed since the last one, leave together
        self._frames_out += 1
        self._segment_frames += 1
        self._on_frame(item)
        if new_segment:
            self._release_audio()

    # --- audio ------------------------------------------------------------------------------------

    def _receive_audio(self, item: AudioItem) -> None:
        if not self._want_audio or self._audio_off:
            return
        ticks = _audio_ticks(item.frame)
        self._audio_in += 1
        self._audio_in_ticks += ticks
        if self._audio_stream is None or self._container is None:
            self._pending_audio.append(item)  # until the next segment opens
            self._pending_ticks += ticks
            while self._pending_ticks > _MAX_PENDING_AUDIO_TICKS:
                self._pending_ticks -= _audio_ticks(self._pending_audio.popleft().frame)
                self._audio_dropped += 1
            return
        self._encode_audio(item)

    def _release_audio(self) -> None:
        """A segment opened: encode the audio that waited for it."""
        while self._pending_audio and self._audio_stream is not None and not self._audio_off:
            item = self._pending_audio.popleft()
            self._pending_ticks -= _audio_ticks(item.frame)
            self._encode_audio(item)
        self._pending_audio.clear()
        self._pending_ticks = 0

    def _encode_audio(self, item: AudioItem) -> None:
        frame = item.frame
        try:
            if not self._place(frame, item.in_time_base):
                self._audio_dropped += 1
                return
            for resampled in self._resample(frame):
                resampled.pts = None  # the sample clock times it
                self._fifo.write(resampled)
            self._encode_fifo(final=False)
        except Exception as exc:  # no audio problem may end the session
            self._audio_failed(exc)
            return
        self._audio_failures = 0

    def _place(self, frame: av.AudioFrame, in_time_base: bool) -> bool:
        """Fit the frame onto the sample clock; False when it is not to be sent."""
        pts = frame.pts
        start = None  # where it starts on the 48 kHz sample clock, if its timestamp says
        if pts is not None:
            if in_time_base:
                start = rescale(pts, _TIME_BASE_RATIO, _AUDIO_RATE)
            elif time_base := frame.time_base:
                start = rescale(pts, time_base.as_integer_ratio(), _AUDIO_RATE)
        if self._audio_next is None:  # the first audio to send
            first = self._first_pts * _AUDIO_RATE // 90000 if self._first_pts is not None else None
            if start is None:
                start = first
            elif first is not None and start + frame.samples * _AUDIO_RATE // frame.sample_rate <= first:
                return False  # older than the first video frame
            self._audio_next = start or 0
            return True
        if start is None:
            return True  # no timestamp: it follows the audio before it
        gap = start - (self._audio_next + self._fifo.samples)
        if _AUDIO_SLACK < gap <= _MAX_AUDIO_GAP:  # the input skipped some audio: so does the output
            if self._fifo.samples:
                self._pad_fifo()
                self._encode_fifo(final=False)
            self._audio_next = start
        return True

    def _pad_fifo(self) -> None:
        """Fill the FIFO's last partial Opus frame with silence."""
        assert self._audio is not None
        missing = -self._fifo.samples % self._audio.frame_size
        if missing:
            silence = av.AudioFrame(format="flt", layout="stereo", samples=missing)
            silence.sample_rate = _AUDIO_RATE
            for plane in silence.planes:
                plane.update(bytes(plane.buffer_size))
            self._fifo.write(silence)

    def _resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """``frame`` as 48 kHz stereo float; a new resampler when the input's format changes."""
        if frame is None:  # the end: what the resampler still holds (a pass-through one holds nothing)
            flushed = self._resampler.resample(None) if self._resampler is not None else []
            return [f for f in flushed if f is not None]
        flushed = []
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key == _PLANAR_STEREO:
            if self._resampler is not None:  # the input's format changed to this one
                flushed = self._resample(None)
                self._resampler = self._resampler_input = None
            return [*flushed, self._interleave(frame)]
        if self._resampler is None or key != self._resampler_input:
            flushed = self._resample(None)
            self._resampler = av.AudioResampler(format="flt", layout="stereo", rate=_AUDIO_RATE)
            self._resampler_input = key
        try:
            return [*flushed, *self._resampler.resample(frame)]
        except Exception:
            self._resampler = self._resampler_input = None  # the next frame gets a new one
            raise

    def _encode_fifo(self, *, final: bool) -> None:
        """Encode every whole Opus frame in the FIFO (and at the end, what is left)."""
        assert self._audio is not None
        assert self._audio_next is not None
        size = self._audio.frame_size
        while self._fifo.samples >= size or (final and self._fifo.samples):
            chunk = self._fifo.read(size, partial=final)
            assert chunk is not None
            # The FIFO's frames keep its first frame's time base: the resampler's 1/48000, the encoder's.
            chunk.pts = self._audio_next
            self._audio_next += chunk.samples
            self._mux_audio(self._audio.encode(chunk))
        if final:
            self._mux_audio(self._audio.encode(None))

    def _mux_audio(self, packets: list[av.Packet[Any]]) -> None:
        container, stream = self._container, self._audio_stream
        assert container is not None
        assert stream is not None
        for packet in packets:  # in the Opus encoder's time base, which the muxer rescales to the stream's
            pts = packet.pts
            if pts is None or (self._audio_last_pts is not None and pts <= self._audio_last_pts):
                continue  # cannot happen on the sample clock; the muxer would refuse it
            self._audio_out_samples += packet.duration or 0  # before muxing rescales it
            packet.stream = stream
            container.mux(packet)
            self._audio_last_pts = pts
            self._audio_out += 1

    def _audio_failed(self, exc: Exception) -> None:
        """Audio that failed is dropped as audio: counted, logged, and never the video's failure."""
        self._audio_failures += 1
        self._audio_dropped += 1
        self._on_error("audio_encode", f"audio encoding failed, the audio is dropped: {exc}")
        if self._audio_failures == 1:
            log.warning("audio encoding failed, the audio is dropped: %s", exc)
        else:
            log.debug("audio encoding failed again (%d in a row): %s", self._audio_failures, exc)

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
            if self._audio_stream is not None and self._audio_next is not None:
                try:
                    for resampled in self._resample(None):
                        resampled.pts = None
                        self._fifo.write(resampled)
                    self._encode_fifo(final=True)
                except Exception as exc:  # no audio problem may end the session
                    self._audio_failed(exc)
        self._close_segment()
