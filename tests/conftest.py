"""Fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from byoc.dev.trickle_server import RunningTrickle, serve_trickle
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.protocol import RetryPolicy

FAST_RETRY = RetryPolicy(max_retries=4, initial_delay_s=0.01, max_delay_s=0.05, max_elapsed_s=5.0)
TEST_CLIENT_SETTINGS = TrickleClientSettings(
    retry=FAST_RETRY, idle_read_timeout_s=5.0, preconnect_refresh_s=4.0, response_timeout_s=5.0
)


@pytest.fixture
async def trickle() -> AsyncIterator[RunningTrickle]:
    """A byoc trickle server on loopback (auto-create off, like the orchestrator's)."""
    async with serve_trickle() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A trickle client session with fast retries."""
    async with create_client_session(TEST_CLIENT_SETTINGS) as session:
        yield session
