"""go-livepeer's live-runner HTTP side (``server/ai_http.go``, ``doc/live-runner.md``) for the local
orchestrator.

====== ==================================================== =============================================
POST   /runners/heartbeat                                   register (orchestrator secret), then refresh
                                                            (heartbeat secret)
POST   /runners/{runner}/unregister                         heartbeat secret; 204, releases its sessions
GET    /discovery                                           the ready runners, as clients discover them
POST   /apps/{runner}/session                               reserve: session_id, app_url, control_url
POST   /apps/{runner}/session/{session}/stop                the client's stop: 204, releases the session
\\*    /apps/{runner}/session/{session}/app/{path}          proxied to ``runner_url/path``
\\*    /apps/{runner}/app/{path}                            single-shot: reserve, proxy, release
POST   /runner/{runner}/session/{session}/channels          ``Livepeer-Session-Token``: create channels
DELETE /runner/{runner}/session/{session}/channels          ... delete them
POST   /runner/{runner}/session/{session}/proxy             ... a random public URL for the session's app
                                                            (or another URL on the runner's host)
POST   /runner/{runner}/session/{session}/stop              ... the runner releases its own session
\\*    /run/{proxy}/{path}                                  a generated proxy URL (go-livepeer's default
                                                            template); also a ``proxy`` single-shot
                                                            runner's route
====== ==================================================== =============================================

Errors are plain text as Go's ``http.Error`` writes them. Releasing a session, for whatever reason,
also cuts its proxied requests that are still running, as livepeer/node does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from byoc.dev.orchestrator.runner_request import parse_heartbeat
from byoc.dev.orchestrator.runners import (
    MAX_CHANNELS_PER_REQUEST,
    LiveRunner,
    RunnerError,
    RunnerRegistry,
    RunnerSession,
)
from byoc.trickle.client import TrickleClientSettings, create_client_session

__all__ = ["LiveRunnerRoutes", "session_headers", "target_url"]

log = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)


def _error(status: int, message: str) -> web.Response:
    """What Go's ``http.Error`` sends: plain text, the message and a newline."""
    response = web.Response(status=status, text=message + "\n", content_type="text/plain")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _json(data: object) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), content_type="application/json")


def session_headers(registry: RunnerRegistry, runner: LiveRunner, session: RunnerSession) -> dict[str, str]:
    """The four headers every request proxied to a runner carries (they replace any the client sent)."""
    control = f"{registry.base_url}/runner/{runner.route}/session/{session.session_id}"
    return {
        "Livepeer-Runner-Route": runner.route,
        "Livepeer-Session-Id": session.session_id,
        "Livepeer-Session-Token": runner.session_token(session.session_id),
        "Livepeer-Session-Control": control,
    }


def target_url(runner_url: str, app_path: str, query: str) -> URL:
    """``runner_url`` with ``app_path`` appended (as Go's ``url.JoinPath``) and the client's query."""
    base = URL(runner_url)
    path = posixpath.normpath("/" + "/".join(p.strip("/") for p in (base.path, app_path) if p.strip("/")))
    if app_path.endswith("/") and path != "/":
        path += "/"
    target = base.with_path(path)
    return URL(str(target) + "?" + query, encoded=True) if query else target


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError as exc:
        raise RunnerError(400, f"invalid JSON: {exc}") from None


def _channel_list(body: Any) -> list[Any]:
    channels = body.get("channels") if isinstance(body, dict) else None
    if channels is not None and not isinstance(channels, list):
        raise RunnerError(400, "json: cannot unmarshal channels: not an array")
    if not channels:
        raise RunnerError(400, "channels is required")
    if len(channels) > MAX_CHANNELS_PER_REQUEST:
        raise RunnerError(400, f"channels cannot contain more than {MAX_CHANNELS_PER_REQUEST} entries")
    return channels


class LiveRunnerRoutes:
    """The live-runner routes over a :class:`RunnerRegistry`, and the loops that keep it current."""

    def __init__(self, registry: RunnerRegistry) -> None:
        self.registry = registry
        self._http: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_post("/runners/heartbeat", self._heartbeat)
        router.add_post("/runners/{runner}/unregister", self._unregister)
        router.add_get("/discovery", self._discovery)
        router.add_post("/apps/{runner}/session", self._reserve)
        router.add_post("/apps/{runner}/session/{session}/stop", self._client_stop)
        router.add_route("*", "/apps/{runner}/session/{session}/app/{path:.*}", self._proxy_session)
        router.add_route("*", "/apps/{runner}/app/{path:.*}", self._proxy_single_shot)
        router.add_route("*", "/run/{proxy}", self._proxy_generated)
        router.add_route("*", "/run/{proxy}/{path:.*}", self._proxy_generated)
        router.add_post("/runner/{runner}/session/{session}/channels", self._create_channels)
        router.add_delete("/runner/{runner}/session/{session}/channels", self._delete_channels)
        router.add_post("/runner/{runner}/session/{session}/proxy", self._create_proxy)
        router.add_post("/runner/{runner}/session/{session}/stop", self._runner_stop)
        app.cleanup_ctx.append(self._lifecycle)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        async with create_client_session(TrickleClientSettings()) as http:
            self._http = http
            loops = [asyncio.create_task(self._sweep_loop()), asyncio.create_task(self._keepalive_loop())]
            yield
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for runner in list(self.registry.runners.values()):
                for session_id in list(runner.sessions):
                    self.registry.release(runner, session_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.registry.heartbeat_interval_s)
            self.registry.sweep()

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.registry.o2r_interval_s)
            self.registry.send_keepalives()

    # --- runners ----------------------------------------------------------------------------------

    async def _heartbeat(self, request: web.Request) -> web.StreamResponse:
        try:
            info = parse_heartbeat(await request.read())
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            return _json(self.registry.heartbeat(info, request.headers.get("Authorization", "")))
        except RunnerError as exc:
            return _error(exc.status, str(exc))

    async def _unregister(self, request: web.Request) -> web.StreamResponse:
        try:
            self.registry.unregister(request.match_info["runner"], request.headers.get("Authorization", ""))
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        return web.Response(status=204)

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        entry: dict[str, Any] = {"address": self.registry.base_url}
        runners = [self._discovered(runner) for runner in self.registry.discovery()]
        if runners:
            entry["runners"] = runners
        return _json([entry])

    def _discovered(self, runner: LiveRunner) -> dict[str, Any]:
        info = runner.info
        if info.mode == "single-shot" and info.proxy:
            url = self._proxy_url(runner.route)
        else:
            kind = "app" if info.mode == "single-shot" else "session"
            url = f"{self.registry.base_url}/apps/{runner.route}/{kind}"
        described: dict[str, Any] = {"url": url}
        if info.gpu:
            described["gpu"] = info.gpu
        described["app"] = info.app
        described.update({key: value for key in ("version", "metadata") if (value := getattr(info, key))})
        used = len(runner.sessions)
        return {
            **described,
            "mode": info.mode,
            "capacity": info.capacity,
            "capacity_used": used,
            "capacity_available": info.capacity - used,
        }

    # --- clients ----------------------------------------------------------------------------------

    async def _reserve(self, request: web.Request) -> web.StreamResponse:
        runner_id = request.match_info["runner"]
        try:
            runner = self.registry.find_ready(runner_id)
            if runner.info.mode != "persistent":
                return _error(400, "only persistent runners have sessions")
            session = self.registry.reserve(runner)
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        control_url = f"{self.registry.base_url}/apps/{runner_id}/session/{session.session_id}"
        app_url = control_url + "/app"
        if runner.info.proxy:  # the app behind a random proxy URL instead
            app_url = self._proxy_url(self.registry.create_proxy(runner, session))
        return _json({"session_id": session.session_id, "app_url": app_url, "control_url": control_url})

    def _proxy_url(self, proxy_id: str) -> str:
        return f"{self.registry.base_url}/run/{proxy_id}"

    async def _client_stop(self, request: web.Request) -> web.StreamResponse:
        try:  # a hidden runner's sessions can still be stopped; an unknown session is no error
            runner = self.registry.find(request.match_info["runner"])
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        self.registry.release(runner, request.match_info["session"])
        return web.Response(status=204)

    async def _proxy_session(self, request: web.Request) -> web.StreamResponse:
        try:
            runner, session = self.registry.session(
                request.match_info["runner"], request.match_info["session"]
            )
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        return await self._proxy(request, runner, session, runner.info.runner_url)

    async def _proxy_generated(self, request: web.Request) -> web.StreamResponse:
        """``/run/{proxy}/...``: a session's proxy, or a proxied single-shot runner's own route."""
        proxy_id = request.match_info["proxy"]
        try:
            runner, session, target = self.registry.resolve_proxy(proxy_id)
        except RunnerError as exc:
            single = self.registry.runners.get(proxy_id)
            if single is not None and single.info.proxy and single.info.mode == "single-shot":
                return await self._proxy_single_shot(request, proxy_id)
            return _error(exc.status, str(exc))
        return await self._proxy(request, runner, session, target)

    async def _proxy_single_shot(self, request: web.Request, runner_id: str = "") -> web.StreamResponse:
        try:
            runner = self.registry.find_ready(runner_id or request.match_info["runner"])
            if runner.info.mode != "single-shot":
                return _error(400, "runner is not single-shot")
            session = self.registry.reserve(runner)
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        try:
            return await self._proxy(request, runner, session, runner.info.runner_url)
        finally:
            self.registry.release(runner, session.session_id)

    async def _proxy(
        self, request: web.Request, runner: LiveRunner, session: RunnerSession, base: str
    ) -> web.StreamResponse:
        """Forward the request to the runner and its answer back, both streamed, until either ends or the
        session is released (which cancels this task)."""
        assert self._http is not None
        task = asyncio.current_task()
        assert task is not None
        session.requests.add(task)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        headers.update(session_headers(self.registry, runner, session))
        if request.remote:
            forwarded = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{forwarded}, {request.remote}" if forwarded else request.remote
        path = request.match_info.get("path", "")
        target = target_url(base, path, request.rel_url.raw_query_string)
        body = request.content.iter_any() if request.body_exists else None
        try:
            async with self._http.request(
                request.method, target, headers=headers, data=body, allow_redirects=False
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in _HOP_BY_HOP:
                        response.headers.add(key, value)
                await response.prepare(request)
                with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                return response
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("live runner %s: proxying to %s failed: %s", runner.runner_id, target, exc)
            return _error(502, str(exc) or type(exc).__name__)
        finally:
            session.requests.discard(task)

    # --- runner callbacks -------------------------------------------------------------------------

    def _callback_session(self, request: web.Request) -> tuple[LiveRunner, RunnerSession]:
        return self.registry.authorised_session(
            request.match_info["runner"],
            request.match_info["session"],
            request.headers.get("Livepeer-Session-Token", ""),
        )

    async def _create_channels(self, request: web.Request) -> web.StreamResponse:
        try:
            _, session = self._callback_session(request)
            created = []
            for wanted in _channel_list(await _json_body(request)):
                if not isinstance(wanted, dict):
                    raise RunnerError(400, "json: cannot unmarshal a channel: not an object")
                name, mime_type = wanted.get("name") or "", wanted.get("mime_type") or ""
                if not isinstance(name, str) or not isinstance(mime_type, str):
                    raise RunnerError(400, "json: channel name and mime_type must be strings")
                created.append(self.registry.create_channel(session, name, mime_type).public())
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        return _json({"channels": created})

    async def _delete_channels(self, request: web.Request) -> web.StreamResponse:
        try:
            _, session = self._callback_session(request)
            names = _channel_list(await _json_body(request))
            if not all(isinstance(name, str) for name in names):
                raise RunnerError(400, "json: channels must be an array of names")
            for name in names:
                self.registry.delete_channel(session, name)
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        return _json({"deleted": names})

    async def _create_proxy(self, request: web.Request) -> web.StreamResponse:
        try:
            runner, session = self._callback_session(request)
            raw = await request.read()
            body = json.loads(raw) if raw.strip() else {}
            target = body.get("target_url") if isinstance(body, dict) else None
            if target is not None and not isinstance(target, str):
                raise RunnerError(400, "json: target_url must be a string")
            proxy_id = self.registry.create_proxy(runner, session, target or "")
        except ValueError as exc:
            return _error(400, f"invalid JSON: {exc}")
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        return _json({"proxy_id": proxy_id, "url": self._proxy_url(proxy_id)})

    async def _runner_stop(self, request: web.Request) -> web.StreamResponse:
        try:
            runner, session = self._callback_session(request)
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        self.registry.release(runner, session.session_id)
        return web.Response(status=204)
