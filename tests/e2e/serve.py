"""``byoc serve`` as a real subprocess, for end-to-end tests."""

from __future__ import annotations

import aiohttp

from byoc.dev.children import ByocProcess


class ServeProcess(ByocProcess):
    """``python -m byoc serve ARGS`` on a free loopback port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("serve", *args, "--port", "0", "--host", "127.0.0.1", env=env)

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await self.wait_healthy(http, timeout)
