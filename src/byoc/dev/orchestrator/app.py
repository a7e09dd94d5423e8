"""``byoc orchestrator``: the local development orchestrator's HTTP server.

===== ==================================== =========================================================
POST  /capability/register, /unregister    go-livepeer's registration (raw secret, 400 on a wrong one)
POST  /live-video-to-video                 start a stream: ``{"model_id", "params"?, "stream_id"?,
                                           "source": "synthetic"|"none", "duration_s"?, "data"?}``
POST  /live-video-to-video/{id}/update     parameters, forwarded to the container's /stream/params
POST  /live-video-to-video/{id}/stop       stop: the container's /stream/stop, then the channels close
GET   /status                              every stream with its statistics, the capabilities, the
                                           live runners
GET   /, /ui/...                           the live page and its JSON (``ui.py``, ``page.py``)
*     /ai/trickle/...                      the trickle channels (auto-create off)
*     /runners/..., /runner/..., /apps/...  go-livepeer's live-runner side (``live_runner.py``)
GET   /discovery                           the ready live runners
POST  /registerLiveRunners                 add or update static live runners (``static_runners.py``);
                                           ``Authorization`` must be the orchestrator secret
===== ==================================== =========================================================

``/live-video-to-video`` starts on a BYOC container registered for the model; when none is, on a live
runner serving ``live-video-to-video/MODEL`` (``runner_streams.py``), where update and stop go through
the session instead (the control channel, the session's release).

A JSON body without a Content-Type (``curl -d``) works everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import signal
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from byoc.dev.orchestrator.live_runner import LiveRunnerRoutes
from byoc.dev.orchestrator.registry import Capability, CapabilityRegistry
from byoc.dev.orchestrator.runner_streams import DEFAULT_START_PATH, RunnerStream, pick_runner
from byoc.dev.orchestrator.runners import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_HEARTBEAT_TTL_S,
    O2R_INTERVAL_S,
    LiveRunner,
    RunnerError,
    RunnerRegistry,
    parse_duration,
)
from byoc.dev.orchestrator.static_runners import (
    DEFAULT_HEALTH_INTERVAL_S,
    StaticRunnerEntry,
    StaticRunners,
    load_config,
)
from byoc.dev.orchestrator.streams import LocalStream, StreamRequest
from byoc.dev.orchestrator.ui import LiveUi
from byoc.dev.synthetic import LoopingSource
from byoc.dev.trickle_server import TrickleServer
from byoc.trickle.client import TrickleClientSettings, create_client_session

__all__ = ["DEFAULT_SECRET", "LocalOrchestrator", "OrchestratorSettings"]

log = logging.getLogger(__name__)

DEFAULT_SECRET = "byoc-local-secret"
_WORKER_FAILURE = b"Orchestrator worker failure"
"""go-livepeer's answer (500) when a container answers 401: it deletes the capability too."""


@dataclass(frozen=True)
class OrchestratorSettings:
    host: str = "127.0.0.1"
    port: int = 8935
    secret: str = DEFAULT_SECRET
    service_url: str | None = None
    """The base URL containers reach this orchestrator at (default http://HOST:PORT)."""
    containers: tuple[Capability, ...] = field(default_factory=tuple)
    """Containers known up front, without registration."""
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    """How often live runners are told to heartbeat (go-livepeer: 5 s); expired runners are swept as often."""
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S
    """A live runner without a heartbeat for this long is dropped with its sessions (go-livepeer: 20 s)."""
    o2r_interval_s: float = O2R_INTERVAL_S
    """How often a live runner's O2R channel gets a keep-alive (go-livepeer: 10 s)."""
    runner_start_path: str = DEFAULT_START_PATH
    """The app path the curl loop starts a stream at on a live runner's session."""
    static_runners: tuple[StaticRunnerEntry, ...] = ()
    """Static live runners registered at start (``--live-runner-config``)."""
    live_runner_health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    """How often static live runners' health URLs are fetched (go-livepeer: 5 s)."""

    def url(self, port: int) -> str:
        if self.service_url:
            return self.service_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{port}"


class _BadRequest(Exception):
    pass


def _stream_request(raw: bytes) -> StreamRequest:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise _BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise _BadRequest("model_id (a string) is required")
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise _BadRequest("params must be an object")
    stream_id = body.get("stream_id") or f"{model_id}-{secrets.token_hex(4)}"
    if not isinstance(stream_id, str) or "/" in stream_id:
        raise _BadRequest("stream_id must be a string without '/'")
    source = body.get("source", "synthetic")
    if source not in ("synthetic", "none"):
        raise _BadRequest("source must be 'synthetic' or 'none'")
    duration = body.get("duration_s")
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not math.isfinite(duration)
        or duration <= 0
    ):
        raise _BadRequest("duration_s must be a positive number")
    return StreamRequest(
        model_id=model_id,
        stream_id=stream_id,
        params=params,
        source=source,
        duration_s=None if duration is None else float(duration),
        data=bool(body.get("data", False)),
        audio=bool(body.get("audio", False)),
    )


class LocalOrchestrator:
    """The trickle server, the capability registry and the streams, behind one HTTP server."""

    def __init__(self, settings: OrchestratorSettings | None = None) -> None:
        self.settings = settings or OrchestratorSettings()
        self.trickle = TrickleServer(base_path="/ai/trickle/")
        self.registry = CapabilityRegistry(self.settings.secret)
        for capability in self.settings.containers:
            self.registry.add(capability)
        self.runners = RunnerRegistry(
            self.settings.secret,
            self.trickle,
            lambda: self.base_url,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            heartbeat_ttl_s=self.settings.heartbeat_ttl_s,
            o2r_interval_s=self.settings.o2r_interval_s,
        )
        self.streams: dict[str, LocalStream] = {}
        self.ended: deque[dict[str, Any]] = deque(maxlen=200)
        """The final statistics of streams that ended, newest last."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self.port: int | None = None
        self._listening = asyncio.Event()
        self._shutdown = asyncio.Event()

    # --- serving --------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=10 * 1024 * 1024)
        self.trickle.add_routes(app)
        self.registry.add_routes(app)
        LiveRunnerRoutes(self.runners).add_routes(app)
        StaticRunners(
            self.runners,
            self.settings.secret,
            self.settings.static_runners,
            self.settings.live_runner_health_interval_s,
        ).add_routes(app)
        app.router.add_post("/live-video-to-video", self._start)
        app.router.add_post("/live-video-to-video/{id}/update", self._update)
        app.router.add_post("/live-video-to-video/{id}/stop", self._stop)
        app.router.add_get("/status", self._status)
        LiveUi(self).add_routes(app)  # the live page at /
        return app

    async def wait_listening(self) -> None:
        await self._listening.wait()

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def serve(self, shutdown: Awaitable[object] | None = None) -> int:
        """Serve until SIGTERM/SIGINT, :meth:`request_shutdown` or ``shutdown``."""
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(number, self.request_shutdown)
        # The orchestrator talks to containers over plain HTTP on the machine: no TLS to verify.
        await asyncio.to_thread(LoopingSource)  # encode the synthetic input once, before any stream
        async with create_client_session(TrickleClientSettings()) as http:
            self._http = http
            runner = web.AppRunner(
                self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
            )
            await runner.setup()
            try:
                site = web.TCPSite(runner, self.settings.host, self.settings.port)
                await site.start()
                self.port = runner.addresses[0][1] if runner.addresses else self.settings.port
                log.info(
                    "local orchestrator listening on %s:%s (trickle at %s/ai/trickle/, live page at %s/)",
                    self.settings.host,
                    self.port,
                    self.base_url,
                    self.base_url,
                )
                self._listening.set()
                waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(self._shutdown.wait())]
                if shutdown is not None:
                    waiters.append(asyncio.ensure_future(shutdown))
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                await self._stop_everything()
            finally:
                await runner.cleanup()
        return 0

    @property
    def base_url(self) -> str:
        return self.settings.url(self.port or self.settings.port)

    async def _stop_everything(self) -> None:
        log.info("stopping %d streams", len(self.streams))
        await asyncio.gather(
            *(stream.stop(b"orchestrator shutting down") for stream in list(self.streams.values()))
        )
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)

    # --- routes ---------------------------------------------------------------------------------

    async def _start(self, request: web.Request) -> web.Response:
        assert self._http is not None
        try:
            wanted = _stream_request(await request.read())
        except _BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if wanted.stream_id in self.streams:
            return web.json_response({"error": f"stream {wanted.stream_id!r} exists"}, status=409)
        capability = self.registry.pick(wanted.model_id)
        if capability is None and wanted.model_id not in self.registry.capabilities:
            try:
                runner = pick_runner(self.runners, wanted.model_id)
            except RunnerError as exc:
                return web.json_response({"error": str(exc), "model_id": wanted.model_id}, status=exc.status)
            if runner is not None:
                return await self._start_on_runner(wanted, runner)
        if capability is None:
            known = wanted.model_id in self.registry.capabilities
            reason = (
                f"every container for model {wanted.model_id!r} is at capacity"
                if known
                else f"no container is registered for model {wanted.model_id!r}"
            )
            return web.json_response({"error": reason, "model_id": wanted.model_id}, status=503)
        capability.load += 1  # reserved before the container is called, as go-livepeer does
        stream = LocalStream(wanted, capability, self.trickle, self.base_url + "/ai/trickle/", self._http)
        self.streams[stream.stream_id] = stream
        status, body = await stream.start()
        if status >= 400:
            capability.load -= 1
            del self.streams[stream.stream_id]
            return self._container_answer(capability, status, body)
        return self._launch(stream)

    async def _start_on_runner(self, wanted: StreamRequest, runner: LiveRunner) -> web.Response:
        """The curl loop on a live runner: reserve a session (the stream id is its id), start there."""
        assert self._http is not None
        try:
            session = self.runners.reserve(runner, wanted.stream_id)
        except RunnerError as exc:
            return web.json_response({"error": str(exc), "model_id": wanted.model_id}, status=exc.status)
        stream = RunnerStream(
            wanted, self.runners, runner, session, self.trickle, self._http, self.settings.runner_start_path
        )
        self.streams[stream.stream_id] = stream
        status, body = await stream.start()
        if status >= 400:
            del self.streams[stream.stream_id]
            content_type = "application/json" if body.lstrip().startswith((b"{", b"[")) else "text/plain"
            return web.Response(status=status, body=body, content_type=content_type)
        return self._launch(stream)

    def _launch(self, stream: LocalStream) -> web.Response:
        """Run a started stream and answer with its URLs from the gateway's side."""
        task = asyncio.create_task(self._run(stream), name=f"stream {stream.stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # the gateway's view: an external source (source "none") publishes to publish_url
        answer = {"stream_id": stream.stream_id, **stream.gateway_urls()}
        headers = {
            f"X-{key.split('_')[0].title()}-Url": value
            for key, value in answer.items()
            if key.endswith("url")
        }
        return web.json_response(answer, headers=headers)

    async def _run(self, stream: LocalStream) -> None:
        try:
            await stream.run()
        finally:
            stream.capability.load -= 1
            self.streams.pop(stream.stream_id, None)
            self.ended.append(stream.statistics())

    async def _update(self, request: web.Request) -> web.Response:
        stream = self.streams.get(request.match_info["id"])
        if stream is None:
            return web.json_response({"error": "no such stream"}, status=404)
        status, body = await stream.update(await request.read())
        return self._container_answer(stream.capability, status, body)

    async def _stop(self, request: web.Request) -> web.Response:
        stream = self.streams.get(request.match_info["id"])
        if stream is None:
            return web.json_response({"error": "no such stream"}, status=404)
        status, body = await stream.stop(await request.read() or b"stream ended")
        await stream.wait_ended()
        if status == 401:
            return self._container_answer(stream.capability, status, body)
        return web.json_response({"stream_id": stream.stream_id, "status": "stopped"})

    def _container_answer(self, capability: Capability, status: int, body: bytes) -> web.Response:
        """A container's answer as go-livepeer passes it on: as is, but a 401 deletes the capability
        and becomes 500 (docs/protocol.md §2.3)."""
        if status == 401:
            log.warning("container %s answered 401: capability %s removed", capability.url, capability.name)
            self.registry.capabilities.pop(capability.name, None)
            status, body = 500, _WORKER_FAILURE
        content_type = "application/json" if body.lstrip().startswith((b"{", b"[")) else "text/plain"
        return web.Response(status=status, body=body, content_type=content_type)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "streams": [stream.statistics() for stream in self.streams.values()],
                "ended": list(self.ended),
                "capabilities": [c.public() for c in self.registry.capabilities.values()],
                "live_runners": [_runner_status(runner) for runner in self.runners.runners.values()],
            }
        )


def _runner_status(runner: LiveRunner) -> dict[str, Any]:
    described: dict[str, Any] = {
        "runner_id": runner.runner_id,
        "app": runner.info.app,
        "status": runner.info.status,
        "capacity": runner.info.capacity,
        "sessions": list(runner.sessions),
    }
    if runner.health is not None:
        described.update(
            static=True, label=runner.info.label, route=runner.route, health_url=runner.health.url
        )
    return described


def main(argv: list[str] | None = None) -> int:
    """``byoc orchestrator``: run the local development orchestrator."""
    import argparse

    from byoc.logs import configure_logging

    parser = argparse.ArgumentParser(
        prog="byoc orchestrator",
        description="A local DEVELOPMENT orchestrator for BYOC containers. It sends containers what "
        "go-livepeer's orchestrator sends (registration, /stream/start|params|stop, trickle channels) and "
        "plays the gateway with a synthetic input, so the production checklist's curl loop works on a "
        "laptop. It speaks go-livepeer's live-runner protocol too: runners register with "
        "POST /runners/heartbeat (the --orch-secret, then their heartbeat secret), clients reserve "
        "sessions at /apps/RUNNER/session and are proxied to the runner, and POST /live-video-to-video "
        "with a model that only a live runner serves (app live-video-to-video/MODEL) reserves a session "
        "there, starts the stream at runner_url/--runner-start-path and feeds it the synthetic input. "
        "Static live runners (byoc serve --protocol live-runner-static) are listed in --live-runner-config "
        "instead and followed through their health URL. "
        "It is not a replacement for go-livepeer: no payments, no gateways, no network.",
        epilog="Like go-livepeer it closes a stream's channels as soon as the container answers its stop, "
        "its readers start at the next segment (seq -1), and a container's 401 removes the capability "
        "and becomes 500. Unlike go-livepeer's orchestrator, which forwards starts past a container's "
        "capacity to the container (byoc's container refuses them itself with 503), it refuses them with "
        "503 as a gateway's selection would.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8935, help="port (default 8935, like go-livepeer)")
    parser.add_argument(
        "--orch-secret",
        default=DEFAULT_SECRET,
        help=f"registration secret of containers and live runners (default {DEFAULT_SECRET}; "
        "empty turns live-runner registration off, as in go-livepeer)",
    )
    parser.add_argument("--service-url", help="base URL containers reach this orchestrator at")
    parser.add_argument("--container", help="a container's URL, known without registration")
    parser.add_argument("--model-id", default="byoc", help="the capability (model id) of --container")
    parser.add_argument("--capacity", type=int, default=1, help="sessions --container accepts")
    parser.add_argument(
        "--heartbeat-interval",
        type=parse_duration,
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        help="how often live runners heartbeat, e.g. 5s (default 5s, like go-livepeer)",
    )
    parser.add_argument(
        "--heartbeat-ttl",
        type=parse_duration,
        default=DEFAULT_HEARTBEAT_TTL_S,
        help="a live runner without a heartbeat for this long is dropped and its sessions released "
        "(default 20s, like go-livepeer)",
    )
    parser.add_argument(
        "--runner-start-path",
        default=DEFAULT_START_PATH,
        help="where /live-video-to-video starts a stream on a live runner's session "
        f"(default {DEFAULT_START_PATH}: runner_url/{DEFAULT_START_PATH})",
    )
    parser.add_argument(
        "--live-runner-config",
        metavar="PATH",
        help='static live runners, a JSON file {"runners": [{"label", "runner_url", "app", "capacity", '
        '"health_url", ...}]} (go-livepeer\'s -liveRunnerConfig): each gets a runner_ id, never '
        "heartbeats and is ready while its health_url answers healthy_status_code (default 200); any "
        "other answer makes it unavailable and releases all its sessions. An invalid file stops the "
        "orchestrator at start. More can be added or updated (by label) with POST /registerLiveRunners "
        "and the same body; since this orchestrator serves everything on one port, that route wants "
        "the --orch-secret as its Authorization header",
    )
    parser.add_argument(
        "--live-runner-health-interval",
        type=parse_duration,
        default=DEFAULT_HEALTH_INTERVAL_S,
        help="how often static live runners' health URLs are fetched (3 s timeout), e.g. 250ms "
        "(default 5s, like go-livepeer)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    static_runners: tuple[StaticRunnerEntry, ...] = ()
    if args.live_runner_config:
        try:
            static_runners = load_config(args.live_runner_config)
        except ValueError as exc:
            parser.error(f"--live-runner-config {exc}")
    configure_logging(args.log_level)
    containers: tuple[Capability, ...] = ()
    if args.container:
        containers = (Capability(name=args.model_id, url=args.container.rstrip("/"), capacity=args.capacity),)
    settings = OrchestratorSettings(
        host=args.host,
        port=args.port,
        secret=args.orch_secret,
        service_url=args.service_url,
        containers=containers,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_ttl_s=args.heartbeat_ttl,
        runner_start_path=args.runner_start_path.strip("/"),
        static_runners=static_runners,
        live_runner_health_interval_s=args.live_runner_health_interval,
    )
    return asyncio.run(LocalOrchestrator(settings).serve())
