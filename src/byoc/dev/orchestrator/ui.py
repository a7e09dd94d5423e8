"""The JSON behind the orchestrator's live page (``page.py``), and its thumbnails.

===== ================================ ============================================================
GET   /                                the page
GET   /ui/state                        streams (statistics and the last minute's series), containers
                                       (health, capacity, sessions), live runners, models, events,
                                       and which thumbnailers run
GET   /ui/streams/{id}/thumbnail.jpg   the stream's latest processed frame, 160 px wide; 204 until
                                       one is decoded (``thumbnails.py``)
===== ================================ ============================================================

Starting and stopping streams go through the orchestrator's own routes (``app.py``).

Nothing here runs unless the page is open: a ``/ui/state`` request starts a sampler that, once a
second, fetches every container's ``/health`` and ``/stream/status`` and appends each stream's fps,
frame latency and dropped frames to its series (``HISTORY`` samples); it stops ``ACTIVE_S`` after the
last request. Thumbnails are decoded only while they are asked for (``thumbnails.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from byoc.dev.orchestrator.page import PAGE
from byoc.dev.orchestrator.streams import LocalStream
from byoc.dev.orchestrator.thumbnails import Thumbnails

if TYPE_CHECKING:
    from byoc.dev.orchestrator.app import LocalOrchestrator

__all__ = ["ACTIVE_S", "HISTORY", "SAMPLE_INTERVAL_S", "LiveUi", "summarize_event"]

SAMPLE_INTERVAL_S = 1.0
HISTORY = 60
ACTIVE_S = 30.0
_EVENTS_SHOWN = 40
_FETCH_TIMEOUT_S = 1.0


def summarize_event(event: dict[str, Any]) -> str:
    """One line for a container's event (docs/protocol.md §5.2). The list shows each stream's latest
    status event only, beside every other event."""
    kind = event.get("type")
    if kind == "status":
        inference = event.get("inference_status") or {}
        return f"{event.get('state', '?')}, {inference.get('fps', '?')} fps"
    if kind == "stream_stopped":
        return f"reason: {event.get('reason', '?')}"
    if kind == "error":
        return str(event.get("error", ""))
    rest = {k: v for k, v in event.items() if k not in ("type", "received_at", "stream_id", "timestamp")}
    text = json.dumps(rest, separators=(",", ":")) if rest else ""
    return text if len(text) <= 120 else text[:117] + "..."


def _sample(stream: dict[str, Any], session: dict[str, Any] | None) -> dict[str, Any]:
    """One point of a stream's series: the container's figures when it reported the session, else
    what the orchestrator measured as the gateway."""
    if session is not None:
        dropped = session.get("dropped") or {}
        return {
            "t": round(time.time(), 1),
            "fps": (session.get("output") or {}).get("fps"),
            "latency_ms": (session.get("frame_latency_ms") or {}).get("p50"),
            "dropped": sum(dropped.values()) if isinstance(dropped, dict) else None,
        }
    return {
        "t": round(time.time(), 1),
        "fps": stream.get("fps"),
        "latency_ms": stream.get("latency_ms_p50"),
        "dropped": stream.get("dropped_frames"),
    }


class LiveUi:
    """The page, its JSON and the thumbnails of one :class:`LocalOrchestrator`."""

    def __init__(self, orchestrator: LocalOrchestrator) -> None:
        self._orchestrator = orchestrator
        self._http: aiohttp.ClientSession | None = None
        self.thumbnails = Thumbnails(self._client)
        self._series: dict[str, deque[dict[str, Any]]] = {}
        self._containers: dict[str, dict[str, Any]] = {}  # url -> health as last fetched
        self._known: dict[str, LocalStream] = {}
        self._ended: deque[str] = deque(maxlen=100)  # ids of the streams that ended last
        self._log: deque[dict[str, Any]] = deque(maxlen=_EVENTS_SHOWN)
        self._viewed_at = 0.0
        self._sampler: asyncio.Task[None] | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._page)
        app.router.add_get("/ui/state", self._state)
        app.router.add_get("/ui/streams/{id}/thumbnail.jpg", self._thumbnail)
        app.on_cleanup.append(self._close)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        return self._http

    async def _close(self, _app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        await self.thumbnails.close()
        if self._http is not None:
            await self._http.close()

    # --- routes ---------------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _state(self, request: web.Request) -> web.Response:
        self._viewed_at = time.monotonic()
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.create_task(self._sample_while_viewed(), name="live page sampler")
        self._observe()
        return web.json_response(self.state(), headers={"Cache-Control": "no-store"})

    async def _thumbnail(self, request: web.Request) -> web.Response:
        stream_id = request.match_info["id"]
        stream = self._orchestrator.streams.get(stream_id)
        if stream is not None:
            image = self.thumbnails.latest(stream_id, stream.urls["output"])
        elif stream_id in self._known or stream_id in self._ended:
            image = self.thumbnails.last_image(stream_id)  # it just ended: its last frame, if any
        else:
            return web.json_response({"error": "no such stream"}, status=404)
        headers = {"Cache-Control": "no-store"}
        if image is None:
            return web.Response(status=204, headers=headers)
        return web.Response(body=image, content_type="image/jpeg", headers=headers)

    # --- state ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        orchestrator = self._orchestrator
        streams = []
        for stream in orchestrator.streams.values():
            described = stream.statistics()
            described["series"] = list(self._series.get(stream.stream_id, ()))
            streams.append(described)
        containers = []
        for capability in orchestrator.registry.capabilities.values():
            containers.append({**capability.public(), "health": self._containers.get(capability.url)})
        runners = []
        for runner in orchestrator.runners.runners.values():
            runners.append(
                {
                    "runner_id": runner.runner_id,
                    "app": runner.info.app,
                    "url": runner.info.runner_url,
                    "status": runner.info.status,
                    "capacity": runner.info.capacity,
                    "sessions": len(runner.sessions),
                    "health": self._containers.get(runner.info.runner_url),
                }
            )
        models = {capability.name for capability in orchestrator.registry.capabilities.values()}
        for runner in orchestrator.runners.runners.values():
            models.add(runner.info.app.removeprefix("live-video-to-video/"))
        return {
            "now": time.time(),
            "streams": sorted(streams, key=lambda s: s["stream_id"]),
            "containers": containers,
            "live_runners": runners,
            "models": sorted(models),
            "events": self._events(),
            "sampling": {"interval_s": SAMPLE_INTERVAL_S, "history": HISTORY},
            "thumbnails": self.thumbnails.describe(),
        }

    def _observe(self) -> None:
        """Note streams that started or ended since the last look (kept for the events list)."""
        live = self._orchestrator.streams
        for stream_id, stream in live.items():
            if stream_id not in self._known:
                self._known[stream_id] = stream
                self._log.append(
                    {
                        "at": stream.started_at,
                        "stream_id": stream_id,
                        "type": "started",
                        "summary": f"model {stream.request.model_id} on {stream.capability.url}",
                    }
                )
        for stream_id in [s for s in self._known if s not in live]:
            stream = self._known.pop(stream_id)
            self._ended.append(stream_id)
            self._log.extend(self._container_events(stream))
            self._log.append(
                {
                    "at": time.time(),
                    "stream_id": stream_id,
                    "type": "ended",
                    "summary": stream.end_reason or "ended",
                }
            )
            self._series.pop(stream_id, None)
        self.thumbnails.forget(set(live))

    @staticmethod
    def _container_events(stream: LocalStream) -> list[dict[str, Any]]:
        return [
            {
                "at": event.get("received_at"),
                "stream_id": stream.stream_id,
                "type": str(event.get("type", "?")),
                "summary": summarize_event(event),
            }
            for event in stream.events
        ]

    def _events(self) -> list[dict[str, Any]]:
        events = list(self._log)
        for stream in self._known.values():
            events.extend(self._container_events(stream))
        events = [e for e in events if e["at"] is not None]
        # keep an ended stream's events once: they were copied into the log when it ended
        unique = {(e["at"], e["stream_id"], e["type"]): e for e in events}
        newest_first = sorted(unique.values(), key=lambda e: e["at"], reverse=True)
        shown, with_status = [], set()
        for event in newest_first:  # periodic status events: only each stream's latest
            if event["type"] == "status":
                if event["stream_id"] in with_status:
                    continue
                with_status.add(event["stream_id"])
            shown.append(event)
        return shown[:_EVENTS_SHOWN]

    # --- sampling -------------------------------------------------------------------------------

    async def _sample_while_viewed(self) -> None:
        while time.monotonic() - self._viewed_at < ACTIVE_S:
            started = time.monotonic()
            with contextlib.suppress(Exception):  # a sample is best effort: the next one comes
                await self._sample_once()
            await asyncio.sleep(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - started)))

    async def _sample_once(self) -> None:
        orchestrator = self._orchestrator
        tokens: dict[str, str | None] = {}
        tokens |= {r.info.runner_url: None for r in orchestrator.runners.runners.values()}
        tokens |= {s.capability.url: s.capability.token for s in orchestrator.streams.values()}
        tokens |= {c.url: c.token for c in orchestrator.registry.capabilities.values()}
        urls = list(tokens)
        fetched = await asyncio.gather(*(self._fetch_container(url, tokens[url]) for url in urls))
        sessions: dict[tuple[str, str], dict[str, Any]] = {}
        for url, (health, statuses) in zip(urls, fetched, strict=True):
            self._containers[url] = health
            for session in statuses:
                sessions[(url, str(session.get("stream_id")))] = session
        for gone in [url for url in self._containers if url not in urls]:
            del self._containers[gone]
        self._observe()
        for stream in list(orchestrator.streams.values()):
            point = _sample(stream.statistics(), sessions.get((stream.capability.url, stream.stream_id)))
            self._series.setdefault(stream.stream_id, deque(maxlen=HISTORY)).append(point)

    async def _fetch_container(
        self, url: str, token: str | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A container's /health (with how long it took) and its sessions' /stream/status."""
        http = self._client()
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        health: dict[str, Any]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(_FETCH_TIMEOUT_S), http.get(f"{url}/health") as response:
                body = await response.json(content_type=None)
                health = body if isinstance(body, dict) else {}
                health["http_status"] = response.status
                health["ms"] = round((time.perf_counter() - started) * 1000, 1)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return {"http_status": None, "error": str(exc) or type(exc).__name__}, []
        statuses: list[dict[str, Any]] = []
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            async with (
                asyncio.timeout(_FETCH_TIMEOUT_S),
                http.get(f"{url}/stream/status", headers=auth) as response,
            ):
                body = await response.json(content_type=None)
                if response.status == 200 and isinstance(body, dict):
                    statuses = [s for s in body.get("sessions") or [] if isinstance(s, dict)]
        return health, statuses
