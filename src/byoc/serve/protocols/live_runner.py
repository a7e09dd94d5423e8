"""go-livepeer's live runner, runner side, in persistent mode (docs/protocol.md §10).

The container registers by heartbeat: ``POST /runners/heartbeat`` with the orchestrator's secret the
first time, with the ``heartbeat_secret`` of the first answer afterwards, every ``heartbeat_interval``
the orchestrator names. A runner that misses the orchestrator's TTL is dropped with every session it
holds, so the heartbeat runs on the API thread's event loop, which neither media work nor a processor's
load can hold up. Each answer's ``session_ids`` is the truth: a session the orchestrator no longer lists
ends here too. The O2R channel tells of reservations and releases as they happen; a released session
ends at once.

A client reaches the container through the orchestrator's proxy, which adds the session's headers
(``Livepeer-Session-Id``, ``-Token``, ``-Control``). ``POST /stream/start`` (or
``/live-video-to-video``) under the session's app URL asks the orchestrator for the session's trickle
channels (``POST {control}/channels``), runs an ordinary session on them and
answers the client with the channels' public URLs. When the session ends, its channels are removed and
the orchestrator is told (``DELETE {control}/channels``, ``POST {control}/stop``). The protocol has no
session TTL and no client liveness, so the session's own limits matter here: one without input for
``input_timeout_s`` ends (``input_timeout``, as under every protocol), and ``max_session_s`` bounds its
length. A reservation whose client never calls cannot be released by the runner (only the client's token
can), so after ``input_timeout_s`` it no longer counts against the capacity the runner offers.

On the drain, a heartbeat with status ``draining`` hides the runner at once without releasing its
sessions; once they have ended, the runner unregisters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from byoc import __version__
from byoc.errors import (
    AdmissionRefused,
    ByocError,
    ConfigError,
    InvalidRequest,
    SessionExists,
    SessionNotFound,
)
from byoc.serve.api import Route, read_body
from byoc.serve.gpu import device_label
from byoc.serve.health import RuntimeState
from byoc.serve.validation import checked_stream_id, json_object, start_spec
from byoc.spec import EndReason
from byoc.threads import run_on_loop
from byoc.trickle.client import HostRule, create_client_session, url_address
from byoc.trickle.subscriber import TrickleSubscriber

if TYPE_CHECKING:
    from byoc.serve.config import Settings
    from byoc.serve.protocols import RuntimeView, SessionControl

__all__ = ["CHANNELS", "HEARTBEAT_PATH", "START_PATHS", "LiveRunner", "parse_go_duration"]

log = logging.getLogger(__name__)

HEARTBEAT_PATH = "/runners/heartbeat"
START_PATHS = ("/stream/start", "/live-video-to-video")
SESSION_ID = "Livepeer-Session-Id"
SESSION_TOKEN = "Livepeer-Session-Token"
SESSION_CONTROL = "Livepeer-Session-Control"

CHANNELS: tuple[tuple[str, str, str, str], ...] = (
    # channel name, MIME type, the session's key for it, the client's key for its public URL
    ("in", "video/MP2T", "subscribe_url", "publish_url"),
    ("out", "video/MP2T", "publish_url", "subscribe_url"),
    ("control", "application/json", "control_url", "control_url"),
    ("events", "application/json", "events_url", "events_url"),
    ("data", "application/jsonl", "data_url", "data_url"),
)
MAX_METADATA_BYTES = 1024
_REQUEST_TIMEOUT_S = 5.0
_RETRY_S = 1.0  # after a failed heartbeat, well inside any TTL
_FALLBACK_INTERVAL_S = 5.0  # only when an answer names no usable interval
_WATCH_S = 0.5
_CLOSE_WAIT_S = 1.0
_QUOTE_CHARS = 200
_WARN_EVERY = 10
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(value: object) -> float | None:
    """The seconds of a Go duration such as ``"5s"``, ``"1m30s"`` or ``"250ms"``; None for anything else
    (a negative duration included)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text == "0":
        return 0.0
    total, position = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return total if text and position == len(text) else None


class _Refused(ByocError):
    """The orchestrator will not have this runner (wrong secret, body refused): never retried."""


class _Unreachable(ByocError):
    """A heartbeat failed in a way that may pass: transport error, timeout, 5xx, an unusable answer."""


@dataclass(slots=True)
class _Registration:
    """What the orchestrator's first answer established."""

    runner_id: str
    base: str
    """The orchestrator's URL for runners, as the answers name it."""
    secret: str = field(repr=False)


@dataclass(slots=True)
class _Session:
    session_id: str
    control: str
    """``Livepeer-Session-Control``: the orchestrator's URL for this session."""
    token: str = field(repr=False)
    started: float = field(default_factory=time.monotonic)
    channels: list[str] = field(default_factory=list)
    released: bool = False
    """The orchestrator ended it already: nothing is left to remove there."""


class LiveRunner:
    """byoc.serve.protocols.ProtocolAdapter for go-livepeer's live runner.

    Everything but :meth:`run`, :meth:`withdraw` and :meth:`close` (which hop over) runs on the API
    thread's event loop: the heartbeat, the O2R reader, the start route and the sessions' watchers.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        control: SessionControl,
        view: RuntimeView,
        api_loop: Callable[[], asyncio.AbstractEventLoop],
        static: bool = False,
    ) -> None:
        secret = settings.secret() or ""
        if not static and (not settings.orchestrator_url or not secret):
            raise ConfigError("the live runner needs orchestrator_url and orch_secret or orch_secret_file")
        if settings.orchestrator_url:
            try:
                if not settings.orchestrator_url.startswith(("http://", "https://")):
                    raise ValueError(settings.orchestrator_url)
                url_address(settings.orchestrator_url)
            except ValueError:
                raise ConfigError(
                    f"orchestrator_url must be an http(s) URL, got {settings.orchestrator_url!r}"
                ) from None
        if "\r" in secret or "\n" in secret:
            raise ConfigError("the orchestrator secret contains a line break and cannot be sent as a header")
        self._settings = settings
        self._static = static
        """Listed by the operator in the orchestrator's configuration: no heartbeat, no O2R, no unregister;
        the orchestrator polls /health (which keeps answering 200 while draining, byoc.serve.health)."""
        self._orchestrator = (settings.orchestrator_url or "").rstrip("/")
        self._secret = secret
        self._control = control
        self._view = view
        self._api_loop = api_loop
        self._timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
        self._http: aiohttp.ClientSession | None = None
        self._registration: _Registration | None = None
        self._runner_id: str | None = None  # kept across registrations: the orchestrator reuses it
        self._interval: float | None = None
        self._ttl: float | None = None
        self._reserved: dict[str, float] = {}
        """The sessions the orchestrator holds for this runner, with when they were first seen here."""
        self._abandoned: set[str] = set()
        """Reservations whose client never called within ``input_timeout_s`` (already logged)."""
        self._sessions: dict[str, _Session] = {}
        self._watchers: set[asyncio.Task[object]] = set()
        self._o2r: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._withdrawn = False
        self._done: asyncio.Event | None = None
        self._state = "unregistered"
        self._failures = 0
        self._beating = asyncio.Lock()

    # --- the seam ---------------------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        # No bearer token: the orchestrator's proxy sends none; the session token it adds is checked by
        # the orchestrator itself when the runner asks for the session's channels.
        return [("POST", path, self._start, False) for path in START_PATHS]

    @property
    def state(self) -> str:
        return self._state

    def _enter(self, state: str) -> None:
        self._state = state
        self._view.health_changed()

    async def run(self) -> None:
        await run_on_loop(self._api_loop(), self._serve())

    async def withdraw(self) -> None:
        await run_on_loop(self._api_loop(), self._withdraw())

    async def close(self) -> None:
        await run_on_loop(self._api_loop(), self._close())

    # --- registration (API loop) ------------------------------------------------------------------

    async def _serve(self) -> None:
        self._done = asyncio.Event()
        async with create_client_session(self._settings.trickle()) as http:
            self._http = http
            if self._static:
                self._enter("static")
            else:
                self._heartbeat = asyncio.create_task(self._heartbeats(), name="live-runner-heartbeat")
            try:
                await self._done.wait()
            finally:
                tasks = [task for task in (self._heartbeat, self._o2r, *self._watchers) if task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._http = None

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self._beat()
            except _Refused as exc:
                self._enter("refused")
                log.error("%s; the runner is not registered", self._redact(str(exc)))
                return
            except _Unreachable as exc:
                self._note_failure(exc)
                await asyncio.sleep(min(_RETRY_S, self._interval or _RETRY_S))
                continue
            await asyncio.sleep(self._interval or _FALLBACK_INTERVAL_S)

    async def _beat(self) -> None:
        """One heartbeat at a time (the drain sends one of its own), so that a 404 cannot make two
        registrations."""
        async with self._beating:
            await self._beat_once()

    async def _beat_once(self) -> None:
        """One heartbeat; registers afresh (with the orchestrator's secret) when the orchestrator has
        forgotten the runner (404) or no longer takes its heartbeat secret (401)."""
        registration = self._registration
        if registration is not None:
            sent = time.monotonic()
            status, answer = await self._post_heartbeat(registration.base, registration.secret)
            if status == 200:
                self._apply(answer, sent, registration)
                return
            if status not in (401, 404):
                raise self._failed(status, answer)
            log.warning(
                "the orchestrator %s the runner (%d): registering again",
                "forgot" if status == 404 else "no longer accepts the heartbeat secret of",
                status,
            )
            self._forget()
        sent = time.monotonic()
        status, answer = await self._post_heartbeat(self._orchestrator, self._secret)
        if status == 200:
            self._apply(answer, sent, None)
            return
        if status == 401:
            raise _Refused(
                f"the orchestrator {self._orchestrator} refused the secret (401): check orch_secret, "
                "which is sent raw, without 'Bearer '"
            )
        if status == 400:
            raise _Refused(f"the orchestrator refused the heartbeat (400): {self._quote(answer)}")
        if status == 404:  # retried: the orchestrator may be restarted with registration enabled
            raise _Unreachable(
                f"the orchestrator {self._orchestrator} has dynamic live-runner registration off (404)"
            )
        raise self._failed(status, answer)

    def _forget(self) -> None:
        """The orchestrator forgot this runner (TTL expired, restarted): register again, under the same
        runner id (``_runner_id``, kept), so that the runner's discovery URL stays the same."""
        self._registration = None
        if self._o2r is not None:
            self._o2r.cancel()
            self._o2r = None

    async def _post_heartbeat(self, base: str, secret: str) -> tuple[int, bytes]:
        http = self._client()
        headers = {"Authorization": secret}
        try:
            async with http.post(
                base + HEARTBEAT_PATH, json=self._body(), headers=headers, **self._options()
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = f"no answer within {_REQUEST_TIMEOUT_S:g}s" if isinstance(exc, TimeoutError) else exc
            raise _Unreachable(f"heartbeat to {base}: {detail}") from exc

    def _body(self) -> dict[str, Any]:
        """The heartbeat: what the runner offers now, and the sessions it holds."""
        offer = self._view.offer()
        if self._withdrawn or offer.state is RuntimeState.DRAINING:
            status = "draining"
        elif offer.capacity < 1:  # admission would refuse and nothing runs: hidden, not offered as 1
            status = "unavailable"
        else:
            status = "ready"
        body: dict[str, Any] = {
            "runner_url": self._view.advertised_url(),
            "app": f"live-video-to-video/{self._settings.capability_name}",
            "capacity": max(1, offer.capacity) + len(self._abandoned_reservations()),
            "status": status,
            "mode": "persistent",
            "version": __version__,
            "session_ids": self._held(),
        }
        if self._runner_id is not None:
            body["runner_id"] = self._runner_id
        if devices := self._view.gpu_devices():
            device = devices[0]
            body["gpu"] = {"id": str(device.index), "name": device.name, "vram_mb": device.total_bytes >> 20}
        if price := self._settings.runner_price_usd_per_hour:
            body["price_info"] = {"price": price, "currency": "usd", "unit": "hour"}
        described: dict[str, str] = {"processor": self._settings.processor}
        if (index := self._settings.gpu) is not None:  # --gpu: which device, even without NVML
            described["gpu"] = device_label(index, devices)
        metadata = json.dumps(described, separators=(",", ":"))
        if len(metadata.encode()) <= MAX_METADATA_BYTES:
            body["metadata"] = metadata
        return body

    def _held(self) -> list[str]:
        """The orchestrator's sessions (reserved ones included) and those running here, in order."""
        return [*self._reserved, *(sid for sid in self._sessions if sid not in self._reserved)]

    def _abandoned_reservations(self) -> list[str]:
        """Reservations not started here within ``input_timeout_s``: their clients vanished before calling.
        The orchestrator counts them against the capacity until the runner unregisters (the runner has no
        token to release them), so the capacity offered grows by as many; a late client still gets
        admission's answer (docs/protocol.md §10.4)."""
        limit = self._settings.input_timeout_s
        if not limit:
            return []
        now = time.monotonic()
        stale = [
            sid for sid, since in self._reserved.items() if sid not in self._sessions and now - since >= limit
        ]
        for sid in stale:
            if sid not in self._abandoned:
                self._abandoned.add(sid)
                log.warning(
                    "session %s: reserved %.0fs ago and never started; it no longer counts against the "
                    "capacity offered (the orchestrator keeps it until the runner unregisters)",
                    sid,
                    now - self._reserved[sid],
                )
        self._abandoned &= set(self._reserved)
        return stale

    def _apply(self, raw: bytes, sent: float, registration: _Registration | None) -> None:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("runner_id"), str):
            raise _Unreachable(f"the heartbeat answer is not a runner: {self._quote(raw)}")
        secret = answer.get("heartbeat_secret")
        if not isinstance(secret, str) or not secret:
            if registration is None:
                raise _Unreachable("the first heartbeat answer carries no heartbeat_secret")
            secret = registration.secret
        base = answer.get("orchestrator")
        base = (
            base.rstrip("/") if isinstance(base, str) and base.startswith(("http://", "https://")) else None
        )
        fallback = registration.base if registration is not None else self._orchestrator
        self._registration = _Registration(answer["runner_id"], base or fallback, secret)
        self._runner_id = self._registration.runner_id
        self._timers(answer)
        if registration is None:
            self._start_o2r(answer.get("o2r"))
        self._reconcile(answer.get("session_ids"), sent)
        if self._state != "registered" or self._failures:
            log.info(
                "registered as live runner %s with %s (heartbeat every %gs, TTL %s)",
                self._registration.runner_id,
                self._registration.base,
                self._interval or _FALLBACK_INTERVAL_S,
                f"{self._ttl:g}s" if self._ttl is not None else "unknown",
            )
        self._failures = 0
        self._enter("registered")

    def _timers(self, answer: dict[str, Any]) -> None:
        interval = parse_go_duration(answer.get("heartbeat_interval"))
        self._ttl = parse_go_duration(answer.get("heartbeat_ttl"))
        if interval is None or interval <= 0:
            if self._interval is None:
                log.warning(
                    "the heartbeat answer names no usable heartbeat_interval: %r",
                    answer.get("heartbeat_interval"),
                )
            interval = self._ttl / 3 if self._ttl else _FALLBACK_INTERVAL_S
        if self._ttl and interval >= self._ttl:
            interval = self._ttl / 3  # one late answer must not cost the registration
        self._interval = interval

    def _reconcile(self, listed: object, sent: float) -> None:
        """The orchestrator's ``session_ids`` are authoritative: remember the reserved ones, end the
        sessions it no longer lists (those started before the heartbeat left, so a session whose start
        crossed the answer is not ended by mistake)."""
        if not isinstance(listed, list) or not all(isinstance(sid, str) for sid in listed):
            return
        now = time.monotonic()
        self._reserved = {sid: self._reserved.get(sid, now) for sid in listed}
        for session in list(self._sessions.values()):
            if session.session_id not in listed and session.started < sent:
                log.info("session %s: no longer listed by the orchestrator; ending it", session.session_id)
                self._release(session)

    def _release(self, session: _Session) -> None:
        session.released = True
        self._spawn(self._control.end(session.session_id, EndReason.STOPPED), session.session_id)

    def _note_failure(self, exc: ByocError) -> None:
        self._enter("unreachable")
        self._failures += 1
        if self._failures == 1 or self._failures % _WARN_EVERY == 0:
            log.warning("%s (failure %d in a row); retrying", self._redact(str(exc)), self._failures)

    # --- the O2R channel ------------------------------------------------------------------------------

    def _start_o2r(self, channel: object) -> None:
        url = channel.get("url") if isinstance(channel, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            log.warning("the registration names no usable O2R channel; relying on the heartbeat alone")
            return
        if self._o2r is not None:
            self._o2r.cancel()
        self._o2r = asyncio.create_task(self._read_o2r(url), name="live-runner-o2r")

    async def _read_o2r(self, url: str) -> None:
        try:
            subscriber = TrickleSubscriber(
                url, session=self._client(), start_seq=0, settings=self._settings.trickle()
            )
            async with subscriber:
                async for segment in subscriber:
                    for line in (await segment.read()).splitlines():
                        if line.strip():
                            self._on_o2r(line)
            log.warning("the O2R channel ended; relying on the heartbeat alone")
        except ByocError as exc:
            log.warning("the O2R channel failed (%s); relying on the heartbeat alone", exc)

    def _on_o2r(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("O2R message is not JSON: %.80r", line)
            return
        if not isinstance(message, dict) or message.get("keep") == "alive":
            return
        event, sid = message.get("event"), message.get("session")
        if not isinstance(sid, str) or event not in ("reserved", "released"):
            log.debug("O2R message ignored: %.120r", message)
            return
        if event == "reserved":
            self._reserved.setdefault(sid, time.monotonic())
            return
        self._reserved.pop(sid, None)
        if (session := self._sessions.get(sid)) is not None and not session.released:
            log.info("session %s: released by the orchestrator; ending it", sid)
            self._release(session)

    # --- sessions (API loop) -------------------------------------------------------------------------

    async def _start(self, request: web.Request) -> web.StreamResponse:
        """``POST /stream/start`` through the orchestrator's proxy: the body is the session's
        parameters (or ``{"params": {...}}``); the answer carries the channels' public URLs."""
        sid = checked_stream_id(request.headers.get(SESSION_ID, ""), SESSION_ID)
        token = request.headers.get(SESSION_TOKEN, "")
        if not token:
            raise InvalidRequest(SESSION_TOKEN, "is required (the orchestrator's proxy adds it)")
        control = self._checked_control(request.headers.get(SESSION_CONTROL, ""))
        raw = await read_body(request)
        body = json_object(raw) if raw.strip() else {}
        params = body.get("params", body)
        if self._http is None or (self._registration is None and not self._static) or self._withdrawn:
            raise AdmissionRefused("not registered with the orchestrator")
        if sid in self._sessions:
            raise SessionExists(f"session {sid!r} is already running")
        session = _Session(sid, control, token)
        self._sessions[sid] = session
        try:
            urls = await self._create_channels(session)
            fields = {key: urls[name][0] for name, _, key, _ in CHANNELS}
            spec = start_spec(
                {**fields, "params": params}, header_id=sid, limits=self._control.settings.limits
            )
            await self._control.start(spec)
        except BaseException:
            self._sessions.pop(sid, None)
            if session.channels:
                await asyncio.shield(self._end_at_orchestrator(session, stop=False))
            raise
        self._spawn(self._watch(session), sid)
        answer = {client_key: urls[name][1] for name, _, _, client_key in CHANNELS}
        return web.json_response({"session_id": sid, "stream_id": sid, **answer})

    def _checked_control(self, value: str) -> str:
        """``Livepeer-Session-Control``, to which the session's token is sent: an http(s) URL on the
        orchestrator's host (as configured, or as its answers name it) or on an allowed channel host."""
        control = value.rstrip("/")
        try:
            if not control.startswith(("http://", "https://")):
                raise ValueError(control)
            host, port = url_address(control)
        except ValueError:
            raise InvalidRequest(
                SESSION_CONTROL, "must be the orchestrator's http(s) URL for the session"
            ) from None
        bases = [b for b in (self._orchestrator, self._registration.base if self._registration else "") if b]
        rules = [*self._settings.channel_host_rules(), *(HostRule(url_address(base)[0]) for base in bases)]
        if not any(rule.allows(host, port) for rule in rules):
            raise InvalidRequest(
                SESSION_CONTROL, f"names {host}, neither the orchestrator's host nor an allowed channel host"
            )
        return control

    async def _create_channels(self, session: _Session) -> dict[str, tuple[str, str]]:
        """``POST {control}/channels``: per channel name, the URL this runner uses (``internal_url`` when
        given) and the public one for the client."""
        wanted = [{"name": name, "mime_type": mime} for name, mime, _, _ in CHANNELS]
        status, raw = await self._session_call(session, "POST", "/channels", {"channels": wanted})
        if status != 200:
            raise web.HTTPBadGateway(
                reason=f"the orchestrator refused the session's channels: {status} {self._quote(raw)}"
            )
        session.channels = [name for name, _, _, _ in CHANNELS]
        try:
            listed = json.loads(raw)["channels"]
            urls = {
                item["name"]: (item.get("internal_url") or item["url"], item["url"])
                for item in listed
                if isinstance(item, dict)
            }
            missing = [name for name in session.channels if name not in urls]
        except (ValueError, KeyError, TypeError):
            missing = ["all"]
        if missing or not all(isinstance(url, str) for pair in urls.values() for url in pair):
            raise web.HTTPBadGateway(
                reason=f"the orchestrator's channels answer is unusable: {self._quote(raw)}"
            )
        return urls

    async def _watch(self, session: _Session) -> None:
        """Until the session ends (the session itself ends one without input for ``input_timeout_s``);
        then remove its channels and tell the orchestrator it is over."""
        sid = session.session_id
        try:
            while True:
                await asyncio.sleep(_WATCH_S)
                try:
                    self._control.status(sid)
                except SessionNotFound:
                    return
        finally:
            self._sessions.pop(sid, None)
            if not session.released:
                await self._end_at_orchestrator(session, stop=True)

    async def _end_at_orchestrator(self, session: _Session, *, stop: bool) -> None:
        """``DELETE {control}/channels``, then (``stop``) ``POST {control}/stop``; failures only logged."""
        calls: list[tuple[str, str, dict[str, Any] | None]] = [
            ("DELETE", "/channels", {"channels": session.channels})
        ]
        if stop:
            calls.append(("POST", "/stop", None))
        for method, path, body in calls:
            try:
                status, raw = await self._session_call(session, method, path, body)
            except aiohttp.ClientError as exc:
                log.warning("session %s: %s %s failed: %s", session.session_id, method, path, exc)
                continue
            if status >= 300:
                log.info(
                    "session %s: %s %s answered %d %s",
                    session.session_id,
                    method,
                    path,
                    status,
                    self._quote(raw),
                )

    async def _session_call(
        self, session: _Session, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[int, bytes]:
        headers = {SESSION_TOKEN: session.token}
        try:
            async with self._client().request(
                method, session.control + path, json=body, headers=headers, **self._options()
            ) as response:
                return response.status, await response.read()
        except (OSError, TimeoutError) as exc:
            raise aiohttp.ClientError(f"{type(exc).__name__}: {exc}") from exc

    # --- the drain (API loop) -------------------------------------------------------------------------

    async def _withdraw(self) -> None:
        self._withdrawn = True
        if self._http is None or self._registration is None:
            return
        try:
            await self._beat()
        except ByocError as exc:
            log.warning("the draining heartbeat failed: %s", self._redact(str(exc)))

    async def _close(self) -> None:
        if self._watchers:  # the ended sessions' last calls; unregistering releases whatever is left
            await asyncio.wait(set(self._watchers), timeout=_CLOSE_WAIT_S)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        registration = self._registration
        if self._http is not None and registration is not None:
            url = f"{registration.base}/runners/{quote(registration.runner_id, safe='')}/unregister"
            try:
                async with self._http.post(
                    url, headers={"Authorization": registration.secret}, **self._options()
                ) as response:
                    status = response.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("could not unregister live runner %s: %s", registration.runner_id, exc)
            else:
                if status < 300:
                    self._enter("unregistered_on_shutdown")
                    log.info("unregistered live runner %s", registration.runner_id)
                else:
                    log.warning("unregistering live runner %s: answered %d", registration.runner_id, status)
        if self._done is not None:
            self._done.set()

    # --- internals ------------------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, object], sid: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(f"{sid}:live-runner")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise AdmissionRefused("not registered with the orchestrator")
        return self._http

    def _options(self) -> dict[str, Any]:
        # No redirects: the secrets stay with the host they were meant for.
        return {"timeout": self._timeout, "allow_redirects": False}

    def _failed(self, status: int, raw: bytes) -> _Unreachable:
        return _Unreachable(f"the orchestrator answered the heartbeat with {status}: {self._quote(raw)}")

    def _quote(self, raw: bytes) -> str:
        text = raw.decode("utf-8", "replace").strip()
        text = text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "…"
        return self._redact(repr(text))

    def _redact(self, text: str) -> str:
        secrets = [self._secret, *([self._registration.secret] if self._registration else [])]
        for secret in secrets:
            if secret:
                text = text.replace(secret, "<secret>")
        return text
