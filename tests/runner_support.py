"""Helpers for driving the local orchestrator's live-runner side over loopback HTTP, as runners and
clients drive go-livepeer's."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from byoc.dev.orchestrator import LocalOrchestrator, OrchestratorSettings
from byoc.errors import TrickleError
from byoc.trickle.subscriber import TrickleSubscriber

SECRET = "s3cret"
RUNNER = {"runner_url": "http://127.0.0.1:9", "app": "live-video-to-video/demo", "capacity": 1}


@contextlib.asynccontextmanager
async def orchestrator(**settings: Any) -> AsyncIterator[LocalOrchestrator]:
    orch = LocalOrchestrator(OrchestratorSettings(**{"port": 0, "secret": SECRET, **settings}))
    stop = asyncio.Event()
    task = asyncio.create_task(orch.serve(shutdown=stop.wait()))
    await orch.wait_listening()
    try:
        yield orch
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: object = None, **headers: str
) -> tuple[int, Any]:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.request(method, url, data=data, headers=headers) as response:
        text = await response.read()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text.decode()


async def register(http: aiohttp.ClientSession, orch: LocalOrchestrator, **fields: Any) -> dict[str, Any]:
    status, answer = await call(
        http, "POST", f"{orch.base_url}/runners/heartbeat", {**RUNNER, **fields}, Authorization=SECRET
    )
    assert status == 200, answer
    assert isinstance(answer, dict)
    return answer


class O2R:
    """The runner's reader of its O2R channel: every JSON document, in order."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.messages: list[dict[str, Any]] = []
        self.ended = False
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read(url, http))

    async def _read(self, url: str, http: aiohttp.ClientSession) -> None:
        with contextlib.suppress(TrickleError):
            async with TrickleSubscriber(url, session=http, start_seq=0) as subscriber:
                async for segment in subscriber:
                    self.messages.append(json.loads(await segment.read()))
                    async with self._changed:
                        self._changed.notify_all()
        self.ended = True
        async with self._changed:
            self._changed.notify_all()

    def events(self) -> list[tuple[str, str]]:
        return [(m["event"], m["session"]) for m in self.messages if "event" in m]

    async def wait(self, predicate: Callable[[O2R], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def o2r_reader(url: str, http: aiohttp.ClientSession) -> AsyncIterator[O2R]:
    reader = O2R(url, http)
    try:
        yield reader
    finally:
        await reader.close()
