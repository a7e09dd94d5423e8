"""A static live runner end to end (docs/protocol.md §10.5a): ``byoc orchestrator --live-runner-config``
lists ``byoc serve --protocol live-runner-static`` and polls its /health; a client reserves a session
through the orchestrator and streams through its proxy; SIGTERM drains the runner, which ends its session
itself (the poll must not), and once it is gone the next poll hides it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from byoc.dev.children import ByocProcess, free_port
from byoc.dev.synthetic import publish_live
from byoc.errors import ChannelGone
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.support import decode, make_segments, wait_until

pytestmark = pytest.mark.e2e

SECRET = "static-runner-secret"
APP = "live-video-to-video/static-e2e"


async def read_channel(http: aiohttp.ClientSession, url: str, into: list[bytes]) -> None:
    """Every segment of a channel, from its first, until the channel is removed."""
    with contextlib.suppress(ChannelGone):
        async with TrickleSubscriber(url, session=http, start_seq=0, settings=TEST_CLIENT_SETTINGS) as reader:
            async for segment in reader:
                into.append(await segment.read())


async def discovered(http: aiohttp.ClientSession, orchestrator: ByocProcess) -> list[dict[str, Any]]:
    async with http.get(f"{orchestrator.url}/discovery") as response:
        runners: list[dict[str, Any]] = (await response.json())[0].get("runners", [])
        return runners


def log_index(process: ByocProcess, text: str) -> int:
    return next((i for i, line in enumerate(process.lines) if text in line), len(process.lines))


async def test_a_static_runner_is_polled_streams_and_drains_before_the_poll_hides_it(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "runners.json"
    entry = {
        "label": "static-e2e",
        "runner_url": f"http://127.0.0.1:{port}",
        "app": APP,
        "capacity": 2,
        "health_url": "/health",
    }
    config.write_text(json.dumps({"runners": [entry]}))
    orchestrator = ByocProcess(
        "orchestrator", "--port", "0", "--orch-secret", SECRET,
        "--live-runner-config", str(config), "--live-runner-health-interval", "250ms",
    )  # fmt: skip
    async with orchestrator:
        # no secret: a static runner never registers
        serve = ByocProcess(
            "serve", "tests.processors:SlowToStop", "--processor-option", "stop_s=2",
            "--protocol", "live-runner-static", "--host", "127.0.0.1", "--port", str(port),
            "--orchestrator-url", orchestrator.url, "--drain-timeout-s", "8",
        )  # fmt: skip
        async with serve:

            async def listed() -> bool:
                return len(await discovered(http, orchestrator)) == 1

            await wait_until(listed, "the static runner is discovered ready")
            (runner,) = await discovered(http, orchestrator)
            assert (runner["app"], runner["capacity_available"]) == (APP, 2)
            runner_id = runner["url"].rsplit("/", 2)[-2]
            assert runner_id.startswith("runner_")

            async with http.post(runner["url"], json={}) as response:
                assert response.status == 200, await response.text()
                session = await response.json()
            async with http.post(f"{session['app_url']}/stream/start", json={"params": {}}) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
            output: list[bytes] = []
            events: list[bytes] = []
            readers = [
                asyncio.create_task(read_channel(http, answer["subscribe_url"], output)),
                asyncio.create_task(read_channel(http, answer["events_url"], events)),
            ]
            publisher = TricklePublisher(answer["publish_url"], session=http, settings=TEST_CLIENT_SETTINGS)
            try:
                await publish_live(publisher, make_segments(2, frames=15))

                async def output_came() -> bool:
                    return bool(output)

                await wait_until(output_came, "an output segment")
                frames, _ = decode(output[0])
                assert frames, "the first output segment has no video frame"

                serve.signal(signal.SIGTERM)
                health: list[tuple[int, str]] = []

                async def drained() -> bool:
                    try:
                        async with http.get(f"{serve.url}/health") as response:
                            health.append((response.status, (await response.json())["status"]))
                    except aiohttp.ClientError:
                        return True  # the container is gone
                    return False

                await wait_until(drained, "the container exits", 20)
                assert await serve.wait_exit(timeout=10) == 0, serve.log[-3000:]
                assert (200, "draining") in health, health
                assert all(status == 200 for status, _ in health), health
                async with asyncio.timeout(10):
                    await asyncio.gather(*readers)
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
                await publisher.close()

        # the container ended its session itself: its final event went out before the channels did
        final = json.loads(events[-1])["event"]
        assert (final["type"], final["reason"]) == ("stream_stopped", "shutdown"), events
        released = log_index(orchestrator, f"session {session['session_id']} released")
        assert released < len(orchestrator.lines), orchestrator.log[-3000:]
        # then, with the container gone, a failing poll hides the runner
        unavailable = f"static live runner {runner_id} ({APP}) health changed: unavailable"
        await orchestrator.wait_for_log(unavailable, 10)
        assert released < log_index(orchestrator, unavailable)
        started = time.monotonic()

        async def hidden() -> bool:
            return await discovered(http, orchestrator) == []

        await wait_until(hidden, "the runner is no longer discovered", 5)
        assert time.monotonic() - started < 5
