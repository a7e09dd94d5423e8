"""A small go-livepeer orchestrator, live-runner side only, for injecting faults (docs/protocol.md §10).

It answers ``POST /runners/heartbeat`` (the orchestrator's secret registers, the heartbeat secret keeps
the registration), ``POST /runners/{id}/unregister``, and a session's ``POST``/``DELETE .../channels``
and ``POST .../stop``, creating the channels on a byoc trickle server. Every request is recorded in
order. Faults: :meth:`forget` (the next heartbeat gets 404, as after a TTL or a restart), a wrong
``secret`` (401), sessions :meth:`reserve`\\ d, :meth:`release`\\ d (with an O2R event) or
:meth:`drop`\\ ped (without one, so only the heartbeat's ``session_ids`` tell).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from byoc.dev.trickle_server import RunningTrickle
from byoc.trickle.publisher import TricklePublisher
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.support import serve_app

RUNNER_ID = "runner-1"


@dataclass
class Call:
    """One request the orchestrator handled."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0

    @property
    def authorization(self) -> str:
        return self.headers.get("Authorization", "")


@dataclass
class FakeLiveOrchestrator:
    trickle: RunningTrickle
    http: aiohttp.ClientSession
    secret: str = "orch-secret"
    interval: str = "1m"
    ttl: str = "3m"
    calls: list[Call] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)
    url: str = ""
    registrations: int = 0
    forgotten: bool = False
    _o2r: TricklePublisher | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def heartbeat_secret(self) -> str:
        return f"hb-secret-{self.registrations}"

    def session_control(self, sid: str) -> str:
        return f"{self.url}/runner/{RUNNER_ID}/session/{sid}"

    def heartbeats(self) -> list[Call]:
        return [call for call in self.calls if call.path == "/runners/heartbeat"]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(condition)

    # --- faults and session changes ------------------------------------------------------------------

    def forget(self) -> None:
        """Forget the runner, as after its TTL expired: heartbeats with its secret get 404."""
        self.forgotten = True

    async def reserve(self, sid: str) -> None:
        """Reserve a session; a registered runner hears of it on O2R (a static runner has no O2R)."""
        self.session_ids.append(sid)
        if self._o2r is not None:
            await self._tell({"event": "reserved", "session": sid})

    async def release(self, sid: str) -> None:
        self.session_ids.remove(sid)
        await self._tell({"event": "released", "session": sid})

    def drop(self, sid: str) -> None:
        self.session_ids.remove(sid)

    async def _tell(self, message: dict[str, Any]) -> None:
        assert self._o2r is not None, "the runner has not registered"
        await self._o2r.write_segment(json.dumps({**message, "timestamp": "now"}).encode() + b"\n")

    # --- handlers -------------------------------------------------------------------------------------

    async def _record(self, request: web.Request, status: int, answer: Any = None) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw.strip() else None
        async with self._changed:
            self.calls.append(Call(request.method, request.path, dict(request.headers), body, status))
            self._changed.notify_all()
        if answer is None:
            return web.Response(status=status)
        return web.json_response(answer, status=status)

    async def heartbeat(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if given == self.secret:
            self.registrations += 1
            self.forgotten = False
            name = f"o2r-{self.registrations}"
            self.trickle.server.create_channel(name, "application/jsonl")
            if self._o2r is not None:
                await self._o2r.close()
            url = f"{self.trickle.base_url}{name}"
            self._o2r = TricklePublisher(url, session=self.http, settings=TEST_CLIENT_SETTINGS)
            o2r = {"name": "o2r", "channel_name": name, "url": url, "mime_type": "application/jsonl"}
            return await self._record(
                request, 200, {**self._answer(), "heartbeat_secret": self.heartbeat_secret, "o2r": o2r}
            )
        if given == self.heartbeat_secret and self.registrations and not self.forgotten:
            return await self._record(request, 200, self._answer())
        if self.forgotten:
            return await self._record(request, 404, {"error": "runner not found"})
        return await self._record(request, 401, {"error": "invalid authorization"})

    def _answer(self) -> dict[str, Any]:
        return {
            "runner_id": RUNNER_ID,
            "orchestrator": self.url,
            "heartbeat_interval": self.interval,
            "heartbeat_ttl": self.ttl,
            "session_ids": list(self.session_ids),
        }

    async def unregister(self, request: web.Request) -> web.StreamResponse:
        return await self._record(request, 204)

    async def channels(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        if request.method == "DELETE":
            names = [name for name in self.trickle.server.channel_names() if name.startswith(f"{sid}-")]
            for name in names:
                self.trickle.server.close_channel(name)
            return await self._record(request, 200, {"deleted": names})
        wanted = json.loads(await request.read())["channels"]
        answer = []
        for channel in wanted:
            name = f"{sid}-{channel['name']}"
            if name not in self.trickle.server.channel_names():
                self.trickle.server.create_channel(name, channel["mime_type"])
            url = f"{self.trickle.base_url}{name}"
            answer.append({**channel, "channel_name": name, "url": url, "internal_url": url})
        return await self._record(request, 200, {"channels": answer})

    async def stop(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        if sid in self.session_ids:
            self.session_ids.remove(sid)
        return await self._record(request, 204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/runners/heartbeat", self.heartbeat)
        app.router.add_post("/runners/{rid}/unregister", self.unregister)
        app.router.add_route("*", "/runner/{rid}/session/{sid}/channels", self.channels)
        app.router.add_post("/runner/{rid}/session/{sid}/stop", self.stop)
        return app


@asynccontextmanager
async def fake_live_orchestrator(
    trickle: RunningTrickle, http: aiohttp.ClientSession, **options: Any
) -> AsyncIterator[FakeLiveOrchestrator]:
    orchestrator = FakeLiveOrchestrator(trickle, http, **options)
    async with serve_app(orchestrator.app()) as url:
        orchestrator.url = url
        try:
            yield orchestrator
        finally:
            if orchestrator._o2r is not None:
                await orchestrator._o2r.close()
