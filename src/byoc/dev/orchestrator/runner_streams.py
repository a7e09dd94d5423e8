"""A stream on a live runner, for the local orchestrator's ``/live-video-to-video`` curl loop.

The orchestrator plays the client: it reserves a session on a ready, persistent runner whose ``app`` is
``live-video-to-video/MODEL`` (or ``MODEL``), then posts the start request through the session, with
the headers the proxy adds, to ``runner_url/<start path>`` (``live-video-to-video`` by default)::

    {"gateway_request_id": ID, "model_id": MODEL, "stream_id": ID, "params": {...} | null}

The runner creates its trickle channels with the session callbacks and answers with their URLs from
the client's side — ``publish_url`` (the input), ``subscribe_url`` (the output), ``control_url``,
``events_url`` and optionally ``data_url`` — the answer go-livepeer's gateways expect from a
live-video-to-video start. From there the stream is the BYOC side's (:class:`LocalStream`): synthetic
input, control keep-alives, output and event readers, statistics. An update is written to the control
channel; a stop releases the session (O2R ``released``, channels removed), and a session released any
other way (the runner's own stop, unregistering, heartbeat expiry) ends the stream.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from byoc.dev.orchestrator.live_runner import session_headers, target_url
from byoc.dev.orchestrator.registry import Capability
from byoc.dev.orchestrator.runners import LiveRunner, RunnerError, RunnerRegistry, RunnerSession
from byoc.dev.orchestrator.streams import LocalStream, StreamRequest
from byoc.dev.trickle_server import TrickleServer
from byoc.trickle.layout import Role, StreamChannels

__all__ = ["DEFAULT_START_PATH", "RunnerStream", "pick_runner"]

DEFAULT_START_PATH = "live-video-to-video"
_START_TIMEOUT_S = 30.0
_ANSWER_FIELDS: dict[str, Role] = {
    "publish_url": "input",
    "subscribe_url": "output",
    "control_url": "control",
    "events_url": "events",
    "data_url": "data",
}


def pick_runner(registry: RunnerRegistry, model_id: str) -> LiveRunner | None:
    """A ready persistent runner serving ``model_id`` with a free slot; None if none serves it at all.

    Raises:
        RunnerError: 503 when runners serve it but every one is full.
    """
    apps = (f"live-video-to-video/{model_id}", model_id)
    serving = [r for r in registry.discovery() if r.info.app in apps and r.info.mode == "persistent"]
    if not serving:
        return None
    free = [runner for runner in serving if len(runner.sessions) < runner.info.capacity]
    if not free:
        raise RunnerError(503, "no capacity available for runner")
    return free[0]


class RunnerStream(LocalStream):
    """A :class:`LocalStream` whose container is a live runner's session."""

    def __init__(
        self,
        request: StreamRequest,
        registry: RunnerRegistry,
        runner: LiveRunner,
        session: RunnerSession,
        trickle: TrickleServer,
        http: aiohttp.ClientSession,
        start_path: str = DEFAULT_START_PATH,
    ) -> None:
        # the session is this stream's one unit of the runner's capacity
        share = Capability(name=runner.info.app, url=runner.info.runner_url, capacity=1, load=1)
        super().__init__(request, share, trickle, registry.trickle_url, http)
        self._registry = registry
        self._runner = runner
        self._session = session
        self._start_path = start_path

    def start_body(self) -> dict[str, Any]:
        return {
            "gateway_request_id": self.stream_id,
            "model_id": self.request.model_id,
            "stream_id": self.stream_id,
            "params": self.request.params,
        }

    def gateway_urls(self) -> dict[str, str]:
        return {field: self.urls[role] for field, role in _ANSWER_FIELDS.items() if role in self.urls}

    async def start(self) -> tuple[int, bytes]:
        """Post the start through the session; on any failure the session is released."""
        url = target_url(self._runner.info.runner_url, self._start_path, "")
        headers = {
            **session_headers(self._registry, self._runner, self._session),
            "Content-Type": "application/json",
        }
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                async with self._http.post(
                    url, data=json.dumps(self.start_body()), headers=headers
                ) as response:
                    status, body = response.status, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            status, body = 502, f"live runner did not answer the start: {exc}".encode()
        if status < 400:
            try:
                self.urls = _channel_urls(body)
            except ValueError as exc:
                status, body = 502, json.dumps({"error": str(exc)}).encode()
        if status >= 400:
            self._close_channels()
            return status, body
        self.channels = StreamChannels(self.stream_id, data="data" in self.urls)
        return status, body

    async def update(self, body: bytes) -> tuple[int, bytes]:
        """Write the update to the control channel, as a client of a live runner does."""
        try:
            update = json.loads(body)
        except ValueError:
            update = None
        if not isinstance(update, dict):
            return 400, b'{"error": "the update must be a JSON object"}'
        name = self.urls["control"].rsplit("/", 1)[-1]
        if not self._trickle.write_segment(name, json.dumps(update).encode()):
            return 404, b'{"error": "the control channel is gone"}'
        return 200, json.dumps({"stream_id": self.stream_id, "status": "updated"}).encode()

    async def stop(self, body: bytes = b"stream ended") -> tuple[int, bytes]:
        """The client's stop: release the session; the runner learns it on its O2R channel."""
        self.end_reason = self.end_reason or "stopped"
        self._close_channels()
        self._stopping.set()
        return 200, b""

    def _close_channels(self) -> None:
        self._registry.release(self._runner, self._session.session_id)

    async def _watch_container(self) -> None:
        await self._session.released.wait()
        self._container_ended("session released")

    def statistics(self) -> dict[str, Any]:
        return {**super().statistics(), "runner_id": self._runner.runner_id}


def _channel_urls(body: bytes) -> dict[Role, str]:
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ValueError("the live runner's start answer is not a JSON object")
    urls: dict[Role, str] = {
        role: answer[field] for field, role in _ANSWER_FIELDS.items() if isinstance(answer.get(field), str)
    }
    missing = [field for field, role in _ANSWER_FIELDS.items() if role != "data" and role not in urls]
    if missing:
        raise ValueError(f"the live runner's start answer lacks {', '.join(missing)}")
    return urls
