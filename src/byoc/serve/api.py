"""The container's HTTP API: every route in one table, one error middleware, optional bearer auth.

=====  ======================  ===========================================================
POST   /stream/start           BYOC start (go-livepeer's orchestrator); 200 once the session runs
POST   /stream/params          parameter update, routed by X-Stream-Id
POST   /stream/stop            stop, routed by X-Stream-Id; idempotent, any body, unknown ids are 200
POST   /live-video-to-video    ai-runner style start, mapped onto the same sessions
GET    /stream/status          every session's statistics, or one (?stream_id= or X-Stream-Id)
GET    /health                 runtime state; answers in milliseconds whatever the processors do
GET    /metrics                Prometheus
GET    /version                version, processor, capability
=====  ======================  ===========================================================

Errors are JSON ``{"error": ..., "field"?: ...}``: 400 for malformed input, 401 only for a wrong bearer
token (go-livepeer deletes the capability on a 401), 404 for params to an unknown stream, 409 for a
start of a running stream, 408 for a body that does not arrive within ``body_timeout_s``, 413 for
oversized bodies, 503 with ``Retry-After`` when a start is refused or too many request bodies are being
read at once (``body_memory_bytes``). A client that goes away mid-request is no error of the server.

Thread ownership (docs/architecture.md): the handlers run on the API thread, and sessions and the
session manager are mutated only on the runtime's main loop. So the API sees the runtime only through
:class:`Control`: commands (start, params, stop) are handed over to the main loop by its implementation
(byoc.serve.control.RuntimeControl, the one place that makes that hop), and reads (status, health,
metrics) are snapshots that never wait for the main loop. This module does not import the runtime.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from byoc import __version__
from byoc.errors import AdmissionRefused, InvalidRequest, ProcessorError, SessionExists, SessionNotFound
from byoc.serve.health import HealthView, RuntimeState, health_response
from byoc.serve.listener import HealthAnswer
from byoc.serve.metrics import CONTENT_TYPE
from byoc.serve.validation import (
    RequestLimits,
    checked_stream_id,
    json_object,
    params_update,
    start_spec,
    stream_id_from_body,
)
from byoc.session.stats import SessionStatistics
from byoc.spec import StreamSpec

__all__ = [
    "REPORT_STALE_S",
    "ROUTES",
    "RUNTIME_ROUTES",
    "STREAM_ROUTES",
    "ApiSettings",
    "Control",
    "Route",
    "build_app",
    "health_answer",
    "read_body",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STREAM_ID_HEADER = "X-Stream-Id"


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The settings the API itself needs."""

    token: str | None = None
    """Bearer token of the stream routes; None: no authentication."""
    max_body_bytes: int = 1024 * 1024
    body_timeout_s: float = 30.0
    """How long a request may take to send its body."""
    body_memory_bytes: int = 8 * 1024 * 1024
    """Bytes of request bodies held at once over all requests; more wait up to ``BODY_WAIT_S``, then 503."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    health_style: str = "byoc"
    healthy_while_draining: bool = False
    """Answer /health with 200 (and ``draining`` in the body) while draining: an orchestrator that polls
    the runner's health releases every session on one other answer (a static live runner)."""
    capability: str = ""
    """The model id ``/version`` reports."""
    processor: str = ""
    stop_answer_s: float = 0.0
    """How long ``/stream/stop`` waits for the session's last output segment and final event before
    it answers (docs/protocol.md §2.5); 0: at once."""


class Control(Protocol):
    """What the API may ask of the runtime; every method is called on the API thread.

    The commands hand their work to the main loop and wait for it there; the reads answer at once from
    snapshots, so ``/health`` and ``/metrics`` answer even while the main loop is busy.
    """

    @property
    def settings(self) -> ApiSettings: ...

    async def start(self, spec: StreamSpec) -> str:
        """Start a session and wait until it runs; its stream id (SessionExists, AdmissionRefused,
        ProcessorError when it cannot)."""
        ...

    async def update_params(self, stream_id: str | None, params: Mapping[str, Any]) -> str:
        """Hand a checked parameter update to the session ``stream_id`` means (by id, or the only
        one when None); its stream id, or SessionNotFound."""
        ...

    async def stop(self, stream_id: str | None) -> str | None:
        """Ask the session ``stream_id`` means to end and wait (up to ``settings.stop_answer_s``) until
        its last output segment and final event are out; its stream id, or None when there is none."""
        ...

    def status(self, stream_id: str) -> SessionStatistics:
        """One session's statistics, or SessionNotFound."""
        ...

    def statuses(self) -> list[SessionStatistics]:
        """Every running session's statistics."""
        ...

    def health(self) -> HealthView: ...

    def render_metrics(self) -> bytes: ...

    def count_error(self, kind: str) -> None:
        """Count an error of the API itself (``http``) in the runtime's metrics."""
        ...


_CONTROL: web.AppKey[Control] = web.AppKey("control")


def _control(request: web.Request) -> Control:
    return request.app[_CONTROL]


class _ClientGone(Exception):
    """The client closed its connection before its request was read."""


class BodyBudget:
    """The request bytes the API holds at once, so that concurrent large bodies cannot add up.

    A request reserves its ``Content-Length`` (the largest body allowed when it has none) until it is
    answered. One request may always proceed alone, however large. Used on the API loop only.
    """

    def __init__(self, total_bytes: int) -> None:
        self._total = total_bytes
        self._used = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, size: int, wait_s: float) -> AsyncIterator[None]:
        """Hold ``size`` bytes, waiting up to ``wait_s`` for them (HTTPServiceUnavailable after)."""

        def fits() -> bool:
            return self._used == 0 or self._used + size <= self._total

        async with self._changed:
            try:
                async with asyncio.timeout(wait_s):
                    await self._changed.wait_for(fits)
            except TimeoutError:
                raise web.HTTPServiceUnavailable(
                    reason="too many request bodies are being read; try again", headers={"Retry-After": "1"}
                ) from None
            self._used += size
        try:
            yield
        finally:
            async with self._changed:
                self._used -= size
                self._changed.notify_all()


BODY_WAIT_S = 2.0
"""How long a request waits for room in the :class:`BodyBudget` before a 503."""
_BUDGET: web.AppKey[BodyBudget] = web.AppKey("body_budget")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


async def _body(request: web.Request) -> bytes:
    """The request's body, read within ``body_timeout_s`` (408 after); over ``max_body_bytes``
    aiohttp raises 413 (turned into JSON below)."""
    try:
        async with asyncio.timeout(_control(request).settings.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason="the request body did not arrive in time") from None
    except ConnectionError:
        raise _ClientGone from None


read_body = _body
"""The body of a request to a protocol's own route, within the same limits as every other route."""


def _stream_id(request: web.Request, raw: bytes = b"") -> str | None:
    """The stream a request names: ``X-Stream-Id``, else an id in its JSON body; None if neither (an
    empty header counts as none)."""
    header = request.headers.get(STREAM_ID_HEADER)
    if header:
        return checked_stream_id(header, STREAM_ID_HEADER)
    return stream_id_from_body(raw)


# --- stream routes ------------------------------------------------------------------------------


async def stream_start(request: web.Request) -> web.StreamResponse:
    limits = _control(request).settings.limits
    body = json_object(await _body(request))
    spec = start_spec(body, header_id=request.headers.get(STREAM_ID_HEADER), limits=limits)
    stream_id = await _control(request).start(spec)
    return _json({"status": "started", "stream_id": stream_id})


async def live_video_to_video(request: web.Request) -> web.StreamResponse:
    body = json_object(await _body(request))
    limits = _control(request).settings.limits
    spec = start_spec(body, header_id=request.headers.get(STREAM_ID_HEADER), lv2v=True, limits=limits)
    stream_id = await _control(request).start(spec)
    urls = {key: body.get(key, "") for key in ("publish_url", "subscribe_url", "control_url")}
    return _json({**urls, "stream_id": stream_id})


async def stream_params(request: web.Request) -> web.StreamResponse:
    raw = await _body(request)
    params = params_update(raw, _control(request).settings.limits)
    stream_id = _stream_id(request, raw)
    updated = await _control(request).update_params(stream_id, params)
    return _json({"status": "updated", "stream_id": updated})


async def stream_stop(request: web.Request) -> web.StreamResponse:
    raw = await _body(request)  # any body: go-livepeer sends plain text, e.g. "stream ended"
    stream_id = _stream_id(request, raw)
    stopped = await _control(request).stop(stream_id)
    if stopped is None:
        return _json({"status": "not running", "stream_id": stream_id})
    return _json({"status": "stopping", "stream_id": stopped})


async def stream_status(request: web.Request) -> web.StreamResponse:
    control = _control(request)
    query = request.query.get("stream_id")
    wanted = checked_stream_id(query, "stream_id") if query else _stream_id(request)
    if wanted:
        return _json(control.status(wanted).as_dict())
    return _json({"sessions": [stats.as_dict() for stats in control.statuses()]})


# --- runtime routes -----------------------------------------------------------------------------


REPORT_STALE_S = 5.0
"""How long the listener process (byoc.serve.listener) gives the last answer it was sent; after that it
says the runtime stopped reporting."""


def _health_of(view: HealthView, settings: ApiSettings) -> tuple[int, dict[str, Any]]:
    return health_response(
        view, settings.health_style, healthy_while_draining=settings.healthy_while_draining
    )


async def health(request: web.Request) -> web.StreamResponse:
    control = _control(request)
    status, body = _health_of(control.health(), control.settings)
    return _json(body, status=status)


def health_answer(control: Control) -> HealthAnswer:
    """``/health`` as the listener process gives it: this answer, and the ERROR one for when this
    process has not sent another for :data:`REPORT_STALE_S`."""
    view = control.health()
    status, body = _health_of(view, control.settings)
    silent = f"the runtime has not reported its state for over {REPORT_STALE_S:g}s"
    stale_status, stale_body = _health_of(
        dataclasses.replace(view, state=RuntimeState.ERROR, error=silent), control.settings
    )
    return HealthAnswer(status, body, stale_status, stale_body, time.monotonic(), REPORT_STALE_S)


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_control(request).render_metrics(), headers={"Content-Type": CONTENT_TYPE})


async def version(request: web.Request) -> web.StreamResponse:
    settings = _control(request).settings
    return _json(
        {
            "pipeline": "byoc",
            "model_id": settings.capability,
            "version": __version__,
            "processor": settings.processor,
        }
    )


Route = tuple[str, str, Handler, bool]
"""method, path, handler, requires the bearer token (when one is configured)"""

STREAM_ROUTES: list[Route] = [
    # the BYOC protocol's routes (byoc.serve.protocols.byoc serves them)
    ("POST", "/stream/start", stream_start, True),
    ("POST", "/stream/params", stream_params, True),
    ("POST", "/stream/stop", stream_stop, True),
    ("POST", "/live-video-to-video", live_video_to_video, True),
]
RUNTIME_ROUTES: list[Route] = [
    # served whatever the protocol
    ("GET", "/stream/status", stream_status, True),
    ("GET", "/health", health, False),
    ("GET", "/metrics", metrics, False),
    ("GET", "/version", version, False),
]
ROUTES: list[Route] = STREAM_ROUTES + RUNTIME_ROUTES


# --- middleware ---------------------------------------------------------------------------------


def _auth_middleware(token: str, protected: set[Handler]) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if handler in protected:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "missing or wrong bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return check


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidRequest as exc:
        return _error(400, exc.message, field=exc.field)
    except _ClientGone:
        log.debug("%s %s: the client went away before sending its whole body", request.method, request.path)
        return _error(400, "the request body broke off")
    except SessionNotFound as exc:
        return _error(404, str(exc))
    except SessionExists as exc:
        return _error(409, str(exc))
    except AdmissionRefused as exc:
        return _json({"error": exc.reason}, status=503, headers={"Retry-After": str(exc.retry_after_s)})
    except ProcessorError as exc:
        return _error(500, f"the processor could not start the session: {exc}")
    except web.HTTPRequestEntityTooLarge:
        limit = _control(request).settings.max_body_bytes
        return _error(413, f"request body too large (limit {limit} bytes)")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _json({"error": exc.reason}, status=exc.status, headers=_passed_on(exc))
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        _control(request).count_error("http")
        return _error(500, "internal error")


def _passed_on(exc: web.HTTPException) -> dict[str, str]:
    return {name: exc.headers[name] for name in ("Retry-After", "Allow") if name in exc.headers}


@web.middleware
async def _budget(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests with a body wait for room in the app's :class:`BodyBudget`; oversized ones get 413
    before a byte of their body is read."""
    if not request.body_exists:
        return await handler(request)
    settings = _control(request).settings
    size = request.content_length if request.content_length is not None else settings.max_body_bytes
    if size > settings.max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=settings.max_body_bytes, actual_size=size)
    async with request.app[_BUDGET].reserve(size, BODY_WAIT_S):
        return await handler(request)


def build_app(control: Control, routes: Sequence[Route] = STREAM_ROUTES) -> web.Application:
    """The API application, serving ``control`` (see :class:`Control`): the runtime's own routes and
    ``routes``, those of the protocol the container speaks."""
    settings = control.settings
    served = [*routes, *RUNTIME_ROUTES]
    middlewares = [_errors, _budget]
    if settings.token:
        protected = {handler for _, _, handler, needs_token in served if needs_token}
        middlewares.append(_auth_middleware(settings.token, protected))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[_CONTROL] = control
    app[_BUDGET] = BodyBudget(settings.body_memory_bytes)
    for method, path, handler, _ in served:
        app.router.add_route(method, path, handler)
    return app
