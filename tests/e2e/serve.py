"""``byoc serve`` as a real subprocess, for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from types import TracebackType
from typing import Self

import aiohttp

_LISTENING = re.compile(r"listening on \S+:(\d+)")


class ServeProcess:
    """Starts ``python -m byoc serve ARGS --port 0`` and follows its log."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = ["-m", "byoc", "serve", *args, "--port", "0", "--host", "127.0.0.1"]
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._new_line = asyncio.Condition()
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def __aenter__(self) -> Self:
        self.started_at = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *self.args, stderr=asyncio.subprocess.PIPE, env=self.env
        )
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(30):
            await self._listening.wait()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(5):
                    await self._reader

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            async with self._new_line:
                self._new_line.notify_all()
            if match := _LISTENING.search(line):
                self.port = int(match.group(1))
                self._listening.set()

    async def wait_for_log(self, text: str, timeout: float = 30.0) -> str:  # noqa: ASYNC109
        """The first log line containing ``text``, waiting for it."""
        async with asyncio.timeout(timeout), self._new_line:
            await self._new_line.wait_for(lambda: any(text in line for line in self.lines))
        return next(line for line in self.lines if text in line)

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until /health says the processor is loaded."""
        async with asyncio.timeout(timeout):
            while True:
                async with http.get(f"{self.url}/health") as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.05)

    def signal(self, number: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    async def wait_exit(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        assert self.process is not None
        async with asyncio.timeout(timeout):
            return await self.process.wait()
