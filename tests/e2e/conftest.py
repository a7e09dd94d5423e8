"""Fixtures for end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import FakeOrchestrator, serve_app


@pytest.fixture
async def fake_orchestrator() -> AsyncIterator[FakeOrchestrator]:
    fake = FakeOrchestrator()
    async with serve_app(fake.app()) as url:
        fake.url = url
        yield fake
