"""The live-runner registry as go-livepeer's orchestrator keeps it (``ai/runner/live_runner.go``).

Dynamic runners register and stay registered by heartbeat; each gets a heartbeat secret and a session
token per session, both derived from a random seed it never sees, and an orchestrator-to-runner (O2R)
trickle channel whose name is a credential. A runner whose last heartbeat is older than the TTL is
treated as gone at once and removed by the next sweep. Every release closes the session's channels and
tells the runner on its O2R channel (``released``), except a removal (unregistering, expiry): as in
go-livepeer, the O2R channel is closed first, so the runner is told nothing.

Static runners (docs/protocol.md §10.5a, ``static_runners.py``) are listed by the operator instead: they
never heartbeat, never expire and have no O2R channel; their status follows their health URL. Runners are
keyed by their route, the name in ``/apps/{route}/...`` and ``/runner/{route}/...``: the runner id, or a
static runner's label when it is routed by label.

Everything runs on the orchestrator's event loop, so nothing here is locked. Every refusal is a
:class:`RunnerError` carrying the status go-livepeer answers with.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from byoc.dev.orchestrator.runner_request import RunnerInfo
from byoc.dev.trickle_server import TrickleServer

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "DEFAULT_HEARTBEAT_TTL_S",
    "MAX_CHANNELS_PER_REQUEST",
    "O2R_INTERVAL_S",
    "LiveRunner",
    "RunnerChannel",
    "RunnerError",
    "RunnerRegistry",
    "RunnerSession",
    "StaticHealth",
    "go_duration",
    "parse_duration",
]

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_HEARTBEAT_TTL_S = 20.0
O2R_INTERVAL_S = 10.0
MAX_CHANNELS_PER_REQUEST = 25
_KEEPALIVE = b'{"keep":"alive"}'
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DEFAULT_MIME_TYPE = "application/octet-stream"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class RunnerError(Exception):
    """A refusal with the HTTP status go-livepeer answers it with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` writes it ("500ms", "5s", "1m30s", "1h0m0s")."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, rest = divmod(rest, 60)
    text = f"{rest:g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    return f"{int(hours)}h{text}" if hours else text


def parse_duration(text: str) -> float:
    """Seconds from a duration as Go writes one ("20s", "500ms", "1m30s"), or from a plain number."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            raise ValueError(f"not a duration: {text!r}") from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive: {text!r}")
    return seconds


def _derive(seed: bytes, label: str) -> str:
    """A secret derived from the runner's seed (lower-case base32 of an HMAC-SHA256, unpadded)."""
    digest = hmac.new(seed, label.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode().rstrip("=").lower()


def _random_id(prefix: str) -> str:
    return prefix + base64.b32encode(secrets.token_bytes(5)).decode().lower()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(errors="surrogateescape"), expected.encode())


def _timestamp() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class RunnerChannel:
    """A trickle channel the orchestrator created for a runner, as the runner is told about it."""

    name: str
    channel_name: str
    url: str
    mime_type: str
    internal_url: str = ""

    def public(self) -> dict[str, str]:
        described = {"name": self.name, "channel_name": self.channel_name, "url": self.url}
        if self.internal_url:
            described["internal_url"] = self.internal_url
        return {**described, "mime_type": self.mime_type}


@dataclass
class RunnerSession:
    """One reserved session: its channels, its proxies, its in-flight proxied requests, whether it ended."""

    session_id: str
    channels: dict[str, RunnerChannel] = field(default_factory=dict)
    proxies: dict[str, str] = field(default_factory=dict)
    """Proxy id -> the URL its requests go to."""
    requests: set[asyncio.Task[Any]] = field(default_factory=set)
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class StaticHealth:
    """How a static runner's health is checked: a GET of ``url`` answering exactly ``status``."""

    url: str
    status: int = 200


@dataclass
class LiveRunner:
    """A registered runner: what its last heartbeat said, its credentials and its sessions."""

    runner_id: str
    seed: bytes
    info: RunnerInfo
    o2r: RunnerChannel | None
    """None for a static runner."""
    last_heartbeat: float
    sessions: dict[str, RunnerSession] = field(default_factory=dict)
    route: str = ""
    """Its key in ``/apps/{route}/...``: the runner id unless a static runner is routed by label."""
    health: StaticHealth | None = None
    """A static runner's health check; None for a dynamic runner."""

    def __post_init__(self) -> None:
        self.route = self.route or self.runner_id

    @property
    def static(self) -> bool:
        return self.health is not None

    @property
    def heartbeat_secret(self) -> str:
        return _derive(self.seed, "heartbeat")

    def session_token(self, session_id: str) -> str:
        return _derive(self.seed, "session:" + session_id)

    @property
    def ready(self) -> bool:
        """Only an empty status or ``ready`` is discoverable and takes sessions."""
        return self.info.status in ("", "ready")


class RunnerRegistry:
    """The live runners of one orchestrator, dynamic and static, by route, and their sessions."""

    def __init__(
        self,
        secret: str,
        trickle: TrickleServer,
        base_url: Callable[[], str],
        *,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S,
        o2r_interval_s: float = O2R_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = secret
        self._trickle = trickle
        self._base_url = base_url
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.o2r_interval_s = o2r_interval_s
        self._clock = clock
        self.runners: dict[str, LiveRunner] = {}

    @property
    def base_url(self) -> str:
        """The orchestrator's URL as runners and clients reach it."""
        return self._base_url()

    @property
    def trickle_url(self) -> str:
        return self._base_url() + self._trickle.base_path

    # --- registration -----------------------------------------------------------------------------

    def heartbeat(self, info: RunnerInfo, auth: str) -> dict[str, Any]:
        """Register (with the orchestrator secret) or refresh (with the heartbeat secret) a runner."""
        runner_id = info.runner_id or _random_id("runner_")
        runner = self._by_id(runner_id)
        answer: dict[str, Any] = {
            "runner_id": runner_id,
            "orchestrator": self.base_url,
            "heartbeat_interval": go_duration(self.heartbeat_interval_s),
            "heartbeat_ttl": go_duration(self.heartbeat_ttl_s),
        }
        if runner is None:
            if not self._secret:
                raise RunnerError(404, "dynamic live runner registration is disabled")
            if not _same(auth, self._secret):
                raise RunnerError(401, "invalid registration authorization")
            runner = self._register(runner_id, info)
            answer["heartbeat_secret"] = runner.heartbeat_secret
            assert runner.o2r is not None
            answer["o2r"] = runner.o2r.public()
        else:
            if self._expired(runner):
                raise RunnerError(404, "runner not found")
            if not _same(auth, runner.heartbeat_secret):
                raise RunnerError(401, "invalid heartbeat authorization")
            if runner.static:  # its heartbeat secret is never given out, so this is rare
                raise RunnerError(400, "static runner cannot heartbeat")
            if info.status != runner.info.status:
                log.info(
                    "live runner %s (%s) status changed: %s -> %s",
                    runner_id,
                    info.app,
                    runner.info.status or "ready",
                    info.status or "ready",
                )
            runner.info = info
            runner.last_heartbeat = self._clock()
        # the orchestrator's own list, oldest first, whatever the runner believes it has
        return {**answer, "session_ids": list(runner.sessions)}

    def _register(self, runner_id: str, info: RunnerInfo) -> LiveRunner:
        seed = secrets.token_bytes(32)
        name = f"{runner_id}-{_derive(seed, 'trickle:o2r')[:16]}-o2r"
        o2r = RunnerChannel("o2r", name, self.trickle_url + name, "application/json")
        self._trickle.create_channel(name, o2r.mime_type)
        runner = LiveRunner(runner_id, seed, info, o2r, self._clock())
        self.runners[runner_id] = runner
        log.info("live runner %s registered: %s at %s", runner_id, info.app, info.runner_url)
        return runner

    def _by_id(self, runner_id: str) -> LiveRunner | None:
        """The runner routed as ``runner_id``, or the static runner with that id routed by its label."""
        runner = self.runners.get(runner_id)
        if runner is None:
            runner = next((r for r in self.runners.values() if r.static and r.runner_id == runner_id), None)
        return runner

    def upsert_static(
        self, info: RunnerInfo, health: StaticHealth, by_label: bool, healthy: bool
    ) -> LiveRunner:
        """Add the static runner labelled ``info.label``, or update the one that has that label in place
        (same id, same sessions). An unhealthy runner is ``unavailable`` and loses its sessions.

        Raises:
            RunnerError: 409 when its route is another runner's.
        """
        runner = next((r for r in self.runners.values() if r.static and r.info.label == info.label), None)
        if runner is None:
            runner_id = _random_id("runner_")
            while self._by_id(runner_id) is not None:
                runner_id = _random_id("runner_")
        else:
            runner_id = runner.runner_id
        route = info.label if by_label else runner_id
        holder = self.runners.get(route)
        if holder is not None and holder is not runner:
            raise RunnerError(409, f"route {route!r} is taken by runner {holder.runner_id}")
        info = dataclasses.replace(info, runner_id=runner_id, status="ready" if healthy else "unavailable")
        if runner is None:
            runner = LiveRunner(runner_id, secrets.token_bytes(32), info, None, self._clock(), health=health)
            log.info(
                "static live runner %s registered: %s at %s (route %s, healthy: %s)",
                runner_id,
                info.app,
                info.runner_url,
                route,
                healthy,
            )
        else:
            self.runners.pop(runner.route, None)
            runner.info, runner.health = info, health
            log.info("static live runner %s (%s) updated: %s", runner_id, info.label, info.status)
        runner.route = route
        self.runners[route] = runner
        if not healthy:
            self.release_all(runner)
        return runner

    def set_static_health(self, runner: LiveRunner, healthy: bool) -> None:
        """A static runner's health check result: ``ready``, or ``unavailable`` and every session released."""
        if self.runners.get(runner.route) is not runner or runner.health is None:
            return  # removed or replaced while it was being checked
        status = "ready" if healthy else "unavailable"
        if status != runner.info.status:
            log.info(
                "static live runner %s (%s) health changed: %s (%s)",
                runner.runner_id,
                runner.info.app,
                status,
                runner.health.url,
            )
            runner.info = dataclasses.replace(runner.info, status=status)
        if not healthy:
            self.release_all(runner)

    def static_runners(self) -> list[LiveRunner]:
        return [runner for runner in self.runners.values() if runner.static]

    def release_all(self, runner: LiveRunner) -> None:
        for session_id in list(runner.sessions):
            self.release(runner, session_id)

    def unregister(self, runner_id: str, auth: str) -> None:
        runner = self.find(runner_id)
        if runner.static:
            raise RunnerError(400, "static runner cannot unregister with heartbeat credentials")
        if not _same(auth, runner.heartbeat_secret):
            raise RunnerError(401, "invalid authorization")
        self._remove(runner, "unregister")

    def _expired(self, runner: LiveRunner) -> bool:
        if runner.static:
            return False
        return self._clock() - runner.last_heartbeat > self.heartbeat_ttl_s

    def find(self, runner_id: str) -> LiveRunner:
        """The runner if it is registered and its heartbeat is fresh, ready or not."""
        runner = self.runners.get(runner_id)
        if runner is None or self._expired(runner):
            raise RunnerError(404, "runner not found")
        return runner

    def find_ready(self, runner_id: str) -> LiveRunner:
        """The runner if it is registered, fresh and ready; a hidden runner is 'not found'."""
        runner = self.find(runner_id)
        if not runner.ready:
            raise RunnerError(404, "runner not found")
        return runner

    def _remove(self, runner: LiveRunner, reason: str) -> None:
        # go-livepeer closes the O2R channel before releasing: the runner gets no `released` events here
        if runner.o2r is not None:
            self._trickle.close_channel(runner.o2r.channel_name)
        runner.o2r = None
        self.release_all(runner)
        if self.runners.get(runner.route) is runner:
            del self.runners[runner.route]
        log.info("live runner %s removed (%s)", runner.runner_id, reason)

    def sweep(self) -> list[str]:
        """Remove every runner whose heartbeat is older than the TTL, releasing its sessions."""
        expired = [runner for runner in self.runners.values() if self._expired(runner)]
        for runner in expired:
            self._remove(runner, "heartbeat timeout")
        return [runner.runner_id for runner in expired]

    def send_keepalives(self) -> None:
        for runner in self.runners.values():
            if runner.o2r is not None:  # a static runner has none
                self._trickle.write_segment(runner.o2r.channel_name, _KEEPALIVE)

    def discovery(self) -> list[LiveRunner]:
        """The runners a client may see: registered, fresh and ready."""
        return [runner for runner in self.runners.values() if not self._expired(runner) and runner.ready]

    # --- sessions ---------------------------------------------------------------------------------

    def reserve(self, runner: LiveRunner, session_id: str = "") -> RunnerSession:
        """Take one unit of the runner's capacity (503 when none is left, 409 for a taken id)."""
        if session_id and session_id in runner.sessions:
            raise RunnerError(409, "session already exists")
        if len(runner.sessions) >= runner.info.capacity:
            raise RunnerError(503, "no capacity available for runner")
        while not session_id or session_id in runner.sessions:
            session_id = _random_id("session_")
        session = RunnerSession(session_id)
        runner.sessions[session_id] = session
        self._tell(runner, "reserved", session_id)
        log.info("live runner %s: session %s reserved", runner.runner_id, session_id)
        return session

    def release(self, runner: LiveRunner, session_id: str) -> None:
        """End a session: tell the runner, remove its channels, cut its proxied requests."""
        session = runner.sessions.pop(session_id, None)
        if session is None:
            return
        self._tell(runner, "released", session_id)
        for channel in session.channels.values():
            self._trickle.close_channel(channel.channel_name)
        session.channels.clear()
        for task in session.requests:
            task.cancel()
        session.released.set()
        log.info("live runner %s: session %s released", runner.runner_id, session_id)

    def _tell(self, runner: LiveRunner, event: str, session_id: str) -> None:
        if runner.o2r is None:  # a static runner, or one being removed: nobody to tell
            return
        message = {"event": event, "session": session_id, "timestamp": _timestamp()}
        self._trickle.write_segment(runner.o2r.channel_name, json.dumps(message).encode())

    def session(self, runner_id: str, session_id: str) -> tuple[LiveRunner, RunnerSession]:
        runner = self.find_ready(runner_id)
        session = runner.sessions.get(session_id)
        if session is None:
            raise RunnerError(404, "runner session not found")
        return runner, session

    def authorised_session(
        self, runner_id: str, session_id: str, token: str
    ) -> tuple[LiveRunner, RunnerSession]:
        """The session a runner callback names, if its ``Livepeer-Session-Token`` matches."""
        runner, session = self.session(runner_id, session_id)
        if not _same(token, runner.session_token(session_id)):
            raise RunnerError(401, "invalid authorization")
        return runner, session

    # --- session channels -------------------------------------------------------------------------

    def create_channel(self, session: RunnerSession, name: str, mime_type: str) -> RunnerChannel:
        """Create (or return the existing) channel ``<session>-<name>`` on the trickle server."""
        name = _channel_name(name)
        existing = session.channels.get(name)
        if existing is not None:
            return existing
        channel_name = f"{session.session_id}-{name}"
        url = self.trickle_url + channel_name
        channel = RunnerChannel(name, channel_name, url, mime_type.strip() or _DEFAULT_MIME_TYPE, url)
        self._trickle.create_channel(channel_name, channel.mime_type)
        session.channels[name] = channel
        return channel

    def delete_channel(self, session: RunnerSession, name: str) -> None:
        channel = session.channels.pop(_channel_name(name), None)
        if channel is None:
            raise RunnerError(404, "trickle channel not found")
        self._trickle.close_channel(channel.channel_name)

    # --- session proxies --------------------------------------------------------------------------

    def create_proxy(self, runner: LiveRunner, session: RunnerSession, target_url: str = "") -> str:
        """A random proxy id for ``target_url`` (the runner's URL when empty), which must be on the
        runner's host; it lives as long as the session."""
        target = runner.info.runner_url
        if target_url.strip():
            target = _proxy_target(target_url.strip())
            if (urlsplit(target).hostname or "") != (urlsplit(runner.info.runner_url).hostname or ""):
                raise RunnerError(400, "target_url hostname must match registered runner_url hostname")
        proxy_id = base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()
        session.proxies[proxy_id] = target
        return proxy_id

    def resolve_proxy(self, proxy_id: str) -> tuple[LiveRunner, RunnerSession, str]:
        """The session a proxy id belongs to and its target; 404 once the session is released."""
        for runner in self.discovery():
            for session in runner.sessions.values():
                if proxy_id in session.proxies:
                    return runner, session, session.proxies[proxy_id]
        raise RunnerError(404, "live runner proxy not found")


def _proxy_target(url: str) -> str:
    try:
        parts = urlsplit(url)
        absolute = bool(parts.scheme) and bool(parts.hostname)
    except ValueError:
        absolute = False
    if not absolute or any(ch.isspace() for ch in url):
        raise RunnerError(400, "target_url must be an absolute URL")
    if parts.scheme not in ("http", "https"):
        raise RunnerError(400, "target_url scheme must be http or https")
    if "#" in url:
        raise RunnerError(400, "target_url must not include a fragment")
    return url


def _channel_name(name: str) -> str:
    name = name.strip().replace("/", "-")
    if not name:
        raise RunnerError(400, "trickle channel name is required")
    if not _CHANNEL_NAME.fullmatch(name):
        raise RunnerError(400, "trickle channel name may only contain alphanumerics, underscores, or hyphens")
    return name
