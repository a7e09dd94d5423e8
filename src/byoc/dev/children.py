"""byoc commands run as child processes (``python -m byoc ...``), for the demo, the check tool, the
benchmarks and the end-to-end tests: start, follow the log, wait for a line, signal, wait for the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from types import TracebackType
from typing import Self

import aiohttp

__all__ = ["ByocProcess", "free_port"]

_LISTENING = re.compile(r"listening on \S+:(\d+)")


def free_port() -> int:
    """A TCP port that was free a moment ago (for a child that must know its own port in advance)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ByocProcess:
    """``python -m byoc ARGS`` with its log (stderr) followed line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, echo: bool = False) -> None:
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.echo = echo
        self.lines: list[str] = []
        self.port = 0
        self.started_at = 0.0
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def start(self, *, wait_listening: bool = True, timeout: float = 30.0) -> Self:  # noqa: ASYNC109
        self.started_at = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "byoc", *self.args, stderr=asyncio.subprocess.PIPE, env=self.env
        )
        self._reader = asyncio.create_task(self._read())
        if wait_listening:
            line = await self.wait_for_log("listening on", timeout)
            match = _LISTENING.search(line)
            assert match is not None
            self.port = int(match.group(1))
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.kill()

    async def kill(self) -> None:
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
            if self.echo:
                print(line, file=sys.stderr)
            self.lines.append(line)
            async with self._new_line:
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()

    async def wait_for_log(self, text: str, timeout: float = 30.0) -> str:  # noqa: ASYNC109
        """The first log line containing ``text``, waiting for it (raises if the process ends first)."""

        def seen() -> bool:
            return any(text in line for line in self.lines) or (
                self._reader is not None and self._reader.done()
            )

        async with asyncio.timeout(timeout), self._new_line:
            await self._new_line.wait_for(seen)
        for line in self.lines:
            if text in line:
                return line
        raise RuntimeError(f"byoc {' '.join(self.args)} ended before logging {text!r}:\n{self.log[-2000:]}")

    async def wait_healthy(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until ``/health`` answers 200 (the processor is loaded)."""
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.02)

    def signal(self, number: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    async def wait_exit(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        assert self.process is not None
        async with asyncio.timeout(timeout):
            return await self.process.wait()
