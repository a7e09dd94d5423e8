"""Live thumbnails of streams' output for the orchestrator's page (``page.py``).

A :class:`Thumbnailer` reads one stream's output channel from the segment being written
(``SEQ_CURRENT``), as another subscriber beside the gateway's reader, and keeps the latest processed
frame as a small JPEG. Each output segment is its own MPEG-TS container starting with a keyframe
(docs/protocol.md §6), so a segment can be decoded from the bytes received so far: every
``INTERVAL_S`` the bytes are demuxed (cheap) and only the packets not decoded yet go to a decoder
kept for the segment; the last packet is held back until more bytes arrive, as it may be cut short.
So every frame is decoded once, and a JPEG (``WIDTH`` pixels wide) is encoded only every
``INTERVAL_S``.

The cost is bounded by :class:`Thumbnails`: a thumbnailer runs only while its thumbnail is being asked
for, and stops ``IDLE_S`` after the last request.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable

import aiohttp
import av

from byoc.errors import TrickleError
from byoc.trickle.protocol import SEQ_CURRENT
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = [
    "IDLE_S",
    "INTERVAL_S",
    "KEPT_ENDED",
    "WIDTH",
    "SegmentDecoder",
    "Thumbnailer",
    "Thumbnails",
    "jpeg",
]

log = logging.getLogger(__name__)

WIDTH = 160
INTERVAL_S = 0.3
IDLE_S = 5.0
KEPT_ENDED = 20


def jpeg(frame: av.VideoFrame, width: int = WIDTH) -> bytes:
    """A JPEG of ``frame`` scaled to ``width`` pixels wide (even sizes, aspect kept)."""
    width = max(2, min(width, frame.width) // 2 * 2)
    height = max(2, round(frame.height * width / frame.width) // 2 * 2)
    encoder = av.CodecContext.create("mjpeg", "w")
    assert isinstance(encoder, av.VideoCodecContext)
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
    encoder.time_base = frame.time_base or encoder.time_base
    encoder.options = {"qmin": "2", "qmax": "8"}
    scaled = frame.reformat(width=width, height=height, format="yuvj420p")
    scaled.pts = None
    packets = encoder.encode(scaled) + encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets)


class SegmentDecoder:
    """Decodes one MPEG-TS segment while its bytes arrive; each frame is decoded once."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._fed = 0  # packets of this segment already given to the decoder
        self._decoder: av.VideoCodecContext | None = None
        self.latest: av.VideoFrame | None = None
        self.frames = 0

    def feed(self, chunk: bytes) -> None:
        self._data += chunk

    def decode(self, *, complete: bool = False) -> av.VideoFrame | None:
        """Decode what arrived since the last call; the newest frame decoded so far (or None)."""
        with (
            contextlib.suppress(av.error.FFmpegError, IndexError, ValueError),
            av.open(io.BytesIO(bytes(self._data)), mode="r", format="mpegts") as container,
        ):
            stream = container.streams.video[0]
            packets = [packet for packet in container.demux(stream) if packet.size]
            if self._decoder is None:
                created = av.CodecContext.create(stream.codec_context.name, "r")
                assert isinstance(created, av.VideoCodecContext)
                self._decoder = created
            ready = packets if complete else packets[:-1]
            for packet in ready[self._fed :]:
                for frame in self._decoder.decode(packet):
                    self.latest = frame
                    self.frames += 1
            self._fed = max(self._fed, len(ready))
            if complete:
                for frame in self._decoder.decode(None):
                    self.latest = frame
                    self.frames += 1
        return self.latest


class Thumbnailer:
    """The latest processed frame of one output channel as a JPEG, refreshed every ``interval_s``."""

    def __init__(
        self,
        url: str,
        http: aiohttp.ClientSession,
        *,
        interval_s: float = INTERVAL_S,
        width: int = WIDTH,
    ) -> None:
        self.url = url
        self._http = http
        self._interval_s = interval_s
        self._width = width
        self.image: bytes | None = None
        self.updated_at: float | None = None
        self.frames_decoded = 0
        self.asked_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"thumbnail {self.url}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        with contextlib.suppress(TrickleError):
            async with TrickleSubscriber(self.url, session=self._http, start_seq=SEQ_CURRENT) as subscriber:
                async for segment in subscriber:
                    decoder = SegmentDecoder()
                    due = time.monotonic()
                    async for chunk in segment.chunks():
                        decoder.feed(chunk)
                        if time.monotonic() >= due:
                            await self._refresh(decoder, complete=False)
                            due = time.monotonic() + self._interval_s
                    await self._refresh(decoder, complete=True)

    async def _refresh(self, decoder: SegmentDecoder, *, complete: bool) -> None:
        def work() -> bytes | None:
            before = decoder.frames
            frame = decoder.decode(complete=complete)
            self.frames_decoded += decoder.frames - before
            return jpeg(frame, self._width) if frame is not None and decoder.frames > before else None

        image = await asyncio.to_thread(work)
        if image:
            self.image, self.updated_at = image, time.time()


class Thumbnails:
    """One :class:`Thumbnailer` per stream, running only while its thumbnail is asked for."""

    def __init__(
        self,
        http: Callable[[], aiohttp.ClientSession],
        *,
        idle_s: float = IDLE_S,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self._http = http
        self._idle_s = idle_s
        self._interval_s = interval_s
        self._by_stream: dict[str, Thumbnailer] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def latest(self, stream_id: str, output_url: str) -> bytes | None:
        """The stream's latest thumbnail (None until one is decoded); starts its thumbnailer."""
        thumbnailer = self._by_stream.get(stream_id)
        if thumbnailer is None or thumbnailer.url != output_url or not thumbnailer.running:
            image = thumbnailer.image if thumbnailer is not None else None
            thumbnailer = Thumbnailer(output_url, self._http(), interval_s=self._interval_s)
            thumbnailer.image = image
            self._by_stream[stream_id] = thumbnailer
            thumbnailer.start()
        thumbnailer.asked_at = time.monotonic()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="thumbnail sweeper")
        return thumbnailer.image

    def describe(self) -> dict[str, dict[str, object]]:
        """Per stream: whether its thumbnailer runs, the frames it decoded, when its image changed."""
        return {
            stream_id: {"running": t.running, "frames_decoded": t.frames_decoded, "updated_at": t.updated_at}
            for stream_id, t in self._by_stream.items()
        }

    def last_image(self, stream_id: str) -> bytes | None:
        """The last thumbnail of a stream, without starting anything (an ended stream keeps its own
        until ``KEPT_ENDED`` other streams have ended after it)."""
        thumbnailer = self._by_stream.get(stream_id)
        return thumbnailer.image if thumbnailer is not None else None

    def forget(self, live: set[str]) -> None:
        """Stop the thumbnailers of streams that ended; drop the oldest beyond ``KEPT_ENDED``."""
        ended = [stream_id for stream_id in self._by_stream if stream_id not in live]
        for stream_id in ended:
            self._by_stream[stream_id].cancel()
        for stream_id in ended[: max(0, len(ended) - KEPT_ENDED)]:
            del self._by_stream[stream_id]

    async def _sweep(self) -> None:
        """Stop thumbnailers nobody asked for in ``idle_s``; ends when none runs."""
        while any(t.running for t in self._by_stream.values()):
            await asyncio.sleep(min(1.0, self._idle_s / 2))
            now = time.monotonic()
            for thumbnailer in self._by_stream.values():
                if thumbnailer.running and now - thumbnailer.asked_at > self._idle_s:
                    await thumbnailer.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*(t.close() for t in self._by_stream.values()))
        self._by_stream.clear()
