"""The runtime as the API sees it: the one place where API requests cross over to the main loop.

Sessions and the session manager are mutated only on the runtime's main loop (docs/architecture.md).
:class:`RuntimeControl` implements :class:`byoc.serve.api.Control` for the API thread: each command —
start, parameter update, stop — runs on the main loop through byoc.threads.run_on_loop, and the API
thread awaits its result; each read — status, health, metrics — takes a snapshot at once without
waiting for the main loop (so ``/health`` answers while it is busy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from byoc.errors import AdmissionRefused, SessionNotFound
from byoc.params import check_params_size
from byoc.serve.api import ApiSettings
from byoc.serve.config import Settings
from byoc.serve.health import HealthView
from byoc.serve.manager import SessionManager
from byoc.serve.metrics import RuntimeMetrics
from byoc.serve.validation import ChannelPolicy, RequestLimits
from byoc.session.stats import SessionStatistics
from byoc.spec import EndReason, StreamSpec
from byoc.threads import run_on_loop

__all__ = ["RuntimeControl", "api_settings"]


def api_settings(settings: Settings) -> ApiSettings:
    """The part of the runtime's settings the API uses."""
    return ApiSettings(
        token=settings.bearer_token(),
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.api_body_timeout_s,
        body_memory_bytes=settings.api_body_memory_bytes,
        limits=RequestLimits(settings.max_params_bytes, settings.max_output_pixels),
        health_style=settings.health_style,
        healthy_while_draining=settings.protocol == "live-runner-static",
        capability=settings.capability_name,
        processor=settings.processor,
        stop_answer_s=settings.stop_answer_s(),
    )


class RuntimeControl:
    """:class:`byoc.serve.api.Control` over a session manager that lives on ``main_loop``."""

    def __init__(
        self,
        manager: SessionManager,
        main_loop: asyncio.AbstractEventLoop,
        *,
        settings: ApiSettings,
        health: Callable[[], HealthView],
        metrics: RuntimeMetrics,
    ) -> None:
        self._manager = manager
        self._main = main_loop
        self._settings = settings
        self._health = health
        self._metrics = metrics
        self._channels: ChannelPolicy | None = None

    @property
    def settings(self) -> ApiSettings:
        return self._settings

    def guard_channels(self, policy: ChannelPolicy) -> None:
        """Check every start's channel URLs against ``policy`` (set once the API's port is known;
        starts before that are refused with 503)."""
        self._channels = policy

    # --- commands: run on the main loop ---------------------------------------------------------

    async def start(self, spec: StreamSpec) -> str:
        if self._channels is None:
            raise AdmissionRefused("the container is still starting")
        self._channels.check(spec)  # on this thread, before anything is created for the stream
        return await run_on_loop(self._main, self._start(spec))

    async def update_params(self, stream_id: str | None, params: Mapping[str, Any]) -> str:
        return await run_on_loop(self._main, self._update_params(stream_id, dict(params)))

    async def stop(self, stream_id: str | None) -> str | None:
        return await run_on_loop(self._main, self._stop(stream_id))

    async def end(self, stream_id: str, reason: EndReason) -> bool:
        """Ask the session ``stream_id`` to end for ``reason`` (a protocol ending it: the orchestrator
        released it, or its input stopped); False when there is no such session."""
        return await run_on_loop(self._main, self._end(stream_id, reason))

    async def _start(self, spec: StreamSpec) -> str:
        return (await self._manager.start(spec)).stream_id

    async def _end(self, stream_id: str, reason: EndReason) -> bool:
        return self._manager.stop(stream_id, reason)

    async def _update_params(self, stream_id: str | None, params: dict[str, Any]) -> str:
        session = self._manager.resolve(stream_id)
        if session is None:
            raise SessionNotFound(
                f"no session {stream_id!r}" if stream_id else "no stream id given and not one session"
            )
        merged = {**session.statistics().params, **params}  # updates add up: bound what they add up to
        check_params_size(merged, self._settings.limits.max_params_bytes)
        session.update_params(params)
        return session.stream_id

    async def _stop(self, stream_id: str | None) -> str | None:
        session = self._manager.resolve(stream_id)
        if session is None:
            return None
        self._manager.stop(session.stream_id, EndReason.STOPPED)
        # go-livepeer closes the channels once it has the answer: the session's last words go first
        await self._manager.wait_final_event(session.stream_id, self._settings.stop_answer_s)
        return session.stream_id

    # --- reads: snapshots, taken on the calling thread ------------------------------------------

    def status(self, stream_id: str) -> SessionStatistics:
        return self._manager.get(stream_id).statistics()

    def statuses(self) -> list[SessionStatistics]:
        return self._manager.statistics()

    def health(self) -> HealthView:
        return self._health()

    def render_metrics(self) -> bytes:
        return self._metrics.render()

    def count_error(self, kind: str) -> None:
        self._metrics.error(kind)
