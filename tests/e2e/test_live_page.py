"""The orchestrator's live page in a real headless Chromium, against ``byoc orchestrator`` and
``byoc serve invert`` subprocesses: it loads without errors, shows the container, a stream's thumbnail
is its processed output and changes, its charts fill, and its buttons start and stop streams.

One browser, one orchestrator and one container serve every test of the module (Chromium is heavy).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import av
import pytest
import pytest_asyncio

from byoc.dev.children import ByocProcess, free_port
from byoc.dev.orchestrator.thumbnails import IDLE_S, WIDTH
from byoc.dev.synthetic import read_frame_index
from tests.browser import NO_CHROMIUM, Browser, Page, chromium_path, launch
from tests.support import wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(chromium_path() is None, reason=NO_CHROMIUM),
    pytest.mark.asyncio(loop_scope="module"),
]

SECRET = "live-page-secret"
MODEL = "my-model"


@dataclass
class Stack:
    orchestrator: ByocProcess
    container: ByocProcess
    http: aiohttp.ClientSession

    async def status(self) -> dict[str, Any]:
        async with self.http.get(f"{self.orchestrator.url}/status") as response:
            state: dict[str, Any] = await response.json()
            return state

    async def stream_ids(self) -> set[str]:
        return {stream["stream_id"] for stream in (await self.status())["streams"]}

    async def start(self) -> str:
        body = json.dumps({"model_id": MODEL}).encode()
        async with self.http.post(f"{self.orchestrator.url}/live-video-to-video", data=body) as response:
            assert response.status == 200, await response.text()
            stream_id: str = (await response.json())["stream_id"]
            return stream_id

    async def stop(self, stream_id: str) -> None:
        url = f"{self.orchestrator.url}/live-video-to-video/{stream_id}/stop"
        async with self.http.post(url) as response:
            assert response.status == 200, await response.text()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with launch() as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    port = free_port()
    async with (
        aiohttp.ClientSession() as http,
        ByocProcess("orchestrator", "--port", "0", "--orch-secret", SECRET) as orchestrator,
    ):
        container = ByocProcess(
            "serve", "invert", "--host", "127.0.0.1", "--port", str(port), "--max-sessions", "3",
            "--capability-name", MODEL, "--capability-url", f"http://127.0.0.1:{port}",
            "--orchestrator-url", orchestrator.url, "--orch-secret", SECRET,
        )  # fmt: skip
        async with container:
            await container.wait_healthy(http)
            await container.wait_for_log("registered")
            yield Stack(orchestrator, container, http)


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, stack: Stack) -> AsyncIterator[Page]:
    opened = await browser.new_page()
    await opened.goto(f"{stack.orchestrator.url}/")
    yield opened
    await browser.close_page(opened)
    for stream_id in await stack.stream_ids():  # the next test starts without streams
        await stack.stop(stream_id)


def _card(stream_id: str) -> str:
    return f"document.querySelector('.stream[data-stream=\"{stream_id}\"]')"


async def shown_thumbnail(page: Page, stream_id: str) -> bytes | None:
    """The thumbnail the page shows for a stream, as a PNG drawn from the <img> (None before one)."""
    data_url = await page.evaluate(
        f"""(() => {{
            const img = {_card(stream_id)}?.querySelector('img.thumb');
            if (!img || !img.complete || !img.naturalWidth) return null;
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            canvas.getContext('2d').drawImage(img, 0, 0);
            return canvas.toDataURL('image/png');
        }})()"""
    )
    return base64.b64decode(data_url.split(",", 1)[1]) if data_url else None


def frame_index(png: bytes) -> tuple[int, int | None]:
    """The width of a thumbnail and the index of the (inverted, i.e. processed) test picture in it."""
    with av.open(io.BytesIO(png), mode="r") as container:
        frame = next(container.decode(video=0))
    return frame.width, read_frame_index(frame.to_ndarray(format="rgb24"), inverted=True)


async def test_the_page_loads_without_errors_and_shows_the_container(page: Page, stack: Stack) -> None:
    row = f"document.querySelector('tr[data-container=\"{stack.container.url}\"]')"
    health = await page.wait_for(
        f"{row}?.children[1].className === 'ok' && {row}.textContent",
        "the container's row with its health",
    )
    assert MODEL in health
    assert "IDLE" in health  # the container's /health: serving, no session
    assert "0 / 3" in health  # sessions / capacity
    assert await page.evaluate("document.getElementById('model').value") == MODEL
    assert await page.evaluate("document.getElementById('start').disabled") is False
    assert page.errors == []


async def test_a_streams_thumbnail_is_its_output_and_changes(page: Page, stack: Stack) -> None:
    stream_id = await stack.start()
    await page.wait_for(f"{_card(stream_id)}?.dataset.thumbnails", "a first thumbnail")
    first = await shown_thumbnail(page, stream_id)
    assert first is not None
    width, index = frame_index(first)
    assert width == WIDTH
    assert index is not None, "the thumbnail is not the processed (inverted) test picture"

    async def changed() -> bool:
        now = await shown_thumbnail(page, stream_id)
        return now is not None and now != first and frame_index(now)[1] not in (None, index)

    await wait_until(changed, "the thumbnail shows a later frame", timeout=10)
    # the charts fill from the container's status, sampled once a second
    await page.wait_for(
        f"{_card(stream_id)}.querySelector('[data-chart=fps] polyline')"
        ".getAttribute('points').split(' ').length >= 3",
        "three points on the fps chart",
    )
    events = await page.evaluate("document.getElementById('events').textContent")
    assert f"started {stream_id}" in events
    assert page.errors == []


async def test_the_buttons_start_and_stop_a_stream(page: Page, stack: Stack) -> None:
    await page.wait_for("!document.getElementById('start').disabled", "the start button")
    await page.click("#start")
    message = await page.wait_for(
        "(m => m.startsWith('started ') && m)(document.getElementById('message').textContent)",
        "the page says it started a stream",
    )
    stream_id = message.removeprefix("started ")
    assert await stack.stream_ids() == {stream_id}
    await page.wait_for(f"{_card(stream_id)}?.dataset.thumbnails", "the new stream's thumbnail")
    thumbnail = await shown_thumbnail(page, stream_id)
    assert thumbnail is not None
    assert frame_index(thumbnail)[1] is not None

    await page.click(f'.stream[data-stream="{stream_id}"] button.stop')
    await page.wait_for(f"!{_card(stream_id)}", "the stream's card is gone")

    async def stopped() -> bool:
        return stream_id not in await stack.stream_ids()

    await wait_until(stopped, "the orchestrator ended the stream", timeout=10)
    await page.wait_for(
        f"document.getElementById('events').textContent.includes('ended {stream_id}')",
        "the stream's end in the events",
    )
    assert page.errors == []


async def test_thumbnails_are_decoded_only_while_the_page_looks(browser: Browser, stack: Stack) -> None:
    stream_id = await stack.start()
    viewer = await browser.new_page()
    await viewer.goto(f"{stack.orchestrator.url}/")
    await viewer.wait_for(f"{_card(stream_id)}?.dataset.thumbnails", "a thumbnail")

    async def thumbnailer() -> dict[str, Any]:
        async with stack.http.get(f"{stack.orchestrator.url}/ui/state") as response:
            described: dict[str, Any] = (await response.json())["thumbnails"].get(stream_id, {})
            return described

    assert (await thumbnailer())["running"]
    await browser.close_page(viewer)

    async def idle() -> bool:
        return not (await thumbnailer())["running"]

    await wait_until(idle, "the thumbnailer stops once nobody asks", timeout=IDLE_S + 5)
    decoded = (await thumbnailer())["frames_decoded"]

    async def frames_out() -> int:
        streams = {s["stream_id"]: s for s in (await stack.status())["streams"]}
        return int(streams[stream_id]["frames_out"])

    before = await frames_out()

    async def two_more_segments() -> bool:
        return await frames_out() >= before + 60

    await wait_until(two_more_segments, "the stream goes on", timeout=15)
    after = await thumbnailer()
    assert (after["running"], after["frames_decoded"]) == (False, decoded)  # nothing decoded meanwhile
    await stack.stop(stream_id)
    assert viewer.errors == []
