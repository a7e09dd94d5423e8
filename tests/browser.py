"""A headless Chromium for tests, driven over the Chrome DevTools Protocol with aiohttp's websocket
client: open a page, evaluate JavaScript, click, take a screenshot, and collect what the page reports
as errors (uncaught exceptions, ``console.error``, and error entries of the browser's log, such as a
resource that failed to load).

The browser is Debian's ``chromium`` (``BYOC_CHROMIUM`` names another binary); :func:`chromium_path`
returns None when there is none, and the tests that need it skip with :data:`NO_CHROMIUM`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["NO_CHROMIUM", "Browser", "BrowserError", "Page", "chromium_path", "launch"]

NO_CHROMIUM = "no chromium to run browser tests with (apt-get install chromium, or set BYOC_CHROMIUM)"
_FLAGS = (
    "--headless=new",
    "--remote-debugging-port=0",
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--window-size=1280,800",
)
_START_TIMEOUT_S = 60.0
_COMMAND_TIMEOUT_S = 30.0


class BrowserError(Exception):
    """The browser answered a command with an error, or a script threw."""


def chromium_path() -> str | None:
    """The Chromium binary: ``BYOC_CHROMIUM``, else ``chromium`` (Debian) or ``chromium-browser``."""
    named = os.environ.get("BYOC_CHROMIUM")
    if named:
        return named if Path(named).exists() else shutil.which(named)
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class _Connection:
    """One websocket to the browser; commands are matched to answers by id, events are dispatched by
    the session they belong to."""

    socket: aiohttp.ClientWebSocketResponse
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    pages: dict[str, Page] = field(default_factory=dict)
    """The open tabs by their session id."""

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Any:
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        await self.socket.send_str(json.dumps(message))
        try:
            async with asyncio.timeout(_COMMAND_TIMEOUT_S):
                reply = await answer
        finally:
            self._waiting.pop(number, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def read(self) -> None:
        async for message in self.socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                waiter = self._waiting.get(data["id"])
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
            elif data.get("sessionId") in self.pages:
                self.pages[data["sessionId"]].on_event(data["method"], data.get("params", {}))
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(BrowserError("the browser closed its connection"))


class Page:
    """One tab. ``errors`` collects what the page reported as errors, in order."""

    def __init__(self, connection: _Connection, session: str, target: str) -> None:
        self._connection = connection
        self.session = session
        self.target = target
        self.errors: list[str] = []
        self._loaded = asyncio.Event()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self._connection.send(method, params, self.session)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {description}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            self.errors.append("console.error: " + " ".join(args))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        elif method == "Page.loadEventFired":
            self._loaded.set()

    async def goto(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self._loaded.clear()
        answer = await self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"{url}: {answer['errorText']}")
        async with asyncio.timeout(_COMMAND_TIMEOUT_S):
            await self._loaded.wait()

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        answer = await self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return answer.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 30.0) -> Any:  # noqa: ASYNC109
        """Poll a JavaScript expression until it is truthy; its value. AssertionError after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    value = await self.evaluate(expression)
                    if value:
                        return value
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"not within {timeout} s: {what}") from None

    async def click(self, selector: str) -> None:
        """Click the first element matching a CSS selector (a DOM click, as a user's would dispatch)."""
        found = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.click(); return true; })()"
        )
        if not found:
            raise BrowserError(f"nothing matches {selector!r}")

    async def screenshot(self, width: int = 1280, height: int = 800) -> bytes:
        """A PNG of the viewport, ``width`` x ``height`` CSS pixels at scale 1."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        answer = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(answer["data"])


class Browser:
    """A running headless Chromium and one websocket to it."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def new_page(self) -> Page:
        """A new tab with Runtime, Log and Page events on."""
        target = (await self._connection.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        attached = await self._connection.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self._connection, attached["sessionId"], target)
        self._connection.pages[page.session] = page
        for domain in ("Runtime", "Log", "Page"):
            await page.send(f"{domain}.enable")
        return page

    async def close_page(self, page: Page) -> None:
        with contextlib.suppress(BrowserError):
            await self._connection.send("Target.closeTarget", {"targetId": page.target})
        self._connection.pages.pop(page.session, None)


async def _devtools_address(profile: Path, process: asyncio.subprocess.Process) -> str:
    """The browser's websocket address, from the DevToolsActivePort file it writes when it listens."""
    marker = profile / "DevToolsActivePort"
    async with asyncio.timeout(_START_TIMEOUT_S):
        while True:
            if process.returncode is not None:
                raise BrowserError(f"chromium exited with {process.returncode} before listening")
            lines = marker.read_text().splitlines() if marker.exists() else []
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def launch(binary: str | None = None) -> AsyncIterator[Browser]:
    """Start a headless Chromium with a fresh profile; closed (and its profile removed) on exit."""
    binary = binary or chromium_path()
    if binary is None:
        raise BrowserError(NO_CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="byoc-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            binary,
            *_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            address = await _devtools_address(Path(profile), process)
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(address, max_msg_size=0, heartbeat=None) as socket,
            ):
                connection = _Connection(socket)
                reader = asyncio.create_task(connection.read())
                try:
                    yield Browser(connection)
                finally:
                    with contextlib.suppress(BrowserError, TimeoutError, ConnectionError):
                        await connection.send("Browser.close")
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
        finally:
            if process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
