"""``byoc serve`` under a low open-file limit, flooded with connections that never send a request."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.e2e.serve import ServeProcess

pytestmark = pytest.mark.e2e

OPEN_FILES = 512
FLOOD = 1500


@contextlib.contextmanager
def open_files_limit(limit: int) -> Iterator[None]:
    """Processes started meanwhile inherit a soft RLIMIT_NOFILE of ``limit``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.asynccontextmanager
async def serve_with_few_files(http: aiohttp.ClientSession, *args: str) -> AsyncIterator[ServeProcess]:
    serve = ServeProcess("--max-sessions", "2", *args)
    try:
        with open_files_limit(OPEN_FILES):
            await serve.start()
        await serve.wait_ready(http)
        yield serve
    finally:
        await serve.kill()


@contextlib.asynccontextmanager
async def idle_connections(serve: ServeProcess, count: int) -> AsyncIterator[int]:
    """Up to ``count`` connections that send nothing, opened 100 at a time (fewer if the server stops
    taking them)."""

    async def connect() -> asyncio.StreamWriter:
        async with asyncio.timeout(3):
            return (await asyncio.open_connection("127.0.0.1", serve.port))[1]

    writers: list[asyncio.StreamWriter] = []
    try:
        while len(writers) < count:
            size = min(100, count - len(writers))
            batch = await asyncio.gather(*(connect() for _ in range(size)), return_exceptions=True)
            taken = [writer for writer in batch if isinstance(writer, asyncio.StreamWriter)]
            writers += taken
            if len(taken) < size:
                break
        yield len(writers)
    finally:
        for writer in writers:
            writer.close()


def accept_error_lines(serve: ServeProcess) -> int:
    signs = ("socket.accept()", "cannot accept connections", "Too many open files")
    return sum(any(sign in line for sign in signs) for line in serve.lines)


async def health_status(http: aiohttp.ClientSession, serve: ServeProcess) -> int:
    async with http.get(f"{serve.url}/health", timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status


async def test_a_flood_of_idle_connections_leaves_the_api_answering(http: aiohttp.ClientSession) -> None:
    async with serve_with_few_files(http) as serve, idle_connections(serve, FLOOD) as opened:
        assert opened == FLOOD  # the server kept taking connections, closing the oldest idle ones
        assert await health_status(http, serve) == 200
        async with http.post(f"{serve.url}/stream/start", data=b"{}") as response:
            assert response.status == 400  # a refusal with a reason, not a timeout
        assert accept_error_lines(serve) == 0, serve.log[-3000:]


async def test_failed_accepts_are_logged_at_a_bounded_rate(http: aiohttp.ClientSession) -> None:
    # a cap beyond the open-file limit: the process does run out of descriptors
    async with serve_with_few_files(http, "--api-max-connections", str(FLOOD * 2)) as serve:
        async with idle_connections(serve, FLOOD):
            await serve.wait_for_log("Too many open files", timeout=30)
        async with asyncio.timeout(30):
            while True:  # the listener retries once the flood has gone
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    if await health_status(http, serve) == 200:
                        break
        assert 1 <= accept_error_lines(serve) <= 3, serve.log[-3000:]
