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
start of a running stream, 413 for oversized bodies, 503 with ``Retry-After`` when a start is refused.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from byoc import __version__
from byoc.errors import AdmissionRefused, InvalidRequest, ProcessorError, SessionExists, SessionNotFound
from byoc.serve.health import health_response
from byoc.serve.metrics import CONTENT_TYPE
from byoc.serve.validation import json_object, params_update, start_spec, stream_id_from_body
from byoc.spec import EndReason, StreamSpec

if TYPE_CHECKING:
    from byoc.serve.runtime import Runtime

__all__ = ["ROUTES", "build_app"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STREAM_ID_HEADER = "X-Stream-Id"
_RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")


def _runtime(request: web.Request) -> Runtime:
    return request.app[_RUNTIME]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


async def _body(request: web.Request) -> bytes:
    return await request.read()  # over max_body_bytes aiohttp raises 413 (turned into JSON below)


# --- stream routes ------------------------------------------------------------------------------


async def stream_start(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    spec = start_spec(json_object(await _body(request)), header_id=request.headers.get(STREAM_ID_HEADER))
    stream_id = await runtime.on_main(_start(runtime, spec))
    return _json({"status": "started", "stream_id": stream_id})


async def _start(runtime: Runtime, spec: StreamSpec) -> str:
    return (await runtime.manager.start(spec)).stream_id


async def live_video_to_video(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    body = json_object(await _body(request))
    spec = start_spec(body, header_id=request.headers.get(STREAM_ID_HEADER), lv2v=True)
    stream_id = await runtime.on_main(_start(runtime, spec))
    urls = {key: body.get(key, "") for key in ("publish_url", "subscribe_url", "control_url")}
    return _json({**urls, "stream_id": stream_id})


async def stream_params(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    raw = await _body(request)
    params = params_update(raw)
    stream_id = request.headers.get(STREAM_ID_HEADER) or stream_id_from_body(raw)
    session = runtime.manager.resolve(stream_id)
    if session is None:
        raise SessionNotFound(
            f"no session {stream_id!r}" if stream_id else "no stream id given and not one session"
        )
    session.update_params(params)
    return _json({"status": "updated", "stream_id": session.stream_id})


async def stream_stop(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    raw = await _body(request)  # any body: go-livepeer sends plain text, e.g. "stream ended"
    stream_id = request.headers.get(STREAM_ID_HEADER) or stream_id_from_body(raw)
    stopped = await runtime.on_main(_stop(runtime, stream_id))
    if stopped is None:
        return _json({"status": "not running", "stream_id": stream_id})
    return _json({"status": "stopping", "stream_id": stopped})


async def _stop(runtime: Runtime, stream_id: str | None) -> str | None:
    session = runtime.manager.resolve(stream_id)
    if session is None:
        return None
    runtime.manager.stop(session.stream_id, EndReason.STOPPED)
    return session.stream_id


async def stream_status(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    wanted = request.query.get("stream_id") or request.headers.get(STREAM_ID_HEADER)
    if wanted:
        return _json(runtime.manager.get(wanted).statistics().as_dict())
    return _json({"sessions": [stats.as_dict() for stats in runtime.manager.statistics()]})


# --- runtime routes -----------------------------------------------------------------------------


async def health(request: web.Request) -> web.StreamResponse:
    runtime = _runtime(request)
    status, body = health_response(runtime.health_view(), runtime.settings.health_style)
    return _json(body, status=status)


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_runtime(request).metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def version(request: web.Request) -> web.StreamResponse:
    settings = _runtime(request).settings
    return _json(
        {
            "pipeline": "byoc",
            "model_id": settings.capability_name,
            "version": __version__,
            "processor": settings.processor,
        }
    )


ROUTES: list[tuple[str, str, Handler, bool]] = [
    # method, path, handler, requires the bearer token (when one is configured)
    ("POST", "/stream/start", stream_start, True),
    ("POST", "/stream/params", stream_params, True),
    ("POST", "/stream/stop", stream_stop, True),
    ("POST", "/live-video-to-video", live_video_to_video, True),
    ("GET", "/stream/status", stream_status, True),
    ("GET", "/health", health, False),
    ("GET", "/metrics", metrics, False),
    ("GET", "/version", version, False),
]


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
    except SessionNotFound as exc:
        return _error(404, str(exc))
    except SessionExists as exc:
        return _error(409, str(exc))
    except AdmissionRefused as exc:
        return _json({"error": exc.reason}, status=503, headers={"Retry-After": str(exc.retry_after_s)})
    except ProcessorError as exc:
        return _error(500, f"the processor could not start the session: {exc}")
    except web.HTTPRequestEntityTooLarge:
        limit = _runtime(request).settings.max_body_bytes
        return _error(413, f"request body too large (limit {limit} bytes)")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        _runtime(request).metrics.error("http")
        return _error(500, "internal error")


def build_app(runtime: Runtime) -> web.Application:
    middlewares = [_errors]
    if runtime.settings.token:
        protected = {handler for _, _, handler, needs_token in ROUTES if needs_token}
        middlewares.append(_auth_middleware(runtime.settings.token, protected))
    app = web.Application(middlewares=middlewares, client_max_size=runtime.settings.max_body_bytes)
    app[_RUNTIME] = runtime
    for method, path, handler, _ in ROUTES:
        app.router.add_route(method, path, handler)
    return app
