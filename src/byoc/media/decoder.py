"""The decoder stage: every input segment of a session into ONE continuous MPEG-TS demuxer.

It runs on its own thread (PyAV releases the GIL while it decodes). The event loop hands it bytes
with :meth:`Decoder.feed` (never blocking), marks the end of each trickle segment with
:meth:`Decoder.end_segment` and the end of the input with :meth:`Decoder.end`. Decoded frames are
fitted to the session's size (scaled to cover, centre-cropped), optionally capped to a frame rate,
given strictly increasing timestamps, and put on the output :class:`StageQueue` together with the
decoded audio and a :class:`Boundary` after the last frame of every input segment.

A corrupt or truncated segment costs the frames it damaged and an error count, never the session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import av.filter

from byoc.errors import MediaError
from byoc.media.items import TIME_BASE, AudioItem, Boundary, InputInfo, Item, VideoItem
from byoc.media.queues import Closed, StageQueue
from byoc.media.stage import Stage
from byoc.media.ts import FLUSH_ACCESS_UNIT, first_video_pts, video_flush_packets

__all__ = ["Decoder", "DecoderStatistics", "FrameFitter"]

log = logging.getLogger(__name__)

# Return from av.open() as soon as PAT/PMT and the first packets are in (about 23 KB), not after
# seconds of probing. (analyzeduration 0 would mean "the default"; nobuffer would drop the first IDR.)
_INPUT_OPTIONS = {"probesize": "32", "analyzeduration": "1", "fpsprobesize": "0"}
_MAX_DEMUX_ERRORS = 1000
_MAX_FORWARD_JUMP = 10 * 90000  # a larger jump is a discontinuity, not the next frame
_SEGMENT_END = object()
_HEAD_BYTES = 64 * 188  # enough of a segment's start to find its first video PES


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


def _is_flush_leftover(packet: av.Packet[Any]) -> bool:
    size = packet.size
    unit = len(FLUSH_ACCESS_UNIT)
    return 0 < size <= 2 * unit and size % unit == 0 and bytes(packet) == FLUSH_ACCESS_UNIT * (size // unit)


class _ByteFeed:
    """The file-like object the demuxer reads: bytes fed by the loop, blocking until they come.

    At the end of a segment it returns the video flush packet, then — once the demuxer asks for more,
    which means everything before has been read and decoded — it reports the boundary.
    """

    def __init__(self, on_boundary: Callable[[int], None]) -> None:
        self._chunks: deque[bytes | object] = deque()
        self._cond = threading.Condition()
        self._buffer = memoryview(b"")
        self._eof = False
        self._on_boundary = on_boundary
        self._pending_boundary: int | None = None
        self._segments_ended = 0
        self._head = bytearray()
        self._looking_for_pts = False
        self.video_pid: int | None = None
        self.resume_pts: int | None = None
        """The PTS of the first video PES after a flush (the demuxer loses it)."""

    def put(self, item: bytes | object) -> None:
        with self._cond:
            self._chunks.append(item)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

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
            with self._cond:
                self._cond.wait_for(lambda: self._chunks or self._eof)
                if not self._chunks:
                    return None
                item = self._chunks.popleft()
            if item is _SEGMENT_END:
                segment = self._segments_ended
                self._segments_ended += 1
                self._head.clear()
                self._looking_for_pts = self.video_pid is not None
                if self.video_pid is None:
                    self._on_boundary(segment)
                    continue
                self._pending_boundary = segment
                return video_flush_packets(self.video_pid)
            assert isinstance(item, bytes)
            if self._looking_for_pts:
                self._scan_head(item)
            return item

    def _scan_head(self, data: bytes) -> None:
        self._head += data[: _HEAD_BYTES - len(self._head)]
        assert self.video_pid is not None
        pts = first_video_pts(bytes(self._head), self.video_pid)
        if pts is not None or len(self._head) >= _HEAD_BYTES:
            self.resume_pts = pts
            self._looking_for_pts = False


class FrameFitter:
    """Scales a frame to cover ``width`` x ``height`` (keeping its aspect ratio) and centre-crops it."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._graph: av.filter.Graph | None = None
        self._source_key: tuple[int, int, str] | None = None

    def fit(self, frame: av.VideoFrame) -> av.VideoFrame:
        if frame.width == self.width and frame.height == self.height:
            return frame
        key = (frame.width, frame.height, frame.format.name)
        if key != self._source_key:
            self._graph = self._build(frame)
            self._source_key = key
        assert self._graph is not None
        self._graph.push(frame)
        fitted = self._graph.pull()
        assert isinstance(fitted, av.VideoFrame)
        fitted.pts, fitted.time_base = frame.pts, frame.time_base
        return fitted

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
        self._offset = 0
        self._last: int | None = None
        self._step = 3000

    def output_pts(self, pts: int) -> int | None:
        out = pts + self._offset
        last = self._last
        if last is not None:
            if out <= last:
                if last - out < 90000:  # a late or repeated frame
                    return None
                self._offset += last + self._step - out  # the input restarted its clock
                out = last + self._step
            elif out - last > _MAX_FORWARD_JUMP:
                self._offset -= out - last - self._step
                out = last + self._step
            else:
                self._step = min(out - last, 90000)
        self._last = out
        return out


class Decoder(Stage):
    """Decodes one session's input on a thread; see the module docstring."""

    def __init__(
        self,
        output: StageQueue[Item],
        *,
        width: int,
        height: int,
        max_fps: float | None = None,
        name: str = "decoder",
        nice: int = 0,
        on_error: Callable[[str], None] | None = None,
        on_frame: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, nice=nice)
        self._output = output
        self._on_frame = on_frame or (lambda: None)
        self._fitter = FrameFitter(width, height)
        self.max_fps = max_fps
        self._on_error = on_error or (lambda kind: None)
        self._clock = clock
        self._feed = _ByteFeed(self._boundary)
        self._timestamps = _Timestamps()
        self._last_kept_pts: int | None = None
        self._bytes_in = self._segments_in = 0
        self._decoded = self._capped = self._rejected = 0
        self._has_audio = False

    # --- called from the event loop -------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Input bytes, in order. Never blocks."""
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
        )

    # --- the decoder thread ---------------------------------------------------------------------

    def _boundary(self, segment: int) -> None:
        self._output.put(Boundary(segment), droppable=False)

    def _run(self) -> None:
        try:
            self._decode_all()
        except Closed:
            pass  # the next stage stopped taking frames
        except BaseException as exc:  # reported to the session, which ends with this error
            log.exception("decoder failed")
            self.error = exc
        finally:
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
            streams: list[av.stream.Stream] = [video]
            if container.streams.audio:
                streams.append(container.streams.audio[0])
                self._has_audio = True
            self._output.put(InputInfo(has_audio=self._has_audio), droppable=False)
            demux_errors = 0
            while True:
                try:
                    for packet in container.demux(streams):
                        self._decode_packet(packet, video)
                    return
                except av.error.FFmpegError as exc:
                    demux_errors += 1
                    self._on_error("decode")
                    log.info("demuxer error %d, continuing: %s", demux_errors, exc)
                    if demux_errors > _MAX_DEMUX_ERRORS:
                        raise MediaError(f"too many demuxer errors, last: {exc}") from exc

    def _decode_packet(self, packet: av.Packet[Any], video: av.stream.Stream) -> None:
        if packet.stream is video and _is_flush_leftover(packet):
            return  # flush delimiters with no frame after them (the end of the input)
        resume = self._feed.resume_pts
        if resume is not None and packet.stream is video and packet.size:
            if packet.pts is None:
                packet.pts = packet.dts = resume
                self._feed.resume_pts = None
            elif packet.pts >= resume:  # this segment's frames kept their timestamps
                self._feed.resume_pts = None
        try:
            frames: list[object] = [*packet.decode()]
        except av.error.FFmpegError as exc:
            self._on_error("decode")
            log.debug("damaged %s packet: %s", packet.stream.type, exc)
            return
        for frame in frames:
            if isinstance(frame, av.VideoFrame):
                self._video(frame)
            elif isinstance(frame, av.AudioFrame):
                self._output.put(AudioItem(frame), droppable=False)

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
        fitted = self._fitter.fit(frame)
        fitted.pts, fitted.time_base = pts, TIME_BASE
        index = self._decoded
        self._decoded += 1
        self._output.put(VideoItem(fitted, index, self._clock()))
        self._on_frame()
