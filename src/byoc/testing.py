"""Run a processor through a real byoc session, for a processor's own tests.

::

    from byoc.testing import run_processor

    def test_my_processor_keeps_every_frame() -> None:
        run = run_processor(MyProcessor(), params={"strength": 0.5}, seconds=2.0)
        assert run.errors == {}
        assert run.frames_out == run.frames_in == run.frames_sent

:func:`run_processor` (or :func:`run_processor_async` inside an event loop) does what a container does
with one stream, on loopback: a trickle server of byoc's own (``byoc.dev.trickle_server``) hosts the
stream's channels, the synthetic source (``byoc.dev.synthetic``) publishes a moving test pattern as
live H.264 MPEG-TS segments (with AAC audio when asked), and a :class:`byoc.session.Session` decodes,
calls the processor's hooks, encodes and publishes the result, exactly as under ``byoc serve``. The
output channel is read back and decoded. Everything is generated with PyAV: no ffmpeg, no network, no
container. The result is a :class:`ProcessorRun`: what went in, what came out, what was dropped and why,
the errors by kind and the session's end reason.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av

from byoc.dev.synthetic import SyntheticStream, publish_live
from byoc.dev.trickle_server import serve_trickle
from byoc.errors import ChannelGone, ProcessorError
from byoc.processor import Processor, load_processor
from byoc.session import Session
from byoc.spec import SessionSettings, StreamSpec
from byoc.threads import run_in_thread
from byoc.trickle.client import create_client_session
from byoc.trickle.layout import StreamChannels
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = ["ProcessorRun", "run_processor", "run_processor_async"]

log = logging.getLogger(__name__)

_STREAM_ID = "byoc-testing"
_READ_BACK_S = 10.0
"""How long the output may take to be read to its end once the session has ended."""


@dataclass(frozen=True, slots=True)
class ProcessorRun:
    """What one run of a processor through a session did (see :func:`run_processor`)."""

    frames_sent: int
    """Video frames the synthetic source published."""
    frames_in: int
    """Video frames the session decoded (and handed to the processor, unless dropped before)."""
    frames_out: int
    """Video frames the session encoded and published."""
    frames_received: int
    """Video frames decoded back from the output channel."""
    frames_dropped: int
    """Video frames that did not come out, all reasons together (``dropped`` has them by reason)."""
    dropped: Mapping[str, int] = field(default_factory=dict)
    """Dropped frames by reason: ``processor`` (``process`` returned None or raised), ``late``, ..."""
    errors: Mapping[str, int] = field(default_factory=dict)
    """Errors by kind, e.g. ``process`` for each frame on which ``process`` raised; empty when none."""
    last_error: str | None = None
    end_reason: str = ""
    """Why the session ended: ``input_ended`` when it ran to the end of the input."""
    latency_ms_p50: float | None = None
    """Frame latency inside the session, decoded to encoded (ms), median; None without frames."""
    latency_ms_p99: float | None = None
    audio_seconds_out: float = 0.0
    """Seconds of audio the session published (0 without audio)."""
    output_size: tuple[int, int] | None = None
    """(width, height) of the frames received; None when none came out."""

    @property
    def ok(self) -> bool:
        """True when the session ran to the end of its input, every decoded frame came out and nothing
        failed."""
        return (
            self.end_reason == "input_ended"
            and not self.errors
            and self.frames_in > 0
            and self.frames_out == self.frames_in
        )

    def summary(self) -> str:
        """One line with the figures, for a test's failure message or a log."""
        latency = (
            "-" if self.latency_ms_p50 is None else f"{self.latency_ms_p50:.1f}/{self.latency_ms_p99:.1f}"
        )
        errors = ", ".join(f"{kind} {count}" for kind, count in sorted(self.errors.items())) or "none"
        dropped = ", ".join(f"{why} {n}" for why, n in sorted(self.dropped.items()) if n) or "none"
        line = (
            f"end {self.end_reason}; frames sent {self.frames_sent}, in {self.frames_in}, "
            f"out {self.frames_out}, received {self.frames_received}; dropped {dropped}; errors {errors}; "
            f"latency p50/p99 {latency} ms; audio out {self.audio_seconds_out:.2f} s"
        )
        return line if self.last_error is None else f"{line}; last error: {self.last_error}"


def run_processor(
    processor: Processor | str,
    *,
    params: Mapping[str, Any] | None = None,
    seconds: float = 2.0,
    size: tuple[int, int] = (256, 256),
    fps: int = 30,
    audio: bool = False,
    realtime: bool = True,
    setup: bool = True,
    settings: SessionSettings | None = None,
    timeout_s: float = 60.0,
) -> ProcessorRun:
    """Run ``processor`` through one session on generated media and report what happened.

    ``processor`` is an instance or a reference as ``byoc serve`` takes it (``"invert"``,
    ``"package.module:Class"``). ``params`` are the stream's start parameters (``session.params`` in
    ``on_start``). The source is ``seconds`` of a ``size`` (width, height) test pattern at ``fps``, in
    one-second segments, with AAC audio when ``audio``; ``size`` is also the size the session asks of its
    output. With ``realtime`` (the default) each frame is published when it is due, as a live source
    does; without, as fast as the session takes it. With ``setup`` the processor's ``setup()`` runs
    before and ``teardown()`` after, as in a container. ``settings`` replaces the session's defaults.
    A session that has not ended ``timeout_s`` after the start is stopped (its end reason tells).

    For plain (synchronous) tests; inside a running event loop use :func:`run_processor_async`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_processor() cannot run inside an event loop: await run_processor_async()")
    return asyncio.run(
        run_processor_async(
            processor,
            params=params,
            seconds=seconds,
            size=size,
            fps=fps,
            audio=audio,
            realtime=realtime,
            setup=setup,
            settings=settings,
            timeout_s=timeout_s,
        )
    )


async def run_processor_async(
    processor: Processor | str,
    *,
    params: Mapping[str, Any] | None = None,
    seconds: float = 2.0,
    size: tuple[int, int] = (256, 256),
    fps: int = 30,
    audio: bool = False,
    realtime: bool = True,
    setup: bool = True,
    settings: SessionSettings | None = None,
    timeout_s: float = 60.0,
) -> ProcessorRun:
    """:func:`run_processor` for code that already runs an event loop (an ``async def`` test)."""
    width, height = size
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"size must be two positive even numbers, got {width}x{height}")
    if fps <= 0 or seconds <= 0:
        raise ValueError(f"seconds and fps must be positive, got {seconds} s at {fps} fps")
    if isinstance(processor, str):
        processor = load_processor(processor)
    frames = max(1, round(seconds * fps))
    segments = await asyncio.to_thread(_generate, frames, width, height, fps, audio)
    if setup:
        await run_in_thread(processor.setup, "processor-setup")
    try:
        return await _run(
            processor, segments, frames, dict(params or {}), size, fps, realtime, settings, timeout_s
        )
    finally:
        if setup:
            await run_in_thread(processor.teardown, "processor-teardown")


def _generate(frames: int, width: int, height: int, fps: int, audio: bool) -> list[list[bytes]]:
    """The synthetic source's segments: one second each (the last one may be shorter)."""
    source = SyntheticStream(width=width, height=height, fps=fps, audio="aac" if audio else None)
    segments: list[list[bytes]] = []
    left = frames
    while left > 0:
        source.segment_frames = min(fps, left)
        segments.append(source.segment())
        left -= source.segment_frames
    return segments


async def _run(
    processor: Processor,
    segments: list[list[bytes]],
    frames_sent: int,
    params: dict[str, Any],
    size: tuple[int, int],
    fps: int,
    realtime: bool,
    settings: SessionSettings | None,
    timeout_s: float,
) -> ProcessorRun:
    settings = settings or SessionSettings()
    channels = StreamChannels(_STREAM_ID)
    async with serve_trickle() as trickle, create_client_session(settings.trickle) as http:
        for role, name in channels.names().items():
            trickle.server.create_channel(name, channels.mime_type(role))
        url = functools.partial(channels.url, trickle.base_url)
        spec = StreamSpec(
            stream_id=_STREAM_ID,
            control_url=url("control"),
            events_url=url("events"),
            subscribe_url=url("input"),
            publish_url=url("output"),
            params=params,
            width=size[0],
            height=size[1],
        )
        session = Session(spec, processor, http, settings)
        run = asyncio.create_task(session.run(), name="byoc-testing:session")
        output = bytearray()
        reader = asyncio.create_task(_read(url("output"), http, output), name="byoc-testing:output")
        publisher = TricklePublisher(url("input"), session=http)
        try:
            try:
                await session.wait_started()
            except ProcessorError as exc:
                log.info("the session did not start: %s", exc)
            publish = asyncio.create_task(
                publish_live(publisher, segments, fps=fps, realtime=realtime), name="byoc-testing:input"
            )
            await asyncio.wait((publish, run), return_when=asyncio.FIRST_COMPLETED)
            if not publish.done():  # the session ended before its input did
                publish.cancel()
            await asyncio.gather(publish, return_exceptions=True)
            await publisher.close()  # the end of the input: the session drains and ends
            done, _ = await asyncio.wait((run,), timeout=timeout_s)
            if not done:
                log.warning("the session has not ended within %.0f s; stopping it", timeout_s)
                session.stop()
            reason = await run
            await asyncio.wait((reader,), timeout=_READ_BACK_S)
        finally:
            for task in (run, reader):
                task.cancel()
            await asyncio.gather(run, reader, return_exceptions=True)
            await publisher.close()
    stats = session.statistics()
    received, output_size = await asyncio.to_thread(_decode_video, bytes(output))
    return ProcessorRun(
        frames_sent=frames_sent,
        frames_in=stats.frames_in,
        frames_out=stats.frames_out,
        frames_received=received,
        frames_dropped=stats.frames_dropped,
        dropped={why: n for why, n in stats.dropped.items() if n},
        errors=dict(stats.errors),
        last_error=stats.last_error,
        end_reason=str(reason),
        latency_ms_p50=stats.latency_ms.get("p50"),
        latency_ms_p99=stats.latency_ms.get("p99"),
        audio_seconds_out=stats.audio.seconds_out,
        output_size=output_size,
    )


async def _read(url: str, http: aiohttp.ClientSession, into: bytearray) -> None:
    """Read a channel from its first segment to its end (the session DELETEs it when it ends)."""
    async with TrickleSubscriber(url, session=http, start_seq=0) as subscriber:
        try:
            async for segment in subscriber:
                into += await segment.read()
        except ChannelGone:
            pass  # deleted before the next segment was asked for: nothing more was published


def _decode_video(data: bytes) -> tuple[int, tuple[int, int] | None]:
    """How many video frames MPEG-TS ``data`` holds, and their size (of the last one)."""
    if not data:
        return 0, None
    count, size = 0, None
    try:
        with av.open(io.BytesIO(data), mode="r", format="mpegts") as container:
            if not container.streams.video:
                return 0, None
            for frame in container.decode(video=0):
                count += 1
                size = (frame.width, frame.height)
    except av.FFmpegError as exc:  # a cut-off tail: what decoded before it counts
        log.warning("the output stopped decoding after %d frames: %s", count, exc)
    return count, size
