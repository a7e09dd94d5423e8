"""Conformance: Livepeer's own SDK (``livepeer-gateway``) against ``byoc orchestrator`` and ``byoc serve
--protocol live-runner``, each a real subprocess.

The SDK is the judge: what it sends and expects is go-livepeer's live-runner contract (heartbeat
registration, discovery, reservation, the session proxy with its four headers, the runner's channel
callbacks, the orchestrator-to-runner channel, stop). Its runner side stands in for a runner byoc did not
write, its client side for a gateway byoc did not write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from byoc.dev.children import ByocProcess, free_port
from byoc.dev.synthetic import publish_live
from byoc.trickle.publisher import TricklePublisher
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.support import decode, make_segments, serve_app, wait_until

lpg = pytest.importorskip("livepeer_gateway", reason="the SDK is installed by `make` (Makefile)")

pytestmark = pytest.mark.e2e

SECRET = "live-runner-secret"
APP = "live-video-to-video/sdk-conformance"


# --- the processes ---------------------------------------------------------------------------------------


def orchestrator_process(*args: str, port: int = 0) -> ByocProcess:
    return ByocProcess("orchestrator", "--port", str(port), "--orch-secret", SECRET, *args)


@pytest.fixture
async def orchestrator() -> AsyncIterator[ByocProcess]:
    async with orchestrator_process() as process:
        yield process


def runner_process(
    orchestrator_url: str, *args: str, name: str = "lr-model", processor: str = "invert"
) -> ByocProcess:
    """``byoc serve PROCESSOR --protocol live-runner`` registering with ``orchestrator_url``."""
    port = free_port()
    return ByocProcess(
        "serve", processor, "--protocol", "live-runner", "--host", "127.0.0.1", "--port", str(port),
        "--capability-name", name, "--capability-url", f"http://127.0.0.1:{port}",
        "--orchestrator-url", orchestrator_url, "--orch-secret", SECRET, *args,
    )  # fmt: skip


# --- what the SDK's client sees ----------------------------------------------------------------------------


def discovery_url(orchestrator: ByocProcess) -> str:
    return f"{orchestrator.url}/discovery"


def reserve_url(orchestrator: ByocProcess, runner_id: str) -> str:
    """Where go-livepeer's discovery sends a client to reserve a session on a persistent runner."""
    return f"{orchestrator.url}/apps/{runner_id}/session"


async def discovered(orchestrator: ByocProcess, app: str | None = None) -> dict[str, dict[str, Any]]:
    """The runners the SDK discovers on the orchestrator, by the URL a client reserves at."""
    entries = await lpg.discover_runners(discovery_url=discovery_url(orchestrator), app=app)
    runners: dict[str, dict[str, Any]] = {}
    for entry in entries:
        assert entry["address"] == orchestrator.url
        runners.update({runner["url"]: runner for runner in entry["runners"]})
    return runners


async def is_discovered(orchestrator: ByocProcess, url: str) -> bool:
    return url in await discovered(orchestrator)


async def only_runner(orchestrator: ByocProcess, app: str | None = None) -> dict[str, Any]:
    """The one runner discovered (serving ``app``), once there is one."""

    async def one() -> bool:
        return len(await discovered(orchestrator, app)) == 1

    await wait_until(one, "the runner is discovered")
    return next(iter((await discovered(orchestrator, app)).values()))


# --- the SDK's runner side against byoc orchestrator ---------------------------------------------------


@dataclass
class EchoApp:
    """A runner's app: it answers every request with what reached it (path, query, body, headers)."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        seen = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "body": (await request.read()).decode(),
            "headers": dict(request.headers),
        }
        self.requests.append(seen)
        return web.json_response(seen)


@contextlib.asynccontextmanager
async def sdk_runner(orchestrator: ByocProcess, runner_url: str, **kwargs: Any) -> AsyncIterator[Any]:
    registration = await lpg.register_runner(
        orchestrator.url, secret=SECRET, runner_url=runner_url, app=APP, auto_detect_gpu=False, **kwargs
    )
    try:
        yield registration
    finally:
        await registration.close()


async def test_the_sdk_runner_registers_is_discovered_and_unregisters(orchestrator: ByocProcess) -> None:
    echo = EchoApp()
    async with serve_app(echo.app()) as runner_url:
        with pytest.raises(lpg.LivepeerHTTPError) as refused:
            await lpg.register_runner(
                orchestrator.url,
                secret="not-the-secret",
                runner_url=runner_url,
                app=APP,
                auto_detect_gpu=False,
            )
        assert refused.value.status_code == 401
        async with sdk_runner(orchestrator, runner_url, capacity=3, version="1.2.3") as registration:
            assert registration.runner_id
            # the answer's Go durations parsed: the orchestrator said how often to beat and when it forgets
            assert registration.heartbeat_interval_s > 0
            assert registration.heartbeat_ttl_s is not None
            assert registration.heartbeat_ttl_s > registration.heartbeat_interval_s
            assert registration.o2r_channel is not None, "no orchestrator-to-runner channel in the answer"
            url = reserve_url(orchestrator, registration.runner_id)
            runners = await discovered(orchestrator, app=APP)
            assert set(runners) == {url}
            runner = runners[url]
            assert (runner["app"], runner["mode"], runner["version"]) == (APP, "persistent", "1.2.3")
            assert (runner["capacity"], runner["capacity_used"], runner["capacity_available"]) == (3, 0, 3)
            async with aiohttp.ClientSession() as http, http.get(discovery_url(orchestrator)) as response:
                assert runner_url not in await response.text(), "discovery leaks the runner's own URL"
            assert await discovered(orchestrator, app="live-video-to-video/other") == {}
        # close() unregistered it: gone at once, and no session can be reserved on it any more
        assert not await is_discovered(orchestrator, url)
        async with aiohttp.ClientSession() as http, http.post(url, json={}) as response:
            assert response.status == 404, await response.text()


async def test_heartbeats_keep_a_runner_and_silence_drops_it_after_the_ttl() -> None:
    async with (
        orchestrator_process("--heartbeat-interval", "1s", "--heartbeat-ttl", "4s") as orchestrator,
        serve_app(EchoApp().app()) as runner_url,
        sdk_runner(orchestrator, runner_url, label="beating") as beating,
    ):
        silent = await lpg.register_runner(
            orchestrator.url, secret=SECRET, runner_url=runner_url, app=APP, label="silent",
            auto_detect_gpu=False, unregister_on_close=False,
        )  # fmt: skip
        ttl = silent.heartbeat_ttl_s
        assert ttl is not None
        await silent.close()  # stops beating without unregistering
        silent_url = reserve_url(orchestrator, silent.runner_id)
        beating_url = reserve_url(orchestrator, beating.runner_id)
        assert await is_discovered(orchestrator, silent_url), "a silent runner was dropped before its TTL"
        began = time.monotonic()

        async def silent_gone() -> bool:
            return not await is_discovered(orchestrator, silent_url)

        gone_at = await wait_until(silent_gone, "the silent runner expires", ttl + 30)
        assert gone_at - began >= ttl - beating.heartbeat_interval_s, "dropped long before its TTL"
        # the one that kept beating outlived a whole TTL
        assert await is_discovered(orchestrator, beating_url)


async def test_a_session_through_the_orchestrator_between_the_sdk_client_and_the_sdk_runner(
    orchestrator: ByocProcess,
) -> None:
    echo = EchoApp()
    reserved: list[str] = []
    released = asyncio.Event()

    def on_release(event: Any) -> None:
        released.set()

    async with (
        serve_app(echo.app()) as runner_url,
        sdk_runner(
            orchestrator,
            runner_url,
            capacity=1,
            on_session_reserve=lambda event: reserved.append(event.session_id),
            on_session_release=on_release,
        ) as registration,
    ):
        session = await lpg.reserve_session(discovery_url=discovery_url(orchestrator), app=APP)
        rid, sid = registration.runner_id, session.session_id
        assert session.app_url == f"{orchestrator.url}/apps/{rid}/session/{sid}/app"
        assert session.control_url == f"{orchestrator.url}/apps/{rid}/session/{sid}"
        # the O2R channel told the runner
        await wait_until(_now(lambda: sid in registration.active_session_ids), "O2R 'reserved'", 15)
        assert reserved == [sid]
        # capacity is per session: a second reservation is refused with go-livepeer's 503
        async with aiohttp.ClientSession() as http, http.post(reserve_url(orchestrator, rid)) as response:
            assert response.status == 503, await response.text()
        assert (await discovered(orchestrator))[reserve_url(orchestrator, rid)]["capacity_available"] == 0

        # the proxy forwards path, query, method and body, and adds the four session headers
        result = await lpg.call_runner(f"{session.app_url}/start/it?x=1", payload={"hello": "runner"})
        seen = result.data
        assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/start/it", "x=1")
        assert json.loads(seen["body"]) == {"hello": "runner"}
        headers = seen["headers"]
        assert headers["Livepeer-Session-Id"] == sid
        assert headers["Livepeer-Runner-Route"] == rid
        assert (
            headers["Livepeer-Session-Control"]
            == f"{registration.orchestrator_url}/runner/{rid}/session/{sid}"
        )
        token = headers["Livepeer-Session-Token"]
        assert token

        # the runner's callback: channels for the session, named after it, the token required
        request = _Request(headers)
        channels = await registration.create_trickle_channels(
            request, [{"name": "out", "mime_type": "video/MP2T"}, {"name": "in", "mime_type": ""}]
        )
        by_name = {channel["name"]: channel for channel in channels}
        assert by_name["out"]["channel_name"] == f"{sid}-out"
        assert by_name["in"]["mime_type"] == "application/octet-stream"
        again = await registration.create_trickle_channels(
            request, [{"name": "out", "mime_type": "video/MP2T"}]
        )
        assert again[0]["url"] == by_name["out"]["url"], "creating a channel twice is not idempotent"
        with pytest.raises(lpg.LivepeerHTTPError) as refused:
            await lpg.create_trickle_channels(
                _Request({**headers, "Livepeer-Session-Token": "not-the-token"}),
                [{"name": "x", "mime_type": "video/MP2T"}],
            )
        assert refused.value.status_code == 401
        with pytest.raises(lpg.LivepeerHTTPError) as bad_name:
            await registration.create_trickle_channels(request, [{"name": "a.b", "mime_type": "video/MP2T"}])
        assert bad_name.value.status_code == 400
        out_reader = asyncio.create_task(_read_until_gone(by_name["out"]["url"]))
        async with (  # the runner writes a segment, the client reads it
            aiohttp.ClientSession() as http,
            http.post(f"{by_name['out']['url']}/0", data=b"segment zero") as response,
        ):
            assert response.status == 200, await response.text()
        assert await registration.remove_trickle_channels(request, ["in"]) == ["in"]
        assert await _channel_status(by_name["in"]["url"]) == 404

        # the client's stop: the runner hears 'released', the session's channels go, capacity is back
        await lpg.stop_runner_session(session)
        async with asyncio.timeout(15):
            await released.wait()
        assert registration.active_session_ids == ()
        assert await _channel_status(by_name["out"]["url"]) == 404
        segments = await asyncio.wait_for(out_reader, 15)
        assert segments[0] == b"segment zero"
        runner = (await discovered(orchestrator))[reserve_url(orchestrator, rid)]
        assert (runner["capacity_used"], runner["capacity_available"]) == (0, 1)
        async with aiohttp.ClientSession() as http, http.get(f"{session.app_url}/after") as response:
            assert response.status == 404, "the proxy still serves a released session"
        # the runner's own stop, on a new session: released the same way
        released.clear()
        second = await lpg.reserve_session(discovery_url=discovery_url(orchestrator), app=APP)
        result = await lpg.call_runner(f"{second.app_url}/start", payload={})
        await lpg.stop_runner_session(_Request(result.data["headers"]))
        async with asyncio.timeout(15):
            await released.wait()


async def test_a_session_proxy_the_sdk_runner_creates_reaches_its_app_until_the_session_ends(
    orchestrator: ByocProcess,
) -> None:
    echo = EchoApp()
    async with serve_app(echo.app()) as runner_url, sdk_runner(orchestrator, runner_url) as registration:
        session = await lpg.reserve_session(discovery_url=discovery_url(orchestrator), app=APP)
        headers = (await lpg.call_runner(f"{session.app_url}/start", payload={})).data["headers"]
        proxy = await registration.create_proxy(_Request(headers))
        assert proxy.proxy_id
        assert proxy.url.startswith(orchestrator.url)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy.url}/hello?y=2") as response:
                seen = await response.json()
            assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/hello", "y=2")
            assert seen["headers"]["Livepeer-Session-Id"] == session.session_id
            with pytest.raises(lpg.LivepeerHTTPError) as elsewhere:
                await registration.create_proxy(_Request(headers), "http://example.invalid/")
            assert elsewhere.value.status_code == 400  # only the runner's own host
            await lpg.stop_runner_session(session)
            async with http.get(f"{proxy.url}/hello") as response:
                assert response.status == 404, "a released session's proxy still answers"


def _now(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return check()

    return condition


@dataclass(frozen=True)
class _Request:
    """What the SDK's runner-side calls read from a proxied request: its headers."""

    headers: dict[str, str]


async def _channel_status(url: str) -> int:
    """The status of a trickle GET of the channel's next segment (404: the channel is gone)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/-1", timeout=aiohttp.ClientTimeout(3)) as r:
        return r.status


async def _read_until_gone(url: str, on_segment: Callable[[bytes], None] | None = None) -> list[bytes]:
    """Every segment of a channel (each also to ``on_segment``), read with the SDK's subscriber until the
    channel ends (closed or removed)."""
    segments: list[bytes] = []
    async with lpg.TrickleSubscriber(url, start_seq=0) as subscriber:
        while (segment := await subscriber.next()) is not None:
            reader, parts = segment.make_reader(), []
            while (chunk := await reader.read()) is not None:
                parts.append(chunk)
            await segment.close()
            segments.append(b"".join(parts))
            if on_segment is not None:
                on_segment(segments[-1])
    return segments


# --- the SDK's client side against byoc serve --protocol live-runner ---------------------------------------

START_PATH = "live-video-to-video"
"""Where a client starts the stream of its session, under the session's ``app_url``."""


@dataclass
class Stream:
    """A stream started on ``byoc serve`` through the orchestrator's proxy, as its client sees it: the
    reservation, the runner's answer, and readers (the SDK's trickle subscriber) of its output and events."""

    session: Any
    answer: dict[str, Any]
    output: list[bytes] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    readers: list[asyncio.Task[list[bytes]]] = field(default_factory=list)
    publisher: TricklePublisher | None = None

    def url(self, field_name: str) -> str:
        url = self.answer.get(field_name)
        assert isinstance(url, str), f"the runner's answer has no {field_name}: {self.answer}"
        return url

    def read(self) -> None:
        self.readers.append(
            asyncio.create_task(_read_until_gone(self.url("subscribe_url"), self.output.append))
        )
        self.readers.append(asyncio.create_task(_read_until_gone(self.url("events_url"), self._on_event)))

    def _on_event(self, data: bytes) -> None:
        self.events.append(json.loads(data))

    def event_types(self) -> list[str]:
        return [str(event.get("event", {}).get("type")) for event in self.events]

    async def publish(self, http: aiohttp.ClientSession, segments: Sequence[list[bytes]]) -> None:
        """Publish the input as a live client does; the input channel stays open until :meth:`close`."""
        if self.publisher is None:
            url = self.url("publish_url")
            self.publisher = TricklePublisher(url, session=http, settings=TEST_CLIENT_SETTINGS)
        await publish_live(self.publisher, segments)

    async def ended(self, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Until both readers saw their channel removed."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self.readers)

    async def close(self) -> None:
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        if self.publisher is not None:
            await self.publisher.close()


async def start_stream(orchestrator: ByocProcess, app: str, params: dict[str, Any] | None = None) -> Stream:
    """Reserve a session with the SDK and start its stream through the proxy; the readers run."""
    session = await lpg.reserve_session(discovery_url=discovery_url(orchestrator), app=app, timeout=30)
    result = await lpg.call_runner(
        f"{session.app_url}/{START_PATH}", payload={"params": params or {}}, timeout=30
    )
    stream = Stream(session, result.data)
    stream.read()
    return stream


async def health(http: aiohttp.ClientSession, serve: ByocProcess) -> dict[str, Any]:
    async with http.get(f"{serve.url}/health") as response:
        answer: dict[str, Any] = await response.json()
        return answer


async def sessions_are(http: aiohttp.ClientSession, serve: ByocProcess, count: int) -> bool:
    return bool((await health(http, serve))["sessions"] == count)


def capacity(runner: dict[str, Any]) -> tuple[int, int, int]:
    return runner["capacity"], runner["capacity_used"], runner["capacity_available"]


async def test_a_stream_on_byoc_serve_through_the_orchestrator_with_the_sdk_client(
    http: aiohttp.ClientSession, orchestrator: ByocProcess
) -> None:
    async with runner_process(orchestrator.url, "--max-sessions", "2") as serve:
        runner = await only_runner(orchestrator)
        assert runner["mode"] == "persistent"
        assert capacity(runner) == (2, 0, 2)
        stream = await start_stream(orchestrator, runner["app"], {"note": "sdk"})
        try:
            assert capacity((await discovered(orchestrator))[runner["url"]]) == (2, 1, 1)
            await stream.publish(http, make_segments(2, frames=15))

            async def output_came() -> bool:
                return bool(stream.output)

            await wait_until(output_came, "an output segment", 30)
            frames, _ = decode(stream.output[0], inverted=True)
            indices = [frame.index for frame in frames]
            assert indices, "the first output segment has no video frame"
            assert set(indices) <= set(range(30)), f"not the inverted pictures of the input: {indices}"
            assert "status" in stream.event_types(), stream.events
            # the SDK's own client reads the start answer and updates the stream on its control channel
            job = lpg.LiveVideoToVideo.from_json(stream.answer)
            assert (job.publish_url, job.subscribe_url) == (
                stream.url("publish_url"),
                stream.url("subscribe_url"),
            )
            await job.control.write({"note": "updated"})
            await wait_until(
                _now(lambda: "params_updated" in stream.event_types()), "the SDK's update is applied", 30
            )
            # the client's stop releases the session at once: its channels go (the runner cannot publish
            # a final event there any more), the runner hears 'released' on O2R and ends its session
            await lpg.stop_runner_session(stream.session)
            await stream.ended()
            await job.close()
            for field_name in ("publish_url", "subscribe_url", "events_url", "control_url", "data_url"):
                assert await _channel_status(stream.url(field_name)) == 404, field_name
            await wait_until(lambda: sessions_are(http, serve, 0), "the runner's session ends", 15)

            async def freed() -> bool:
                return capacity((await discovered(orchestrator))[runner["url"]]) == (2, 0, 2)

            await wait_until(freed, "the orchestrator frees the capacity", 15)
        finally:
            await stream.close()


def session_released(orchestrator: ByocProcess, session_id: str) -> bool:
    return any(f"session {session_id} released" in line for line in orchestrator.lines)


async def announced_interval(orchestrator: ByocProcess) -> float:
    """The heartbeat interval the orchestrator names, as the SDK reads it (a runner registered and
    unregistered again to ask)."""
    async with serve_app(EchoApp().app()) as runner_url, sdk_runner(orchestrator, runner_url) as probe:
        return float(probe.heartbeat_interval_s)


async def test_after_the_orchestrator_restarts_the_runners_register_again_and_stale_sessions_end(
    http: aiohttp.ClientSession,
) -> None:
    port = free_port()
    timing = ("--heartbeat-interval", "3s", "--heartbeat-ttl", "60s")  # a TTL far beyond the interval
    first = await orchestrator_process(*timing, port=port).start()
    second = orchestrator_process(*timing, port=port)
    streams: list[Stream] = []
    try:
        interval = await announced_interval(first)
        async with (
            runner_process(first.url, "--max-sessions", "2", name="lr-model") as serve,
            serve_app(EchoApp().app()) as echo_url,
            sdk_runner(first, echo_url) as sdk,  # and a runner byoc did not write, beside it
        ):
            runner = await only_runner(first, "live-video-to-video/lr-model")
            streams = [await start_stream(first, runner["app"]) for _ in range(2)]
            await wait_until(lambda: sessions_are(http, serve, 2), "both sessions run", 15)
            await first.kill()
            await second.start()
            restarted = time.monotonic()
            sdk_url = reserve_url(second, sdk.runner_id)
            app = runner["app"]

            async def both_back() -> bool:
                runners = await discovered(second)
                return sdk_url in runners and any(found["app"] == app for found in runners.values())

            registered = await wait_until(both_back, "both runners register again", interval + 30)
            assert registered - restarted <= interval + 5, "not registered again within a heartbeat interval"
            runner = await only_runner(second, app)
            # the new orchestrator knows none of the old sessions: the runner ends them, the capacity is whole
            await wait_until(lambda: sessions_are(http, serve, 0), "the stale sessions end", 30)
            assert capacity((await discovered(second))[runner["url"]]) == (2, 0, 2)
            # and the runner serves the new orchestrator's clients
            fresh = await start_stream(second, app)
            streams.append(fresh)
            await wait_until(lambda: sessions_are(http, serve, 1), "a new session runs", 15)
            await lpg.stop_runner_session(fresh.session)
            await fresh.ended()
            await wait_until(
                lambda: sessions_are(http, serve, 0), "the session ends on the client's stop", 15
            )
    finally:
        for stream in streams:
            await stream.close()
        await second.kill()
        await first.kill()


async def test_the_runner_keeps_its_runner_id_when_it_registers_again() -> None:
    port = free_port()
    first = await orchestrator_process("--heartbeat-interval", "1s", port=port).start()
    second = orchestrator_process("--heartbeat-interval", "1s", port=port)
    try:
        async with runner_process(first.url) as serve:
            before = await only_runner(first)
            await first.kill()
            await second.start()
            after = await only_runner(second)
            assert after["url"] == before["url"], serve.log[-2000:]
    finally:
        await second.kill()
        await first.kill()


async def runner_seen(
    http: aiohttp.ClientSession, orchestrator: ByocProcess, runner_id: str
) -> dict[str, Any]:
    """What the orchestrator holds of a runner (its ``/status``): the status of its latest heartbeat and
    its sessions; empty once it is gone."""
    async with http.get(f"{orchestrator.url}/status") as response:
        runners = (await response.json())["live_runners"]
    return next((runner for runner in runners if runner["runner_id"] == runner_id), {})


def log_index(process: ByocProcess, text: str) -> int:
    return next(i for i, line in enumerate(process.lines) if text in line)


async def test_sigterm_hides_the_runner_at_once_ends_every_session_and_unregisters(
    http: aiohttp.ClientSession,
) -> None:
    drain_s = 8.0
    # Heartbeats 30 s apart: a non-ready one within a second of the signal is the drain's own. Each
    # session takes 2 s to stop, so the drain lasts long enough to watch its state through /status.
    async with (
        orchestrator_process("--heartbeat-interval", "30s", "--heartbeat-ttl", "90s") as orchestrator,
        runner_process(
            orchestrator.url, "--max-sessions", "4", "--drain-timeout-s", str(drain_s),
            "--processor-option", "stop_s=2", processor="tests.processors:SlowToStop",
        ) as serve,
    ):  # fmt: skip
        runner = await only_runner(orchestrator)
        runner_id = runner["url"].rsplit("/", 2)[-2]
        streams = [await start_stream(orchestrator, runner["app"]) for _ in range(4)]
        try:
            segments = make_segments(1, frames=15)
            await asyncio.gather(*(stream.publish(http, segments) for stream in streams))

            async def outputs_came() -> bool:
                return all(stream.output for stream in streams)

            await wait_until(outputs_came, "every session's first output segment", 60)
            assert (await runner_seen(http, orchestrator, runner_id))["status"] in ("", "ready")
            began = time.monotonic()
            serve.signal(signal.SIGTERM)
            seen: dict[str, Any] = {}

            async def not_ready() -> bool:
                seen.clear()
                seen.update(await runner_seen(http, orchestrator, runner_id))
                return seen.get("status") not in ("", "ready")

            try:
                hidden_at = await wait_until(not_ready, "a heartbeat that is not 'ready'", 10, every=0.02)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the runner's log:\n{serve.log[-4000:]}") from None
            assert seen, "the runner is gone: it unregistered without saying first that it drains"
            assert seen["sessions"], "the sessions were released before the runner said it drains"
            assert hidden_at - began <= 1.0 + 1.0, "the draining heartbeat did not go out at once"
            assert not await is_discovered(orchestrator, runner["url"]), "a draining runner is discovered"
            assert await serve.wait_exit(timeout=drain_s + 10) == 0, serve.log[-3000:]
            assert time.monotonic() - began <= drain_s + 5
            unregistered = f"live runner {runner_id} removed (unregister)"
            await orchestrator.wait_for_log(unregistered, 10)
            for stream in streams:
                await stream.ended(timeout=10)
                last = stream.events[-1]["event"]
                assert (last["type"], last["reason"]) == ("stream_stopped", "shutdown"), stream.events
                released = f"session {stream.session.session_id} released"
                assert log_index(orchestrator, released) < log_index(orchestrator, unregistered)
            assert await runner_seen(http, orchestrator, runner_id) == {}
        finally:
            for stream in streams:
                await stream.close()


async def test_a_session_whose_client_vanished_is_released_after_the_input_timeout(
    http: aiohttp.ClientSession, orchestrator: ByocProcess
) -> None:
    timeout_s = 2.0
    async with runner_process(orchestrator.url, "--input-timeout-s", str(timeout_s)) as serve:
        runner = await only_runner(orchestrator)
        began = time.monotonic()
        stream = await start_stream(orchestrator, runner["app"])  # ... and the client sends nothing
        try:
            await stream.ended(timeout=timeout_s + 30)
            assert time.monotonic() - began >= timeout_s, "ended before its input timeout"
            last = stream.events[-1]["event"]
            assert (last["type"], last["reason"]) == ("stream_stopped", "input_timeout"), stream.events
            await wait_until(
                _now(lambda: session_released(orchestrator, stream.session.session_id)),
                "the runner releases the session at the orchestrator",
                15,
            )
            assert capacity((await discovered(orchestrator))[runner["url"]])[1] == 0
            assert await sessions_are(http, serve, 0)
        finally:
            await stream.close()


async def test_a_reservation_whose_client_never_calls_gives_its_slot_back(
    http: aiohttp.ClientSession,
) -> None:
    """The runner cannot release a reservation it was never called for (the session token comes with the
    call), so once the input timeout passes it offers one more slot instead (docs/protocol.md §10.4)."""
    timeout_s = 1.5
    async with (
        orchestrator_process("--heartbeat-interval", "250ms") as orchestrator,
        runner_process(orchestrator.url, "--max-sessions", "1", "--input-timeout-s", str(timeout_s)) as serve,
    ):
        runner = await only_runner(orchestrator)
        ghost = await lpg.reserve_session(discovery_url=discovery_url(orchestrator), app=runner["app"])
        began = time.monotonic()
        assert capacity((await discovered(orchestrator))[runner["url"]]) == (1, 1, 0)

        async def a_slot_again() -> bool:
            return capacity((await discovered(orchestrator))[runner["url"]]) == (2, 1, 1)

        freed = await wait_until(a_slot_again, "the abandoned reservation stops counting", timeout_s + 30)
        assert freed - began >= timeout_s, "counted as abandoned before the input timeout"
        assert not session_released(orchestrator, ghost.session_id)  # the orchestrator still lists it
        assert sum("never started" in line for line in serve.lines) == 1
        stream = await start_stream(orchestrator, runner["app"])
        try:
            await wait_until(lambda: sessions_are(http, serve, 1), "the new client's session runs", 15)
            # the orchestrator's count holds both; the runner is full, not offered a third
            assert capacity((await discovered(orchestrator))[runner["url"]]) == (2, 2, 0)
        finally:
            await stream.close()


async def test_a_processor_that_keeps_the_interpreter_busy_past_the_ttl_does_not_cost_the_registration(
    http: aiohttp.ClientSession,
) -> None:
    """The heartbeat runs on the API thread: a session's warm-up computing in Python for four times the
    orchestrator's TTL neither drops the runner nor makes it register again (docs/protocol.md §10.1)."""
    async with (
        orchestrator_process("--heartbeat-interval", "250ms", "--heartbeat-ttl", "1s") as orchestrator,
        runner_process(
            orchestrator.url, "--processor-option", "busy_s=4", processor="tests.processors:BusyStart"
        ) as serve,
    ):
        runner = await only_runner(orchestrator)
        began = time.monotonic()
        stream = await start_stream(orchestrator, runner["app"])  # answered once on_start() returned
        try:
            assert time.monotonic() - began >= 4.0
            assert await sessions_are(http, serve, 1)
            registered = [line for line in orchestrator.lines if "registered" in line]
            assert len(registered) == 1, orchestrator.log
            assert not any("removed" in line for line in orchestrator.lines), orchestrator.log
            assert capacity((await discovered(orchestrator))[runner["url"]])[1] == 1
        finally:
            await stream.close()
