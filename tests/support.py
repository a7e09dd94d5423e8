"""Test support: one stream's channels on a byoc trickle server, and readers of what a session publishes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp
import av
import numpy as np
from aiohttp import web

from byoc.dev.orchestrator.registry import CAPABILITY_FIELDS
from byoc.dev.procs import descendants
from byoc.dev.synthetic import SyntheticStream, read_frame_index
from byoc.dev.trickle_server import RunningTrickle
from byoc.errors import ChannelGone
from byoc.serve import listener
from byoc.spec import StreamSpec
from byoc.trickle.layout import ROLES, Role, StreamChannels, role_of_field
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber
from tests.conftest import TEST_CLIENT_SETTINGS

PSI_PIDS = {0x0000, 0x0011, 0x1000}


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """Run an aiohttp application on a loopback port (a free one unless given); yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class Recorded(tuple[str, str, bytes]):
    """One request to :class:`FakeOrchestrator`: the tuple ``(path, Authorization header, body)``, with
    every header of the request in ``headers``."""

    headers: dict[str, str]

    def __new__(cls, path: str, headers: dict[str, str], body: bytes) -> Self:
        record = super().__new__(cls, (path, headers.get("Authorization", ""), body))
        record.headers = headers
        return record

    @property
    def path(self) -> str:
        return self[0]

    @property
    def authorization(self) -> str:
        return self[1]

    @property
    def body(self) -> bytes:
        return self[2]


class FakeOrchestrator:
    """go-livepeer's /capability/register and /capability/unregister handlers (docs/protocol.md §1).

    It records every request, refuses a wrong secret with 400 ``invalid authorization``, refuses a
    register body whose fields have the wrong JSON types (as Go's strict unmarshalling does), and keeps
    what is registered by name. Faults, each for that many requests: ``fail_next`` answers 503 before
    anything else is checked (a proxy in front, or an orchestrator not ready); ``echo_auth_next``
    answers 503 quoting the Authorization header back (a misbehaving proxy); ``drop_next`` drops the
    connection of a register with the right secret (like the handler panicking, P19).
    ``drop_unregister`` drops every unregister; ``hang_unregister`` holds it until ``release`` is set.
    """

    def __init__(self, secret: str = "secret") -> None:
        self.secret = secret
        self.url = ""
        self.requests: list[Recorded] = []
        self.registered: dict[str, dict[str, Any]] = {}
        self.fail_next = 0
        self.echo_auth_next = 0
        self.drop_next = 0
        self.drop_unregister = False
        self.hang_unregister = False
        self.release = asyncio.Event()
        self._seen = asyncio.Condition()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/capability/register", self.register)
        app.router.add_post("/capability/unregister", self.unregister)
        return app

    def registers(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/capability/register"]

    async def wait_for(self, path: str, timeout: float = 10.0) -> Recorded:  # noqa: ASYNC109
        """The first request to ``path``, once there is one."""
        async with asyncio.timeout(timeout), self._seen:
            await self._seen.wait_for(lambda: any(r.path == path for r in self.requests))
        return next(r for r in self.requests if r.path == path)

    async def _receive(self, request: web.Request) -> tuple[bytes, web.Response | None]:
        """Record the request; the answer when a fault or the secret decides it, else None."""
        body = await request.read()
        self.requests.append(Recorded(request.path, dict(request.headers), body))
        async with self._seen:
            self._seen.notify_all()
        if self.fail_next > 0:
            self.fail_next -= 1
            return body, web.Response(status=503, text="try later")
        if self.echo_auth_next > 0:
            self.echo_auth_next -= 1
            quoted = request.headers.get("Authorization", "")
            return body, web.Response(status=503, text=f"upstream rejected {quoted}")
        if request.headers.get("Authorization") != self.secret:
            return body, web.Response(status=400, text="invalid authorization\n")
        return body, None

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        raise web.HTTPServiceUnavailable()

    async def register(self, request: web.Request) -> web.Response:
        body, answer = await self._receive(request)
        if answer is not None:
            return answer
        if self.drop_next > 0:
            self.drop_next -= 1
            return self._drop(request)
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("body is not an object")
            for key, kind in CAPABILITY_FIELDS.items():
                value = data.get(key, kind())
                if type(value) is not kind:
                    raise ValueError(f"cannot unmarshal {value!r} into field {key} of type {kind.__name__}")
        except ValueError as exc:
            return web.Response(status=400, text=f"Error registering capability: {exc}")
        self.registered[data["name"]] = data
        return web.Response(text="ok", content_type="application/json")

    async def unregister(self, request: web.Request) -> web.Response:
        body, answer = await self._receive(request)
        if answer is not None:
            return answer
        if self.drop_unregister:
            return self._drop(request)
        if self.hang_unregister:
            await asyncio.wait_for(self.release.wait(), 5)
        self.registered.pop(body.decode(), None)
        return web.Response(text="ok", content_type="application/json")


@dataclass(frozen=True)
class OutputSegment:
    seq: int
    data: bytes
    ended_at: float


@dataclass(frozen=True)
class DecodedFrame:
    index: int | None
    pts: int
    width: int
    height: int
    rgb: np.ndarray = field(repr=False)


def make_segments(
    count: int, *, frames: int = 30, audio: str | None = None, **kwargs: Any
) -> list[list[bytes]]:
    stream = SyntheticStream(segment_frames=frames, audio=audio, **kwargs)
    return [stream.segment() for _ in range(count)]


def garbage_video_segment(pid: int = 0x100, packets: int = 100, seed: int = 7) -> list[bytes]:
    """A segment of TS packets on the video PID whose PES payloads are random H.264-looking bytes."""
    rng = np.random.default_rng(seed)
    out = bytearray()
    for i in range(packets):
        pts = 5_000_000 + i * 3000
        pts_field = [0x21 | ((pts >> 29) & 0x0E), (pts >> 22) & 0xFF, 0x01 | ((pts >> 14) & 0xFE)]
        pts_field += [(pts >> 7) & 0xFF, 0x01 | ((pts << 1) & 0xFE)]
        header = bytes([0, 0, 1, 0xE0, 0, 0, 0x80, 0x80, 5, *pts_field])
        body = header + b"\x00\x00\x00\x01\x65"
        body += rng.integers(0, 256, 184 - len(body), dtype=np.uint8).tobytes()
        out += bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | (i & 0xF)]) + body
    return [bytes(out)]


def first_ts_pid(segment: bytes) -> int:
    return ((segment[1] & 0x1F) << 8) | segment[2]


def first_video_is_keyframe(segment: bytes) -> bool:
    with av.open(io.BytesIO(segment), mode="r") as container:
        for packet in container.demux(video=0):
            if packet.size:
                return bool(packet.is_keyframe)
    return False


def decode(data: bytes, *, inverted: bool = False) -> tuple[list[DecodedFrame], list[str]]:
    """Every video frame of a TS byte string, and the names of its audio codecs."""
    frames = []
    with av.open(io.BytesIO(data), mode="r") as container:
        audio = [s.codec_context.name for s in container.streams.audio]
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            index = read_frame_index(rgb, inverted=inverted)
            frames.append(DecodedFrame(index, int(frame.pts or 0), frame.width, frame.height, rgb))
    return frames, audio


class StreamHarness:
    """The channels of one stream (created as the orchestrator would) and readers of its outputs."""

    def __init__(
        self, trickle: RunningTrickle, http: aiohttp.ClientSession, name: str = "s1", *, data: bool = False
    ) -> None:
        self.trickle = trickle
        self.server = trickle.server
        self.http = http
        self.name = name
        self.channels = StreamChannels(name, data=data)
        for role, channel in self.channels.names().items():
            self.server.create_channel(channel, self.channels.mime_type(role))
        self.output: list[OutputSegment] = []
        self.events: list[dict[str, Any]] = []
        self.data_lines: list[Any] = []
        self.input = TricklePublisher(self.url("input"), session=http, settings=TEST_CLIENT_SETTINGS)
        self.control = TricklePublisher(
            self.url("control"),
            session=http,
            mime_type=self.channels.mime_type("control"),
            settings=TEST_CLIENT_SETTINGS,
        )
        self._readers: list[asyncio.Task[None]] = []
        self.reader_errors: list[str] = []

    def url(self, role: str) -> str:
        """A channel's URL by role (``"output"``), or by its start-body field (``"publish"``: publish_url)."""
        known = next((candidate for candidate in ROLES if candidate == role), None)
        return self.channels.url(self.trickle.base_url, known or role_of_field(f"{role}_url"))

    def start_body(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the orchestrator posts to the container's ``/stream/start`` for this stream."""
        return self.channels.start_body(self.trickle.base_url, params)

    def spec(self, **overrides: Any) -> StreamSpec:
        urls = self.channels.container_urls(self.trickle.base_url)
        return StreamSpec(stream_id=self.name, **{**urls, **overrides})

    async def __aenter__(self) -> Self:
        self._readers.append(asyncio.create_task(self._read("output", self._on_output)))
        self._readers.append(asyncio.create_task(self._read("events", self._on_event)))
        if self.channels.data:
            self._readers.append(asyncio.create_task(self._read("data", self._on_data)))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await asyncio.gather(self.input.close(), self.control.close())

    async def readers_done(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every reader saw its channel end (the session DELETEs what it publishes)."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._readers)

    async def publish(self, segments: Sequence[list[bytes]], *, realtime: bool = True) -> list[float]:
        from byoc.dev.synthetic import publish_live

        return await publish_live(self.input, segments, realtime=realtime)

    async def _read(self, role: Role, handle: Any) -> None:
        async with TrickleSubscriber(
            self.url(role), session=self.http, start_seq=0, settings=TEST_CLIENT_SETTINGS
        ) as sub:
            try:
                async for segment in sub:
                    handle(segment.seq, await segment.read())
            except ChannelGone:
                pass  # the session DELETEd the channel before this reader asked for its next segment
            except Exception as exc:  # kept for the test's failure message
                self.reader_errors.append(f"{role}: {type(exc).__name__}: {exc}")

    def _on_output(self, seq: int, data: bytes) -> None:
        self.output.append(OutputSegment(seq, data, time.monotonic()))

    def _on_event(self, seq: int, data: bytes) -> None:
        self.events.append(json.loads(data))

    def _on_data(self, seq: int, data: bytes) -> None:
        self.data_lines.extend(json.loads(line) for line in data.splitlines() if line)

    def event_types(self) -> list[str]:
        return [str(e["event"].get("type")) for e in self.events]

    def output_bytes(self) -> bytes:
        return b"".join(segment.data for segment in self.output)


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float = 30.0,  # noqa: ASYNC109
    every: float = 0.1,
) -> float:
    """Poll ``condition`` (another process, over HTTP, or what readers received) until it holds;
    returns when it did (``time.monotonic()``); AssertionError naming ``what`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:  # another process: polled over HTTP
                if await condition():
                    return time.monotonic()
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@contextlib.asynccontextmanager
async def serving_orchestrator(secret: str = "secret") -> AsyncIterator[FakeOrchestrator]:
    """A :class:`FakeOrchestrator` served on loopback, its ``url`` set; a held unregister is released
    when it stops."""
    fake = FakeOrchestrator(secret)
    async with serve_app(fake.app()) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release.set()


def listener_pids(parent: int) -> list[int]:
    """The listener processes (byoc.serve.listener) among ``parent``'s descendants that have not ended."""
    found = []
    for pid in descendants(parent):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if listener.__file__.encode() in f.read():  # empty once it ended (a zombie)
                found.append(pid)
    return found
