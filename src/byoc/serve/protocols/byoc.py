"""The BYOC protocol: capability registration with a go-livepeer orchestrator (docs/protocol.md §1)
and the ``/stream/*`` routes it calls (§2, served by byoc.serve.api).

The container announces where it lives and what it costs with ``POST /capability/register`` and keeps
announcing it: the orchestrator holds registrations in memory only and forgets them on restart without
telling anyone. Registering again also zeroes the orchestrator's load counter for the capability, so
the periodic refresh happens only while no session runs (§1.7, pitfalls P1 and P5). Between
registrations a heartbeat checks that the orchestrator answers; after a failed heartbeat or
registration the container registers again as soon as the orchestrator answers and no session runs.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from byoc.errors import ByocError, ConfigError
from byoc.serve.api import STREAM_ROUTES, Route
from byoc.serve.gpu import device_label
from byoc.trickle.protocol import RetryPolicy, RetryState

if TYPE_CHECKING:
    from byoc.serve.config import Settings
    from byoc.serve.protocols import RuntimeView

__all__ = ["ByocProtocol", "CapabilityInfo", "Registrar", "RegistrarState"]

log = logging.getLogger(__name__)


class RegistrarState(enum.StrEnum):
    """Where the registration stands (``/health`` reports it); see :class:`Registrar`."""

    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    UNREACHABLE = "unreachable"
    PENDING = "pending"
    REFUSED = "refused"
    UNREGISTERED_ON_SHUTDOWN = "unregistered_on_shutdown"


REGISTER_PATH = "/capability/register"
UNREGISTER_PATH = "/capability/unregister"
DEFAULT_RETRY = RetryPolicy(
    max_retries=1_000_000, initial_delay_s=0.5, max_delay_s=5.0, max_elapsed_s=float("inf")
)
_LOCAL_CURRENCIES = ("", "wei", "eth")
_QUOTE_CHARS = 200
_WARN_EVERY = 10


class _RetryableError(ByocError):
    """An attempt failed in a way that may pass: transport error, timeout, dropped connection, 5xx."""


@dataclass(frozen=True, slots=True)
class CapabilityInfo:
    """What the orchestrator is told. ``url`` loses any trailing ``/`` (O appends paths to it, P24)."""

    name: str
    url: str
    description: str = ""
    capacity: int = 1
    price_per_unit: int = 0
    price_scaling: int = 1
    currency: str = "wei"
    token: str = field(default="", repr=False)
    """The container's bearer token: O then sends ``Authorization: Bearer <token>`` on every stream call."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))
        problems = []
        if not self.name:
            problems.append("capability name must not be empty")
        if not self.url.startswith(("http://", "https://")):
            problems.append(f"capability url must be an http(s) URL, got {self.url!r}")
        for key in ("capacity", "price_per_unit", "price_scaling"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{key} must be an integer (the orchestrator rejects {value!r})")
            elif value < (1 if key == "price_scaling" else 0):
                problems.append(f"{key} is out of range: {value}")
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | None = None) -> CapabilityInfo:
        """The registration ``settings`` describe; ``device`` (``gpu 1: NVIDIA H100``, with ``--gpu``)
        is added to the description."""
        description = settings.capability_description
        if device:
            description = f"{description} ({device})" if description else device
        return cls(
            name=settings.capability_name,
            url=settings.advertised_url(),
            description=description,
            capacity=settings.max_sessions,
            price_per_unit=settings.price_per_unit,
            price_scaling=settings.price_scaling,
            currency=settings.currency,
            token=settings.bearer_token() or "",
        )

    def body(self) -> dict[str, str | int]:
        """The JSON object ``/capability/register`` expects; ``token`` only when stream routes need one."""
        body: dict[str, str | int] = {
            "name": self.name,
            "url": self.url,
            "capacity": self.capacity,
            "price_per_unit": self.price_per_unit,
            "price_scaling": self.price_scaling,
            "currency": self.currency,
            "description": self.description,
        }
        if self.token:
            body["token"] = self.token
        return body


class Registrar:
    """Registers this container's capability with a go-livepeer orchestrator and keeps it registered.

    ``state`` is ``unregistered`` before the first attempt, ``registering`` while the first attempt runs,
    ``registered`` after a registration that every heartbeat since has confirmed, ``unreachable`` after a
    heartbeat or registration failed in a retryable way (transport error, timeout, dropped connection,
    5xx; the orchestrator may have restarted and forgotten the registration), ``pending`` once it answers
    again while sessions run (registering waits for them to end, P1), ``refused`` after a 400 (wrong
    secret or bad body: never retried), and ``unregistered_on_shutdown`` after a successful
    :meth:`unregister`. Apart from a refusal, :meth:`run` never stops trying on its own; ``retry`` only
    shapes the delays (at ``max_delay_s`` once its budget is spent).
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        orchestrator_url: str,
        secret: str,
        capability: CapabilityInfo,
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        reregister_interval_s: float = 30.0,
        heartbeat_interval_s: float = 5.0,
        request_timeout_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_state: Callable[[RegistrarState], None] = lambda state: None,
    ) -> None:
        """``on_state`` is called with every new :attr:`state`."""
        self._base = orchestrator_url.rstrip("/")
        if not self._base.startswith(("http://", "https://")):
            raise ConfigError(f"orchestrator_url must be an http(s) URL, got {orchestrator_url!r}")
        if "\r" in secret or "\n" in secret:
            raise ConfigError("the orchestrator secret contains a line break and cannot be sent as a header")
        if reregister_interval_s < 0 or heartbeat_interval_s < 0 or request_timeout_s <= 0:
            raise ConfigError(
                "reregister_interval_s and heartbeat_interval_s must be >= 0 and request_timeout_s > 0"
            )
        self._http = http
        self._shown = str(URL(self._base).with_user(None))
        self._secret = secret
        self.capability = capability
        self._retry = retry
        self._interval = reregister_interval_s
        self._heartbeat = heartbeat_interval_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._sleep = sleep
        self._on_state = on_state
        self._state = RegistrarState.UNREGISTERED
        self._last_error: str | None = None
        self._failures = 0  # consecutive retryable failures, for rate-limited warnings
        self._announced = False

    @classmethod
    def from_settings(
        cls,
        http: aiohttp.ClientSession,
        settings: Settings,
        *,
        device: str | None = None,
        on_state: Callable[[RegistrarState], None] = lambda state: None,
    ) -> Registrar:
        secret = settings.secret()
        if not settings.orchestrator_url or secret is None:
            raise ConfigError("registration needs orchestrator_url and orch_secret or orch_secret_file")
        return cls(
            http,
            settings.orchestrator_url,
            secret,
            CapabilityInfo.from_settings(settings, device=device),
            reregister_interval_s=settings.reregister_interval_s,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            on_state=on_state,
        )

    @property
    def state(self) -> RegistrarState:
        return self._state

    def _enter(self, state: RegistrarState) -> None:
        self._state = state
        self._on_state(state)

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def __repr__(self) -> str:
        name, state = self.capability.name, self._state
        return f"Registrar(orchestrator={self._shown!r}, capability={name!r}, state={str(state)!r})"

    async def register_once(self) -> None:
        """One ``POST /capability/register``: ConfigError on 400, a retryable ByocError on anything else."""
        if self._state is RegistrarState.UNREGISTERED:
            self._enter(RegistrarState.REGISTERING)
        name = self.capability.name
        body = json.dumps(self.capability.body()).encode()
        try:
            status, text = await self._post(REGISTER_PATH, body, "application/json")
        except (aiohttp.ClientError, OSError) as exc:
            currency, hint = self.capability.currency, ""
            if isinstance(exc, aiohttp.ServerDisconnectedError) and currency.lower() not in _LOCAL_CURRENCIES:
                hint = f" (an orchestrator without a price feed drops the connection for {currency!r})"
            raise self._unreachable(self._describe(exc) + hint) from exc
        if 200 <= status < 300:  # the body is "ok" although Content-Type says JSON: not parsed
            self._last_error = None
            self._enter(RegistrarState.REGISTERED)
            level = logging.INFO if not self._announced or self._failures else logging.DEBUG
            log.log(level, "registered capability %r (%s) with %s", name, self.capability.url, self._shown)
            self._announced, self._failures = True, 0
            return
        if status == 400:
            self._enter(RegistrarState.REFUSED)
            if text.startswith("invalid authorization"):
                reason = "refused the secret (check orch_secret: it is sent raw, without 'Bearer ')"
            else:
                reason = f"refused the registration of {name!r}"
            raise self._failed(ConfigError, f"{reason}: 400 {text!r}")
        raise self._unreachable(f"answered {status} {text!r}")

    async def check_once(self) -> None:
        """One heartbeat: ``GET`` on the register route, without the secret. Any answer below 500
        (go-livepeer's is 405) shows the orchestrator is up; a transport error, timeout or 5xx raises a
        retryable ByocError and makes the state ``unreachable``."""
        try:
            async with self._http.get(self._base + REGISTER_PATH, **self._options()) as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unreachable(self._describe(exc)) from exc
        if resp.status >= 500:
            raise self._unreachable(f"answered the heartbeat with {resp.status}")

    async def run(self, is_idle: Callable[[], bool]) -> None:
        """Register until it works, then keep the registration: a heartbeat every
        ``heartbeat_interval_s``, a registration again every ``reregister_interval_s`` while
        ``is_idle()``, and after any failure a registration as soon as the orchestrator answers and no
        session runs (with backoff).

        Returns only after a refusal (or at once when heartbeat and re-registration are both off and the
        first registration worked).
        """
        if not await self._keep_trying(lambda: True, failed=False):
            return
        tick = self._heartbeat or self._interval
        since_registered = 0.0
        while tick > 0:
            await self._sleep(tick)
            since_registered += tick
            due = 0 < self._interval <= since_registered
            try:
                if due and is_idle():
                    await self.register_once()
                    since_registered = 0.0
                elif self._heartbeat > 0:
                    await self.check_once()
                else:
                    log.debug("not registering %r again now: sessions are running", self.capability.name)
                continue
            except ConfigError as exc:
                log.error("%s; giving up on registration", exc)
                return
            except _RetryableError as exc:
                self._note_failure(exc)
            if not await self._keep_trying(is_idle, failed=True):
                return
            since_registered = 0.0

    async def unregister(self) -> None:
        """``POST /capability/unregister`` with the raw name as the body; failures are only logged."""
        name = self.capability.name
        try:
            status, text = await self._post(UNREGISTER_PATH, name.encode(), "text/plain; charset=utf-8")
        except Exception as exc:  # shutdown must go on whatever happens here
            log.warning("could not unregister %r from %s: %s", name, self._shown, self._describe(exc))
            return
        if status != 200:
            log.warning("unregistering %r from %s: answered %d %r", name, self._shown, status, text)
            return
        self._enter(RegistrarState.UNREGISTERED_ON_SHUTDOWN)
        log.info("unregistered capability %r from %s", name, self._shown)

    # --- internals ----------------------------------------------------------------------------------

    async def _keep_trying(self, is_idle: Callable[[], bool], *, failed: bool) -> bool:
        """Register as soon as the orchestrator takes it, retrying with backoff (after a first delay
        when ``failed``). While sessions run only the heartbeat is tried (``pending`` once it answers):
        registering then would zero the orchestrator's load counter (P1). True once registered, False
        after a refusal."""
        retry_state = RetryState()
        if failed:
            retry_state = await self._back_off(retry_state)
        while True:
            try:
                if is_idle():
                    await self.register_once()
                    return True
                await self.check_once()
                if self._state is RegistrarState.UNREACHABLE:
                    self._enter(RegistrarState.PENDING)
                    log.info("orchestrator %s answers again; registering once no session runs", self._shown)
            except ConfigError as exc:
                log.error("%s; giving up on registration", exc)
                return False
            except _RetryableError as exc:
                self._note_failure(exc)
            retry_state = await self._back_off(retry_state)

    def _note_failure(self, exc: ByocError) -> None:
        self._failures += 1
        loud = self._failures == 1 or self._failures % _WARN_EVERY == 0
        level = logging.WARNING if loud else logging.DEBUG
        log.log(level, "%s (failure %d in a row); retrying with backoff", exc, self._failures)

    async def _back_off(self, retry_state: RetryState) -> RetryState:
        retry_state, delay = self._retry.after_failure(retry_state, time.monotonic())
        await self._sleep(self._retry.max_delay_s if delay is None else delay)
        return retry_state

    def _options(self) -> dict[str, Any]:
        # No redirects (the secret stays with this host) and no raise_for_status from the caller's session.
        return {"timeout": self._timeout, "allow_redirects": False, "raise_for_status": False}

    async def _post(self, path: str, body: bytes, content_type: str) -> tuple[int, str]:
        headers = {"Authorization": self._secret, "Content-Type": content_type}
        options = self._options()
        async with self._http.post(self._base + path, data=body, headers=headers, **options) as resp:
            raw = await resp.read()
        text = raw.decode("utf-8", "replace").strip()
        if len(text) > _QUOTE_CHARS:
            text = text[:_QUOTE_CHARS] + "…"
        return resp.status, self._redact(text)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout.total}s"
        return self._redact(f"{type(exc).__name__}: {exc}")

    def _failed(self, kind: type[ByocError], detail: str) -> ByocError:
        message = self._redact(f"orchestrator {self._shown} {detail}")
        self._last_error = message
        return kind(message)

    def _unreachable(self, detail: str) -> ByocError:
        self._enter(RegistrarState.UNREACHABLE)
        return self._failed(_RetryableError, detail)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "<secret>") if self._secret else text


class ByocProtocol:
    """byoc.serve.protocols.ProtocolAdapter for BYOC: the ``/stream/*`` routes, and a :class:`Registrar`
    when ``orchestrator_url`` is set. Withdrawing stops the registrar (no idle re-registration may follow)
    and unregisters; closing has nothing left to say."""

    def __init__(self, settings: Settings, *, http: aiohttp.ClientSession, view: RuntimeView) -> None:
        self._settings = settings
        self._http = http
        self._view = view
        self._registrar: Registrar | None = None
        self._running: asyncio.Task[object] | None = None

    def routes(self) -> Sequence[Route]:
        return STREAM_ROUTES

    @property
    def state(self) -> str | None:
        return None if self._registrar is None else str(self._registrar.state)

    async def run(self) -> None:
        if not self._settings.orchestrator_url:
            return
        self._running = asyncio.current_task()
        index = self._settings.gpu
        device = None if index is None else device_label(index, self._view.gpu_devices())
        self._registrar = Registrar.from_settings(
            self._http, self._settings, device=device, on_state=lambda _: self._view.health_changed()
        )
        await self._registrar.run(is_idle=lambda: self._view.offer().running == 0)

    async def withdraw(self) -> None:
        if self._running is not None:
            self._running.cancel()
        if self._registrar is not None:
            await self._registrar.unregister()

    async def close(self) -> None:
        return None
