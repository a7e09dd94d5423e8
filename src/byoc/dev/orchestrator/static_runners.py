"""Static live runners (docs/protocol.md §10.5a): listed by the operator, watched through their health URL.

The list is a JSON document ``{"runners": [entry, ...]}``, read from ``--live-runner-config`` at start
or posted to ``POST /registerLiveRunners`` (with the orchestrator secret as ``Authorization``). An entry
has the fields of a heartbeat (``runner_url``, ``app``, ``capacity``, ``mode``, ``version``,
``metadata``, ``gpu``, ``price_info``, ``proxy``), normalized as a heartbeat is, and:

- ``label``: required, trimmed, unique in the document; re-registering a label updates that runner in
  place (same id, same sessions);
- ``health_url``: required; a path starting with ``/`` is appended to ``runner_url``; it must end up an
  absolute http(s) URL;
- ``healthy_status_code``: the one healthy answer (default 200, 100..599);
- ``routing``: ``runner-id`` (the default; ``runner_id`` is taken too) or ``label``, which routes
  ``/apps/{label}/...`` to it (a label with ``/`` is then refused).

Each runner gets a generated ``runner_`` id and has no heartbeat, no expiry and no O2R channel. Its
health URL is fetched at registration and then every health interval, with a 3 s timeout: exactly the
healthy status makes it ``ready``; any other answer, a timeout or a connection error makes it
``unavailable`` and releases every one of its sessions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from byoc.dev.orchestrator.runner_request import RunnerInfo, parse_heartbeat
from byoc.dev.orchestrator.runners import LiveRunner, RunnerError, RunnerRegistry, StaticHealth

__all__ = [
    "DEFAULT_HEALTH_INTERVAL_S",
    "HEALTH_TIMEOUT_S",
    "StaticRunnerEntry",
    "StaticRunners",
    "check_health",
    "load_config",
    "parse_config",
]

log = logging.getLogger(__name__)

DEFAULT_HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 3.0
_ROUTINGS = {"runner-id": False, "runner_id": False, "label": True}
"""routing -> whether the runner is routed by its label."""
_HEARTBEAT_KEYS = (
    "label",
    "proxy",
    "runner_url",
    "version",
    "metadata",
    "mode",
    "gpu",
    "app",
    "capacity",
    "price_info",
)


@dataclass(frozen=True)
class StaticRunnerEntry:
    """One checked entry of a static runner list."""

    info: RunnerInfo
    health: StaticHealth
    by_label: bool = False


def _absolute_http(url: str) -> bool:
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _entry(raw: object) -> StaticRunnerEntry:
    if not isinstance(raw, dict):
        raise ValueError("must be an object")
    routing = _text(raw, "routing").strip() or "runner-id"
    if routing not in _ROUTINGS:
        raise ValueError('routing must be "runner-id" or "label"')
    code = raw.get("healthy_status_code")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
        raise ValueError("healthy_status_code must be an integer")
    code = code or 200
    label = _text(raw, "label")
    if not label or label != label.strip():
        raise ValueError("label is required and must be trimmed")
    health_url = _text(raw, "health_url")
    if not health_url:
        raise ValueError("health_url is required")
    if health_url.startswith("/") and not health_url.startswith("//"):
        runner_url = raw.get("runner_url")
        if not isinstance(runner_url, str) or not _absolute_http(runner_url):
            raise ValueError("invalid runner_url")
        health_url = runner_url.rstrip("/") + health_url
    if not _absolute_http(health_url):
        raise ValueError("invalid health_url")
    if not 100 <= code <= 599:
        raise ValueError("healthy_status_code must be a valid HTTP status code")
    heartbeat = {key: raw[key] for key in _HEARTBEAT_KEYS if key in raw}
    info = parse_heartbeat(json.dumps(heartbeat).encode())
    by_label = _ROUTINGS[routing]
    if by_label and "/" in label:
        raise ValueError('label cannot contain / when routing is "label"')
    return StaticRunnerEntry(info, StaticHealth(health_url, code), by_label)


def parse_config(data: bytes | str) -> tuple[StaticRunnerEntry, ...]:
    """The entries of a static runner list, checked as go-livepeer checks ``-liveRunnerConfig``.

    Raises:
        ValueError: what is wrong, naming the entry (``runners[2]: health_url is required``).
    """
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    runners = document.get("runners") if isinstance(document, dict) else None
    if not isinstance(document, dict) or not isinstance(runners, list | None):
        raise ValueError('the runner list must be a JSON object {"runners": [...]}')
    entries: list[StaticRunnerEntry] = []
    for index, raw in enumerate(runners or ()):
        try:
            entry = _entry(raw)
        except ValueError as exc:
            raise ValueError(f"runners[{index}]: {exc}") from None
        if any(seen.info.label == entry.info.label for seen in entries):
            raise ValueError(f"runners[{index}]: duplicate label {entry.info.label!r}")
        entries.append(entry)
    return tuple(entries)


def load_config(path: str | Path) -> tuple[StaticRunnerEntry, ...]:
    """:func:`parse_config` of a file; ``ValueError`` when it cannot be read or is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return parse_config(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


async def check_health(http: aiohttp.ClientSession, health: StaticHealth) -> bool:
    """Whether a GET of the health URL answers exactly the healthy status within the timeout."""
    try:
        async with http.get(health.url) as response:
            return response.status == health.status
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return False


class StaticRunners:
    """Registers static runners in a :class:`RunnerRegistry` and keeps their status current."""

    def __init__(
        self,
        registry: RunnerRegistry,
        secret: str,
        entries: tuple[StaticRunnerEntry, ...] = (),
        interval_s: float = DEFAULT_HEALTH_INTERVAL_S,
    ) -> None:
        self.registry = registry
        self._secret = secret
        self._entries = entries
        self.interval_s = interval_s
        self._http: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/registerLiveRunners", self._register_route)
        app.cleanup_ctx.append(self._lifecycle)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self._http = http
            await self.register(self._entries)
            loop = asyncio.create_task(self._health_loop())
            yield
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    async def register(self, entries: tuple[StaticRunnerEntry, ...]) -> list[dict[str, Any]]:
        """Check each entry's health once, then add or update its runner; what go-livepeer answers.

        Raises:
            RunnerError: 409 when an entry's route is a different runner's (nothing is registered).
        """
        assert self._http is not None
        for index, entry in enumerate(entries):
            route = entry.info.label if entry.by_label else None
            holder = self.registry.runners.get(route) if route else None
            if holder is not None and not (holder.static and holder.info.label == entry.info.label):
                raise RunnerError(409, f"runners[{index}]: route {route!r} is taken")
        http = self._http
        healthy = await asyncio.gather(*(check_health(http, entry.health) for entry in entries))
        answer = []
        for entry, ok in zip(entries, healthy, strict=True):
            runner = self.registry.upsert_static(entry.info, entry.health, entry.by_label, ok)
            answer.append(_registration(runner, ok))
        return answer

    async def check_all(self) -> None:
        """One round of health checks of every static runner."""
        assert self._http is not None
        http = self._http
        runners = self.registry.static_runners()
        results = await asyncio.gather(*(check_health(http, _health(runner)) for runner in runners))
        for runner, healthy in zip(runners, results, strict=True):
            self.registry.set_static_health(runner, healthy)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all()

    async def _register_route(self, request: web.Request) -> web.StreamResponse:
        if not self._secret:
            return _error(404, "static live runner registration is disabled")
        if not _same_secret(request.headers.get("Authorization", ""), self._secret):
            return _error(401, "invalid authorization")
        try:
            entries = parse_config(await request.read())
            answer = await self.register(entries)
        except ValueError as exc:
            return _error(400, str(exc))
        except RunnerError as exc:
            return _error(exc.status, str(exc))
        return web.json_response({"runners": answer})


def _same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(errors="surrogateescape"), expected.encode())


def _health(runner: LiveRunner) -> StaticHealth:
    assert runner.health is not None
    return runner.health


def _registration(runner: LiveRunner, healthy: bool) -> dict[str, Any]:
    assert runner.health is not None
    info = runner.info
    described: dict[str, Any] = {"runner_id": runner.runner_id, "label": info.label, "app": info.app}
    if info.proxy:
        described["proxy"] = True
    return {
        **described,
        "runner_url": info.runner_url,
        "mode": info.mode,
        "health_url": runner.health.url,
        "healthy_status_code": runner.health.status,
        "healthy": healthy,
    }


def _error(status: int, message: str) -> web.Response:
    """Plain text, as Go's ``http.Error`` writes it."""
    return web.Response(status=status, text=message + "\n", content_type="text/plain")
