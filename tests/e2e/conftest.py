"""Fixtures for end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import FakeOrchestrator, serving_orchestrator


@pytest.fixture
async def fake_orchestrator() -> AsyncIterator[FakeOrchestrator]:
    async with serving_orchestrator() as fake:
        yield fake
