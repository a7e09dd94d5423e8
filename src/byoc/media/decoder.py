"""The decoder stage: every input segment of a session into ONE continuous MPEG-TS demuxer.

It runs on its own thread (PyAV releases the GIL while it decodes). The input is handed to it with
:meth:`Decoder.put` from a thread (a session's input reader) or :meth:`Decoder.feed` from an event
loop, either of which waits while ``max_buffered_bytes`` are waiting to be decoded (so the input is
read no faster than the pipeline takes it), or read by the decoder's own thread through the function
given to :meth:`Decoder.pull_from`; :meth:`Decoder.end_segment` marks the end of each trickle
segment and :meth:`Decoder.end` the end of the input. Decoded frames are fitted to the session's size
(scaled to cover, centre-cropped), optionally capped to a frame rate, given strictly increasing
timestamps, and put on the output queue together with the decoded audio and a :class:`Boundary` after
the last frame of every input segment. Each frame says when it is due in stream time
(:class:`StreamClock`); putting a frame waits while the queue is full of frames that are not late.
(Where the session has no processing stage, the output is the encoder's
:class:`~byoc.media.encoder.EncodeInPlace`: this thread encodes the frame itself.)

A corrupt or truncated segment costs the frames it damaged and an error count, never the session.

Video is decoded in software unless ``codec`` (byoc/media/codecs.py) names NVDEC for the input's codec
(``h264_cuvid``, ``hevc_cuvid``). NVDEC's frames (nv12) are converted to yuv420p, the format the
software decoders give, so processors and the encoder see one format. An NVDEC decoder that fails to
open or to decode makes the stream go on with the software decoder, with one warning.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import av
import av.filter
from av.codec.context import Flags
from av.video.reformatter import VideoReformatter

from byoc.errors import MediaError
from byoc.media.codecs import ChosenCodecs, codecs_for
from byoc.media.items import TIME_BASE, AudioItem, Boundary, InputInfo, Item, VideoItem, rescale
from byoc.media.queues import Closed, StreamClock
from byoc.media.stage import Stage
from byoc.media.ts import FLUSH_UNITS, StreamTypeWatch, first_video_pts, video_flush_packets
from byoc.threads import call_in_loop

__all__ = ["DEFAULT_BUFFERED_BYTES", "Decoder", "DecoderStatistics", "FrameFitter"]

log = logging.getLogger(__name__)

# Return from av.open() as soon as PAT/PMT and the first packets are in (about 23 KB), not after
# seconds of probing. (analyzeduration 0 would mean "the default"; nobuffer would drop the first IDR.)
_INPUT_OPTIONS = {"probesize": "32", "analyzeduration": "1", "fpsprobesize": "0"}
_MAX_DEMUX_ERRORS = 1000
_MAX_FORWARD_JUMP = 10 * 90000  # a larger jump is a discontinuity, not the next frame
_SEGMENT_END = object()
_HEAD_BYTES = 64 * 188  # enough of a segment's start to find its first video PES
_PTS_WRAP = 1 << 33  # MPEG-TS timestamps are 33-bit counts of a 90 kHz clock
DEFAULT_BUFFERED_BYTES = 2 * 1024 * 1024
"""Input bytes waiting to be decoded before :meth:`Decoder.feed` waits: a whole 1 s segment at 16 Mbit/s."""


@dataclass(frozen=True, slots=True)
class DecoderStatistics:
    bytes_in: int
    segments_in: int
    frames_decoded: int
    frames_capped: int
    """Dropped by the frame-rate cap."""
    frames_rejected: int
    """Dropped because their timestamp was missing or went backwards."""
    has_audio: bool
    frames_late: int = 0
    """Dropped because they arrived past the latency budget while the input was catching up."""


def _is_flush_leftover(packet: av.Packet[Any], unit: bytes) -> bool:
    size = packet.size
    return 0 < size <= 2 * len(unit) and size % len(unit) == 0 and bytes(packet) == unit * (size // len(unit))


def _unwrap(raw: int, near: int | None) -> int:
    """The timestamp closest to ``near`` whose low 33 bits are the 33-bit ``raw`` read from the bytes."""
    if near is None:
        return raw
    return raw + round((near - raw) / _PTS_WRAP) * _PTS_WRAP


def _without_leading(packet: av.Packet[Any], unit: bytes) -> av.Packet[Any]:
    """``packet`` without the copies of ``unit`` it starts with."""
    data = bytes(packet)
    start = 0
    while unit and data.startswith(unit, start):
        start += len(unit)
    if not start:
        return packet
    trimmed = av.Packet(data[start:])
    trimmed.pts, trimmed.dts, trimmed.time_base = packet.pts, packet.dts, packet.time_base
    return trimmed


class DecodedOutput(Protocol):
    """Where the decoder puts what it decoded: a :class:`StageQueue` (or an encoder's
    :class:`~byoc.media.encoder.EncodeInPlace`)."""

    def put(self, item: Item, *, droppable: bool = True, block: bool = True, wake: bool = True) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


def _put_boundary(output: DecodedOutput, segment: int) -> None:
    output.put(Boundary(segment), droppable=False)


class _ByteFeed:
    """The file-like object the demuxer reads: bytes put by another thread or the loop, blocking until
    they come, or pulled on the reading thread (:meth:`pull_from`) when none are waiting.

    At the end of a segment it returns the video flush packet, then — once the demuxer asks for more,
    which means everything before has been read and decoded — it reports the boundary. The loop waits
    (:meth:`room`) while more than ``max_bytes`` are waiting to be read.
    """

    def __init__(
        self,
        on_boundary: Callable[[int], None],
        max_bytes: int = DEFAULT_BUFFERED_BYTES,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self._chunks: deque[bytes | object] = deque()
        self._on_idle = on_idle  # before the reader waits for bytes: what it decoded so far goes on
        self._pull: Callable[[], None] | None = None  # see Decoder.pull_from
        # The reader takes the lock directly and is notified only when it waits: a Condition's own
        # ``with`` and notify are Python calls, several for every chunk of input.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._reader_waits = False
        self._max_bytes = max_bytes
        self._waiting_bytes = 0
        self._reader_gone = False
        self._room_waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._buffer = memoryview(b"")
        self._eof = False
        self._on_boundary = on_boundary
        self._pending_boundary: int | None = None
        self._segments_ended = 0
        self._head = bytearray()
        self._looking_for_pts = False
        self.video_pid: int | None = None
        self.video_codec = "h264"
        """The video codec's FFmpeg name: which flush packets (docs in byoc/media/ts.py) fit it."""
        self.stream_types = StreamTypeWatch()
        self._offset = 0  # of the next item in the bytes the demuxer reads
        self.resume_pts: int | None = None
        """The PTS of the first video PES after a flush (the demuxer loses it)."""

    def put(self, item: bytes | object) -> None:
        with self._lock:
            self._chunks.append(item)
            if isinstance(item, bytes):
                self._waiting_bytes += len(item)
            if self._reader_waits:
                self._cond.notify_all()

    def pull_from(self, pull: Callable[[], None] | None) -> None:
        with self._cond:
            self._pull = pull
            self._cond.notify_all()

    def wait_room(self) -> None:
        """:meth:`room` for a thread: return once at most ``max_bytes`` are waiting to be read."""
        with self._cond:
            self._cond.wait_for(self._has_room)

    def _has_room(self) -> bool:
        return self._waiting_bytes <= self._max_bytes or self._eof or self._reader_gone

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()
            self._wake_loop()

    def reader_gone(self) -> None:
        """The demuxer stopped reading (the decoder ended): nothing waits for room any more."""
        with self._cond:
            self._reader_gone = True
            self._cond.notify_all()
            self._wake_loop()

    async def room(self) -> None:
        """Return once at most ``max_bytes`` are waiting to be read (or nobody will read them)."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._has_room():
                    return
                ready = asyncio.Event()
                self._room_waiter = (loop, ready)
            await ready.wait()

    def _wake_loop(self) -> None:
        """Wake the loop waiting in :meth:`room` (with the lock held; a thread in :meth:`wait_room`
        waits on the condition, which the reader notifies when it takes bytes)."""
        if self._room_waiter is not None:
            loop, ready = self._room_waiter
            self._room_waiter = None
            call_in_loop(loop, ready.set)

    def read(self, size: int) -> bytes:
        if not self._buffer:
            if self._pending_boundary is not None:
                segment, self._pending_boundary = self._pending_boundary, None
                self._on_boundary(segment)
            item = self._next_item()
            if item is None:
                return b""
            self._buffer = memoryview(item)
        data = bytes(self._buffer[:size])
        self._buffer = self._buffer[size:]
        return data

    def _next_item(self) -> bytes | None:
        while True:
            if not self._chunks and not self._eof:
                self._on_idle()  # about to wait (a racy look: at worst a wake that finds nothing new)
                if (pull := self._pull) is not None:
                    pull()  # reads on this thread, until it hands the reading back
                    continue
            with self._lock:
                if not (self._chunks or self._eof or self._pull is not None):
                    self._reader_waits = True
                    self._cond.wait_for(lambda: self._chunks or self._eof or self._pull is not None)
                    self._reader_waits = False
                if not self._chunks:
                    if self._eof:
                        return None
                    continue  # told to pull
                item = self._chunks.popleft()
                if isinstance(item, bytes):
                    waited = self._waiting_bytes > self._max_bytes
                    self._waiting_bytes -= len(item)
                    if self._waiting_bytes <= self._max_bytes:
                        if self._room_waiter is not None:
                            self._wake_loop()
                        if waited:
                            self._cond.notify_all()
            if item is _SEGMENT_END:
                segment = self._segments_ended
                self._segments_ended += 1
                self._head.clear()
                self.stream_types.boundary(self._offset)
                if self.video_pid is not None:
                    self.video_codec = self.stream_types.latest(self.video_pid) or self.video_codec
                flushes = self.video_pid is not None and self.video_codec in FLUSH_UNITS
                self._looking_for_pts = flushes
                if not flushes:
                    self._on_boundary(segment)
                    continue
                self._pending_boundary = segment
                assert self.video_pid is not None
                flush = video_flush_packets(self.video_pid, self.video_codec)
                self._offset += len(flush)
                return flush
            assert isinstance(item, bytes)
            if self._looking_for_pts:
                self._scan_head(item)
            self.stream_types.scan(item, self._offset)
            self._offset += len(item)
            return item

    def _scan_head(self, data: bytes) -> None:
        self._head += data[: _HEAD_BYTES - len(self._head)]
        assert self.video_pid is not None
        pts = first_video_pts(bytes(self._head), self.video_pid)
        if pts is not None or len(self._head) >= _HEAD_BYTES:
            self.resume_pts = pts
            self._looking_for_pts = False


def _copy_timing(source: av.VideoFrame, target: av.VideoFrame) -> None:
    """``source``'s timestamp on ``target`` (a decoder context of our own may leave no time base)."""
    target.pts = source.pts
    if source.time_base is not None:
        target.time_base = source.time_base


class FrameFitter:
    """Scales a frame to cover ``width`` x ``height`` (keeping its aspect ratio) and centre-crops it."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._graph: av.filter.Graph | None = None
        self._source_key: tuple[int, int, str] | None = None
        self._reformatter: VideoReformatter | None = None

    def fit(self, frame: av.VideoFrame) -> av.VideoFrame:
        """``frame`` at the fitter's size, as yuv420p when it came as NVDEC's nv12."""
        if frame.width == self.width and frame.height == self.height:
            return self._planar(frame)
        key = (frame.width, frame.height, frame.format.name)
        if key != self._source_key:
            self._graph = self._build(frame)
            self._source_key = key
        assert self._graph is not None
        self._graph.push(frame)
        fitted = self._graph.pull()
        assert isinstance(fitted, av.VideoFrame)
        _copy_timing(frame, fitted)
        return self._planar(fitted)

    def _planar(self, frame: av.VideoFrame) -> av.VideoFrame:
        if frame.format.name != "nv12":
            return frame
        if self._reformatter is None:
            self._reformatter = VideoReformatter()
        planar = self._reformatter.reformat(frame, format="yuv420p", threads=1)
        _copy_timing(frame, planar)
        return planar

    def _build(self, frame: av.VideoFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        source = graph.add_buffer(
            width=frame.width, height=frame.height, format=frame.format, time_base=TIME_BASE
        )
        scale = graph.add("scale", f"{self.width}:{self.height}:force_original_aspect_ratio=increase")
        crop = graph.add("crop", f"{self.width}:{self.height}")
        sink = graph.add("buffersink")
        source.link_to(scale)
        scale.link_to(crop)
        crop.link_to(sink)
        graph.configure()
        return graph


class _Timestamps:
    """Strictly increasing video PTS: small steps back are rejected, big jumps are re-based."""

    def __init__(self) -> None:
        self.offset = 0
        """What is added to the input's timestamps (the audio's move with the video's)."""
        self._last: int | None = None
        self._step = 3000

    def output_pts(self, pts: int) -> int | None:
        out = pts + self.offset
        last = self._last
        if last is not None:
            if out <= last:
                if last - out < 90000:  # a late or repeated frame
                    return None
                self.offset += last + self._step - out  # the input restarted its clock
                out = last + self._step
            elif out - last > _MAX_FORWARD_JUMP:
                self.offset -= out - last - self._step
                out = last + self._step
            else:
                self._step = min(out - last, 90000)
        self._last = out
        return out


class Decoder(Stage):
    """Decodes one session's input on a thread; see the module docstring."""

    def __init__(
        self,
        output: DecodedOutput,
        *,
        width: int,
        height: int,
        max_fps: float | None = None,
        name: str = "decoder",
        nice: int = 0,
        on_error: Callable[[str, str | None], None] | None = None,
        on_frame: Callable[[], None] | None = None,
        max_buffered_bytes: int = DEFAULT_BUFFERED_BYTES,
        latency_budget_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        codec: str | ChosenCodecs = "cpu",
    ) -> None:
        super().__init__(name, nice=nice)
        self._codec = codec
        """``auto``, ``cpu`` or ``nvidia`` (resolved once per process when decoding starts), or the
        codecs already chosen."""
        self._codecs: ChosenCodecs | None = None
        self._input_codec = ""  # the FFmpeg name of the video codec being decoded
        self._hardware = False  # the video context is an NVDEC decoder
        self._hardware_failed = False  # NVDEC failed once: software for the rest of the stream
        self._output = output
        self._on_frame = on_frame or (lambda: None)
        self._fitter = FrameFitter(width, height)
        self.max_fps = max_fps
        self._on_error = on_error or (lambda kind, message: None)
        self._clock = clock
        # Boundaries go straight to the queue: a bound method would tie the feed back to the decoder,
        # a cycle that keeps the decoder's codec contexts until the cyclic collector runs.
        self._feed = _ByteFeed(functools.partial(_put_boundary, output), max_buffered_bytes, output.wake)
        self._stream_clock = StreamClock(clock=clock)
        self.latency_budget_s = latency_budget_s
        """A frame that arrives this long after it was due while the input is catching up (a backlog
        decoded at once) is dropped at once, counted late (None: never)."""
        self._late = 0
        self._timestamps = _Timestamps()
        self._last_kept_pts: int | None = None
        self._last_video_pts: int | None = None
        self._wrap_shift: int | None = None
        self._flush_unit = b""
        self._video_context: av.VideoCodecContext | None = None
        self._bytes_in = self._segments_in = 0
        self._decoded = self._capped = self._rejected = 0
        self._has_audio = False
        self._audio_errors = 0
        self._audio_time_base: tuple[int, int] | None = None  # the audio stream's, where not TIME_BASE
        self._audio_anchor: int | None = None  # the last audio PTS the input gave
        self._audio_samples = 0  # audio samples since that PTS

    # --- called by the input's reader (an event loop or a thread) ------------------------------

    async def feed(self, data: bytes) -> None:
        """Input bytes, in order. Waits while more than ``max_buffered_bytes`` are waiting to be
        decoded, until the decoder has taken enough of them (or has ended)."""
        self._take(data)
        await self._feed.room()

    def put(self, data: bytes, *, wait: bool = True) -> None:
        """:meth:`feed` from a thread: waits the same way, unless not ``wait`` (what a ``pull``
        function, which runs on the decoder's own thread, must pass)."""
        self._take(data)
        if wait:
            self._feed.wait_room()

    def pull_from(self, pull: Callable[[], None] | None) -> None:
        """From any thread: when no input is waiting, the decoder's thread calls ``pull()`` to get
        more instead of waiting for it to be put; ``pull`` puts bytes (``wait=False``), ends the
        segment or the input, or returns having done neither (after ``pull_from(None)``: the decoder
        then waits for input as before). Input already put is decoded first."""
        self._feed.pull_from(pull)

    def _take(self, data: bytes) -> None:
        if data:
            self._bytes_in += len(data)
            self._feed.put(bytes(data))

    def end_segment(self) -> None:
        """The current input segment is complete: release its last frames now."""
        self._segments_in += 1
        self._feed.put(_SEGMENT_END)

    def end(self) -> None:
        """No more input: decode what is left, then finish."""
        self._feed.close()

    def statistics(self) -> DecoderStatistics:
        return DecoderStatistics(
            self._bytes_in,
            self._segments_in,
            self._decoded,
            self._capped,
            self._rejected,
            self._has_audio,
            self._late,
        )

    # --- the decoder thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._decode_all()
        except Closed:
            pass  # the next stage stopped taking frames
        except BaseException as exc:  # reported to the session, which ends with this error
            log.exception("decoder failed")
            self.error = exc
            self._on_error("decode", str(exc))  # the final event's last_error names the cause
        finally:
            self._feed.reader_gone()
            self._output.close()

    def _decode_all(self) -> None:
        try:
            container = av.open(self._feed, mode="r", format="mpegts", options=_INPUT_OPTIONS)
        except av.error.FFmpegError as exc:
            if self._bytes_in == 0:
                return  # the input ended before it started
            raise MediaError(f"cannot read the input as MPEG-TS: {exc}") from exc
        with container:
            if not container.streams.video:
                raise MediaError("the input has no video stream")
            video = container.streams.video[0]
            video.codec_context.thread_count = 1  # one frame in, one frame out; no reorder delay
            self._feed.video_pid = video.id
            self._feed.video_codec = video.codec_context.name
            self._flush_unit = FLUSH_UNITS.get(video.codec_context.name, b"")
            self._codecs = self._codec if isinstance(self._codec, ChosenCodecs) else codecs_for(self._codec)
            self._input_codec = video.codec_context.name
            self._video_context = self._open_video_decoder(self._input_codec, video.codec_context)
            streams: list[av.stream.Stream] = [video]
            if container.streams.audio:
                audio = container.streams.audio[0]
                streams.append(audio)
                self._has_audio = True
                # Decoded audio frames carry their stream's time base (MPEG-TS's is TIME_BASE): read once
                # here, as PyAV builds a Fraction, in pure Python, every time a frame's is read.
                time_base = audio.time_base
                if time_base is not None and time_base != TIME_BASE:
                    self._audio_time_base = time_base.as_integer_ratio()
            self._output.put(InputInfo(has_audio=self._has_audio), droppable=False)
            demux_errors = 0
            while True:
                try:
                    for packet in container.demux(streams):
                        self._decode_packet(packet, video)
                    return
                except av.error.FFmpegError as exc:
                    demux_errors += 1
                    self._on_error("decode", None)
                    log.info("demuxer error %d, continuing: %s", demux_errors, exc)
                    if demux_errors > _MAX_DEMUX_ERRORS:
                        raise MediaError(f"too many demuxer errors, last: {exc}") from exc

    def _decode_packet(self, packet: av.Packet[Any], video: av.stream.Stream) -> None:
        is_video = packet.stream is video
        if is_video and self._flush_unit and _is_flush_leftover(packet, self._flush_unit):
            return  # flush delimiters with no frame after them (the end of the input)
        if self._wrap_shift != 0 and packet.pts is not None:
            self._restore_wrapped(packet)
        if not is_video:
            self._audio(packet)
            return
        resume = self._feed.resume_pts
        if resume is not None and packet.size:
            if packet.pts is None:
                packet.pts = packet.dts = _unwrap(resume, self._last_video_pts)
                self._feed.resume_pts = None
            elif packet.pts >= resume:  # this segment's frames kept their timestamps
                self._feed.resume_pts = None
        if packet.pts is not None:
            self._last_video_pts = packet.pts
        assert self._video_context is not None
        position = packet.pos
        codec = self._feed.stream_types.codec_at(position, video.id) if position is not None else None
        if codec is not None and codec != self._input_codec:
            packet = _without_leading(packet, self._flush_unit)  # the old codec's flush delimiters
            self._switch_codec(codec)
        for frame in self._decode_video(packet):
            if isinstance(frame, av.VideoFrame):
                self._video(frame)

    def _decode_video(self, packet: av.Packet[Any]) -> list[object]:
        """The frames ``packet`` completes; none when it is damaged (counted). A failing NVDEC decoder
        gives way to a software one, which decodes the packet again."""
        assert self._video_context is not None
        try:
            return [*self._video_context.decode(packet)]
        except av.error.FFmpegError as exc:
            if not self._hardware:
                self._on_error("decode", None)
                log.debug("damaged video packet: %s", exc)
                return []
            self._hardware_failure(self._video_context.name, exc)
        self._video_context = self._open_video_decoder(self._input_codec, None)
        return self._decode_video(packet)

    def _audio(self, packet: av.Packet[Any]) -> None:
        """Audio that cannot be decoded is dropped as audio (an ``audio_decode`` error); the video goes
        on. Audio timestamps move with the video's when the decoder re-bases those."""
        try:
            frames: list[object] = [*packet.decode()]
        except Exception as exc:  # no audio problem may end the session
            self._audio_errors += 1
            self._on_error("audio_decode", f"audio could not be decoded, it is dropped: {exc}")
            if self._audio_errors == 1:
                log.warning("audio could not be decoded, it is dropped: %s", exc)
            else:
                log.debug("audio could not be decoded (%d times): %s", self._audio_errors, exc)
            return
        offset = self._timestamps.offset
        for frame in frames:
            if isinstance(frame, av.AudioFrame):
                self._time_audio(frame)
                if offset and frame.pts is not None:
                    frame.pts += offset
                # Audio rides with the next video frame, or goes once the input runs dry: one wake-up
                # of the next stage per frame rather than one per audio frame as well.
                self._output.put(AudioItem(frame, in_time_base=True), droppable=False, wake=False)

    def _time_audio(self, frame: av.AudioFrame) -> None:
        """Give every audio frame a PTS (1/90000). One PES carries one PTS for several audio frames,
        and the demuxer (probing almost nothing) leaves the later ones without: they follow the last
        frame that had one, sample by sample."""
        pts, time_base = frame.pts, self._audio_time_base
        if pts is not None:
            if time_base is not None:
                pts = frame.pts = rescale(pts, time_base, 90000)
                frame.time_base = TIME_BASE
            self._audio_anchor, self._audio_samples = pts, 0
        elif self._audio_anchor is not None and frame.sample_rate:
            frame.pts = self._audio_anchor + self._audio_samples * 90000 // frame.sample_rate
            if time_base is not None:
                frame.time_base = TIME_BASE
        self._audio_samples += frame.samples

    def _switch_codec(self, codec: str) -> None:
        """The PMT names another video codec from here on (an encoder restarted with it): decode with
        a new decoder for it, after taking the frames the old one still holds."""
        old = self._video_context
        assert old is not None
        log.info("the input's video codec changed from %s to %s", self._input_codec, codec)
        try:
            held = old.decode(None)
        except av.error.FFmpegError:
            held = []
        for frame in held:
            if isinstance(frame, av.VideoFrame):
                self._video(frame)
        self._input_codec = codec
        self._video_context = self._open_video_decoder(codec, None)
        self._flush_unit = FLUSH_UNITS.get(codec, b"")

    def _open_video_decoder(self, codec: str, software: av.VideoCodecContext | None) -> av.VideoCodecContext:
        """A decoder for input ``codec``: NVDEC where it was chosen and has not failed on this stream,
        else ``software`` (the demuxer's own context) or a new software one."""
        assert self._codecs is not None
        name = self._codecs.decoder_for(codec)
        self._hardware = False
        if name != codec and not self._hardware_failed:
            try:
                hardware = av.CodecContext.create(name, "r")
                assert isinstance(hardware, av.VideoCodecContext)
                hardware.flags |= int(Flags.low_delay)  # no display delay: a frame out per frame in
                hardware.open()
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                self._hardware_failure(name, exc)
            else:
                self._hardware = True
                return hardware
        if software is not None:
            return software
        context = av.CodecContext.create(codec, "r")
        assert isinstance(context, av.VideoCodecContext)
        context.thread_count = 1
        return context

    def _hardware_failure(self, name: str, exc: Exception) -> None:
        """NVDEC failed: this stream goes on in software (one warning per stream)."""
        if not self._hardware_failed:
            log.warning("%s failed (%s); this stream is decoded in software", name, exc)
        self._hardware_failed = True
        self._hardware = False

    def _restore_wrapped(self, packet: av.Packet[Any]) -> None:
        """Undo FFmpeg's wrap correction: MPEG-TS timestamps are 33-bit counts, never negative, but
        the demuxer makes those of a stream that starts shortly before the count wraps negative
        (so they run on across the wrap). Every timestamp, audio and video alike, moves by one wrap:
        the input's own values, then ever larger ones past the wrap."""
        assert packet.pts is not None
        if self._wrap_shift is None:
            self._wrap_shift = _PTS_WRAP if packet.pts < 0 else 0
        if self._wrap_shift:
            packet.pts += self._wrap_shift
            if packet.dts is not None:
                packet.dts += self._wrap_shift

    def _video(self, frame: av.VideoFrame) -> None:
        if frame.pts is None:
            self._rejected += 1
            return
        pts = self._timestamps.output_pts(int(frame.pts))
        if pts is None:
            self._rejected += 1
            return
        if (
            self.max_fps
            and self._last_kept_pts is not None
            and pts - self._last_kept_pts < 0.9 * 90000 / self.max_fps
        ):
            self._capped += 1
            return
        self._last_kept_pts = pts
        index = self._decoded
        self._decoded += 1
        due = self._stream_clock.arrived(pts)
        budget = self.latency_budget_s
        if budget is not None and self._stream_clock.catching_up and self._clock() > due + budget:
            self._late += 1  # stale input with newer frames right behind it: skip it now
            self._on_frame()
            return
        fitted = self._fitter.fit(frame)
        fitted.pts, fitted.time_base = pts, TIME_BASE
        self._output.put(VideoItem(fitted, index, self._clock(), due))
        self._on_frame()
