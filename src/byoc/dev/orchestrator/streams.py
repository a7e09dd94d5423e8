"""One stream as the local orchestrator runs it: channels, the container's start/params/stop, and
(with the synthetic source) the gateway's side — input, keep-alives, and readers of what comes back.

What the container receives is what go-livepeer's orchestrator sends (docs/protocol.md §2.3 to §2.5): the
start body with ``gateway_request_id``, the channel URLs and ``params``, ``X-Stream-Id``, and
``Authorization: Bearer`` when the capability registered a token; the raw update body to
``/stream/params``; a plain-text body without Content-Type to ``/stream/stop``. As go-livepeer does, it
closes every channel of the stream as soon as the container has answered the stop, and the gateway's
readers start at the next segment to be written (seq -1).

A container that dies (killed, crashed) cannot end its streams itself: every stream probes its
container's ``/health``, and when it does not answer ``CONTAINER_PROBE_FAILURES`` times in a row the
stream ends as ``container gone``, freeing its capacity. Any answer, 503 included, means it is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from byoc.dev.orchestrator.registry import Capability
from byoc.dev.synthetic import LoopingSource, publish_live
from byoc.dev.trickle_server import TrickleServer
from byoc.errors import ChannelGone, TrickleError
from byoc.media.ts import count_pes_starts, first_video_pts
from byoc.session.stats import percentile
from byoc.trickle.channels import KEEPALIVE
from byoc.trickle.layout import StreamChannels
from byoc.trickle.protocol import SEQ_NEXT
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = [
    "CONTAINER_PROBE_FAILURES",
    "CONTAINER_PROBE_INTERVAL_S",
    "EVENTS_KEPT",
    "KEEPALIVE_INTERVAL_S",
    "LocalStream",
    "StreamRequest",
    "StreamState",
]

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL_S = 10.0
CONTAINER_PROBE_INTERVAL_S = 1.0
CONTAINER_PROBE_FAILURES = 3
EVENTS_KEPT = 50
_VIDEO_PID = 0x100
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_DRAIN_TIMEOUT_S = 2.0  # how long the readers get to see the container close its channels
_GATEWAY_START_SEQ = SEQ_NEXT
"""Where the gateway's readers of output, events and data start: the next segment to be written, so
what was published before they subscribed is missed (docs/protocol.md §2.1)."""


class StreamState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


@dataclass(frozen=True)
class StreamRequest:
    model_id: str
    stream_id: str
    params: dict[str, Any] | None = None
    source: str = "synthetic"
    duration_s: float | None = None
    data: bool = False
    audio: bool = False


@dataclass
class _Figures:
    frames_out: int = 0
    output_segments: int = 0
    input_segments: int = 0
    last_status: dict[str, Any] | None = None
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=120))
    data_messages: int = 0
    final_event: bool = False
    last_segment_complete: bool = False
    output_closed: bool = False


def _frames_published(final_event: dict[str, Any]) -> int | None:
    """The video frames the container says reached its output channel, from its final event: frames
    out minus the frames of lost segments (docs/protocol.md §5.2); None if the event lacks them."""
    try:
        output = final_event["statistics"]["output"]
        return int(output["frames"]) - sum(int(frames) for frames in output["lost"]["frames"].values())
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class LocalStream:
    """A stream between the local orchestrator and one container."""

    def __init__(
        self,
        request: StreamRequest,
        capability: Capability,
        trickle: TrickleServer,
        trickle_url: str,
        http: aiohttp.ClientSession,
    ) -> None:
        self.request = request
        self.stream_id = request.stream_id
        self.capability = capability
        self._trickle = trickle
        self._http = http
        self.channels = StreamChannels(self.stream_id, data=request.data)
        self._trickle_url = trickle_url
        self.urls = self.channels.urls(trickle_url)
        self.state = StreamState.STARTING
        self.end_reason: str | None = None
        self.started_at = time.time()
        self._figures = _Figures()
        self._segment_ends: deque[tuple[float, int]] = deque(maxlen=6)  # (when, frames) of output segments
        self._input_ends: dict[int, float] = {}
        self._stopping = asyncio.Event()
        self._ended = asyncio.Event()
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        """The latest events the container sent on the events channel, each with ``received_at``."""

    # --- talking to the container ---------------------------------------------------------------

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"X-Stream-Id": self.stream_id, **extra}
        if self.capability.token:
            headers["Authorization"] = f"Bearer {self.capability.token}"
        return headers

    def start_body(self) -> dict[str, Any]:
        """The body go-livepeer's orchestrator posts to ``{url}/stream/start``."""
        return self.channels.start_body(self._trickle_url, self.request.params)

    def gateway_urls(self) -> dict[str, str]:
        """The channel URLs as the gateway uses them (it publishes the input, subscribes to the output)."""
        return self.channels.gateway_urls(self._trickle_url)

    async def start(self) -> tuple[int, bytes]:
        """Create the channels and ask the container to start; on failure everything is undone."""
        for role, name in self.channels.names().items():
            self._trickle.create_channel(name, self.channels.mime_type(role))
        status, body = 0, b""
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                async with self._http.post(
                    f"{self.capability.url}/stream/start",
                    data=json.dumps(self.start_body()).encode(),
                    headers=self._headers(**{"Content-Type": "application/json"}),
                ) as response:
                    status, body = response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            status, body = 500, f"Error sending request to worker: {exc}".encode()
        if status >= 400:  # go-livepeer treats anything below 400 as started
            self._close_channels()
        return status, body

    async def update(self, body: bytes) -> tuple[int, bytes]:
        async with self._http.post(
            f"{self.capability.url}/stream/params",
            data=body,
            headers=self._headers(**{"Content-Type": "application/json"}),
        ) as response:
            return response.status, await response.read()

    async def stop(self, body: bytes = b"stream ended") -> tuple[int, bytes]:
        """Tell the container (no Content-Type, plain text), then close every channel at once, as
        go-livepeer does whatever the container answered (docs/protocol.md §2.5): what the gateway has
        not read by then is lost. Returns the container's answer (200 when it gave none)."""
        status, answer = 200, b""
        if self._ended.is_set():
            return status, answer
        self.end_reason = self.end_reason or "stopped"
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                async with self._http.post(
                    f"{self.capability.url}/stream/stop",
                    data=body,
                    headers=self._headers(),
                    skip_auto_headers=["Content-Type"],  # go-livepeer sets none on a stop
                ) as response:
                    status, answer = response.status, await response.read()
        self._close_channels()
        self._stopping.set()
        return status, answer

    def _close_channels(self) -> None:
        for name in self.channels.names().values():
            self._trickle.close_channel(name)

    # --- running --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until the duration elapses, a stop, or the container ends the stream; then clean up."""
        self.state = StreamState.RUNNING
        try:
            async with asyncio.TaskGroup() as tasks:
                readers = [
                    tasks.create_task(self._read_output(), name=f"{self.stream_id}:output"),
                    tasks.create_task(self._read_events(), name=f"{self.stream_id}:events"),
                ]
                watchers = [
                    *readers,
                    tasks.create_task(self._keepalive(), name=f"{self.stream_id}:keepalive"),
                    tasks.create_task(self._watch_container(), name=f"{self.stream_id}:container"),
                ]
                if self.channels.data:
                    watchers.append(tasks.create_task(self._read_data(), name=f"{self.stream_id}:data"))
                if self.request.source == "synthetic":
                    watchers.append(tasks.create_task(self._feed(), name=f"{self.stream_id}:input"))
                if self.request.duration_s:
                    watchers.append(tasks.create_task(self._expire(self.request.duration_s)))
                await self._stopping.wait()
                # the container closes output and events on its own (or a stop closed them): let the
                # readers see that
                await asyncio.wait(readers, timeout=_DRAIN_TIMEOUT_S)
                for task in watchers:
                    task.cancel()
        finally:
            self._close_channels()
            self.state = StreamState.ENDED
            self._ended.set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def _container_ended(self, reason: str) -> None:
        if not self._stopping.is_set():
            self.end_reason = self.end_reason or reason
            log.info("stream %s: ended by the container (%s)", self.stream_id, reason)
            self._stopping.set()

    async def _watch_container(self) -> None:
        """End the stream once its container stops answering: it is gone and will never end it."""
        failures = 0
        while failures < CONTAINER_PROBE_FAILURES:
            await asyncio.sleep(CONTAINER_PROBE_INTERVAL_S)
            failures = 0 if await self._container_answers() else failures + 1
        log.warning("stream %s: container %s does not answer", self.stream_id, self.capability.url)
        self._container_ended("container gone")

    async def _container_answers(self) -> bool:
        try:
            async with asyncio.timeout(CONTAINER_PROBE_INTERVAL_S * 2):
                async with self._http.get(f"{self.capability.url}/health") as response:
                    await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        return True

    async def _expire(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.end_reason = "duration elapsed"
        await self.stop()

    async def _feed(self) -> None:
        publisher = TricklePublisher(self.urls["input"], session=self._http)
        source = await asyncio.to_thread(LoopingSource, audio="aac" if self.request.audio else None)

        def segment_done(chunks: list[bytes], ended_at: float) -> None:
            self._figures.input_segments += 1
            pts = first_video_pts(chunks[0], _VIDEO_PID)
            if pts is not None:
                self._input_ends[pts] = ended_at
                while len(self._input_ends) > 64:
                    self._input_ends.pop(next(iter(self._input_ends)))

        with contextlib.suppress(TrickleError):
            await publish_live(publisher, source, on_segment=segment_done)

    async def _keepalive(self) -> None:
        publisher = TricklePublisher(
            self.urls["control"], session=self._http, mime_type=self.channels.mime_type("control")
        )
        message = json.dumps(dict(KEEPALIVE)).encode()
        with contextlib.suppress(TrickleError):
            while True:
                await publisher.write_segment(message)
                await asyncio.sleep(KEEPALIVE_INTERVAL_S)

    async def _read_output(self) -> None:
        figures = self._figures
        try:
            async with TrickleSubscriber(
                self.urls["output"], session=self._http, start_seq=_GATEWAY_START_SEQ
            ) as subscriber:
                async for segment in subscriber:
                    data = await segment.read()
                    figures.last_segment_complete = segment.complete
                    ended = time.monotonic()
                    frames = count_pes_starts(data, _VIDEO_PID)
                    figures.frames_out += frames
                    figures.output_segments += 1
                    self._segment_ends.append((ended, frames))
                    pts = first_video_pts(data, _VIDEO_PID)
                    if pts is not None and pts in self._input_ends:
                        figures.latencies_ms.append((ended - self._input_ends[pts]) * 1000)
            figures.output_closed = True  # the channel ended: the container closed it
        except ChannelGone:
            figures.output_closed = True  # already deleted when this reader asked again
        except TrickleError:
            pass
        self._container_ended("output ended")

    async def _read_events(self) -> None:
        try:
            async with TrickleSubscriber(
                self.urls["events"], session=self._http, start_seq=_GATEWAY_START_SEQ
            ) as subscriber:
                async for segment in subscriber:
                    with contextlib.suppress(ValueError):
                        document = json.loads(await segment.read())
                        event = document.get("event", document) if isinstance(document, dict) else {}
                        if isinstance(event, dict):
                            self.events.append({"received_at": time.time(), **event})
                        if isinstance(event, dict) and event.get("type") in ("status", "stream_stopped"):
                            self._figures.last_status = event
                            if event["type"] == "stream_stopped":
                                self._figures.final_event = True
        except TrickleError:
            pass
        self._container_ended("events ended")

    async def _read_data(self) -> None:
        with contextlib.suppress(TrickleError):
            async with TrickleSubscriber(
                self.urls["data"], session=self._http, start_seq=_GATEWAY_START_SEQ
            ) as subscriber:
                async for segment in subscriber:
                    self._figures.data_messages += (await segment.read()).count(b"\n")

    # --- reporting ------------------------------------------------------------------------------

    def _fps(self) -> float:
        """Output frames per second over the last few segments (frames after the first / time between)."""
        ends = list(self._segment_ends)
        if len(ends) < 2 or time.monotonic() - ends[-1][0] > 5.0:
            return 0.0
        span = ends[-1][0] - ends[0][0]
        return sum(frames for _, frames in ends[1:]) / span if span > 0 else 0.0

    def statistics(self) -> dict[str, Any]:
        figures = self._figures
        latencies = sorted(figures.latencies_ms)
        status = figures.last_status or {}
        dropped = status.get("dropped_frames") or status.get("statistics", {}).get("dropped") or {}
        return {
            "stream_id": self.stream_id,
            "model_id": self.request.model_id,
            "container": self.capability.url,
            "state": self.state,
            "end_reason": self.end_reason,
            "uptime_s": round(time.time() - self.started_at, 1),
            "input_segments": figures.input_segments,
            "output_segments": figures.output_segments,
            "frames_out": figures.frames_out,
            "fps": round(self._fps(), 1),
            "latency_ms_p50": percentile(latencies, 0.5),
            "latency_ms_p95": percentile(latencies, 0.95),
            "dropped_frames": sum(dropped.values()) if isinstance(dropped, dict) else None,
            "data_messages": figures.data_messages,
            "last_status": status.get("state") or status.get("type"),
            "final_event": figures.final_event,
            "frames_published": _frames_published(status) if figures.final_event else None,
            "last_segment_complete": figures.last_segment_complete,
            "output_closed": figures.output_closed,
            "urls": self.urls,
        }
