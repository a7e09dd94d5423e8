"""Fixtures for end-to-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web


class FakeOrchestrator:
    """go-livepeer's /capability/register and /capability/unregister (protocol.md §1), recording calls."""

    def __init__(self) -> None:
        self.secret = "secret"
        self.fail_next = 0
        self.requests: list[tuple[str, str, bytes]] = []
        self.url = ""
        self._seen = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, request.headers.get("Authorization", ""), body))
        async with self._seen:
            self._seen.notify_all()
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="try later")
        if request.headers.get("Authorization") != self.secret:
            return web.Response(status=400, text="invalid authorization")
        return web.Response(text="ok", content_type="application/json")

    async def wait_for(self, path: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._seen:
            await self._seen.wait_for(lambda: any(r[0] == path for r in self.requests))


@pytest.fixture
async def fake_orchestrator() -> AsyncIterator[FakeOrchestrator]:
    fake = FakeOrchestrator()
    app = web.Application()
    app.router.add_post("/capability/register", fake.handle)
    app.router.add_post("/capability/unregister", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()
