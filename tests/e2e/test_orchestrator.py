"""The production checklist's curl loop against ``byoc orchestrator`` and ``byoc serve`` subprocesses."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from byoc.dev.children import ByocProcess, free_port
from byoc.dev.synthetic import read_frame_index
from byoc.trickle.subscriber import TrickleSubscriber

pytestmark = pytest.mark.e2e

SECRET = "checklist-secret"


@pytest.fixture
async def orchestrator() -> AsyncIterator[ByocProcess]:
    async with ByocProcess("orchestrator", "--port", "0", "--orch-secret", SECRET) as process:
        yield process


def container(
    orchestrator: ByocProcess, *args: str, secret: str = SECRET, name: str = "my-model"
) -> ByocProcess:
    port = free_port()
    return ByocProcess(
        "serve", "invert", "--host", "127.0.0.1", "--port", str(port), "--capability-name", name,
        "--capability-url", f"http://127.0.0.1:{port}", "--orchestrator-url", orchestrator.url,
        "--orch-secret", secret, *args,
    )  # fmt: skip


async def curl_d(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    """POST like ``curl -X POST URL -d BODY``: form content type, no JSON header."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def first_segments(http: aiohttp.ClientSession, url: str, count: int) -> bytes:
    async with TrickleSubscriber(url, session=http, start_seq=0) as subscriber:
        parts = []
        async for segment in subscriber:
            parts.append(await segment.read())
            if len(parts) == count:
                return b"".join(parts)
    return b"".join(parts)


def check_processed(data: bytes) -> tuple[int, int]:
    """The output decodes, is 512x512, inverted, in source order with no frame repeated; returns the
    frame count and how many source frames are missing between its first and last frame."""
    indices: list[int | None] = []
    with av.open(io.BytesIO(data), mode="r") as source:
        for frame in source.decode(video=0):
            assert (frame.width, frame.height) == (512, 512)
            indices.append(read_frame_index(frame.to_ndarray(format="rgb24"), inverted=True))
    assert indices
    known = [index for index in indices if index is not None]
    assert len(known) == len(indices), "a frame is not the inverted test picture"
    steps = [(b - a) % 120 for a, b in itertools.pairwise(known)]  # the source loops every 4 s
    assert 0 not in steps, f"frames repeated: {indices}"
    return len(indices), sum(step - 1 for step in steps)


async def dropped_by_stream(http: aiohttp.ClientSession, serve: ByocProcess) -> dict[str, int]:
    """Frames each session of the container dropped (for a counted reason) so far."""
    async with http.get(f"{serve.url}/stream/status") as response:
        sessions = (await response.json())["sessions"]
    return {s["stream_id"]: sum(s["dropped"].values()) for s in sessions}


def check_accounted(data: bytes, dropped: int, *, at_least: int) -> None:
    """The output is processed, and every source frame missing from it is one the container counted
    dropped (on a busy machine it may fall behind real time); it spans at least ``at_least`` frames."""
    frames, missing = check_processed(data)
    assert missing <= dropped, f"{missing} frames missing from the output, {dropped} counted dropped"
    assert frames + missing >= at_least


async def test_the_checklist_loop(http: aiohttp.ClientSession, orchestrator: ByocProcess) -> None:
    async with container(orchestrator, "--max-sessions", "5") as serve:
        await serve.wait_healthy(http)
        await serve.wait_for_log("registered")
        url = f"{orchestrator.url}/live-video-to-video"
        body = b'{"model_id":"my-model"}'
        answers = await asyncio.gather(*(curl_d(http, url, body) for _ in range(5)))
        assert [status for status, _ in answers] == [200] * 5
        outputs = await asyncio.gather(
            *(first_segments(http, answer["subscribe_url"], 2) for _, answer in answers)
        )
        dropped = await dropped_by_stream(http, serve)  # read after the output: counts only grow
        for (_, answer), data in zip(answers, outputs, strict=True):
            check_accounted(data, dropped[answer["stream_id"]], at_least=45)
        status, answer = await curl_d(http, url, body)
        assert status == 503
        assert "capacity" in answer["error"]
        stopped = answers[0][1]["stream_id"]
        async with http.post(f"{url}/{stopped}/stop") as response:
            assert response.status == 200
        status, answer = await curl_d(http, url, body)
        assert status == 200, f"{answer}\n{serve.log[-3000:]}"
        data = await first_segments(http, answer["subscribe_url"], 1)
        dropped = await dropped_by_stream(http, serve)
        check_accounted(data, dropped[answer["stream_id"]], at_least=15)
        async with http.get(f"{orchestrator.url}/status") as response:
            state = await response.json()
        assert len(state["streams"]) == 5
        assert state["capabilities"] == [{"name": "my-model", "url": serve.url, "capacity": 5, "load": 5}]
        serve.signal(signal.SIGTERM)
        assert await serve.wait_exit() == 0
    # the container ended every stream on its way out: the orchestrator freed its capacity
    async with asyncio.timeout(10):
        while True:  # another process: polled over HTTP
            async with http.get(f"{orchestrator.url}/status") as response:
                state = await response.json()
            if not state["streams"]:
                break
            await asyncio.sleep(0.1)
    assert state["capabilities"] == []  # and it unregistered


async def test_registration_round_trip_and_a_wrong_secret(
    http: aiohttp.ClientSession, orchestrator: ByocProcess
) -> None:
    async with container(orchestrator, secret="not-the-secret") as refused:
        line = await refused.wait_for_log("invalid authorization")
        assert "ERROR" in line
        assert "not-the-secret" not in refused.log
        async with http.get(f"{refused.url}/health") as response:
            assert (await response.json())["registration"] == "refused"
    async with container(orchestrator, name="good-model") as accepted:
        await accepted.wait_for_log("registered")
        async with http.get(f"{orchestrator.url}/status") as response:
            assert [c["name"] for c in (await response.json())["capabilities"]] == ["good-model"]


async def test_a_failing_container_start_frees_everything(
    http: aiohttp.ClientSession, orchestrator: ByocProcess
) -> None:
    port = free_port()
    args = ["serve", "tests.processors:FailingStart", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--capability-name", "broken", "--capability-url", f"http://127.0.0.1:{port}"]
    args += ["--orchestrator-url", orchestrator.url, "--orch-secret", SECRET]
    async with ByocProcess(*args) as broken:
        await broken.wait_for_log("registered")
        status, answer = await curl_d(
            http, f"{orchestrator.url}/live-video-to-video", b'{"model_id": "broken"}'
        )
        assert status == 500
        assert "could not start" in answer["error"]
        async with http.get(f"{orchestrator.url}/status") as response:
            state = await response.json()
        assert state["streams"] == []
        assert state["capabilities"][0]["load"] == 0


def test_demo_writes_a_playable_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "byoc", "demo", "--duration", "4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout
    assert "exit code 0" in result.stdout
    with av.open(str(tmp_path / "demo-output.ts"), mode="r") as output:
        frames = [
            (frame.time, read_frame_index(frame.to_ndarray(format="rgb24"), inverted=True))
            for frame in output.decode(video=0)
        ]
    assert frames
    assert all(index is not None for _, index in frames), "a frame is not the inverted test picture"
    times = [t for t, _ in frames if t is not None]
    assert len(times) == len(frames)
    assert times == sorted(set(times)), "frames repeated or out of order"
    # the recording covers the run (frames a busy container drops leave gaps, not a shorter recording)
    assert times[-1] - times[0] >= 2.0
    assert (tmp_path / "demo-snapshot.png").read_bytes().startswith(b"\x89PNG")


async def test_the_streams_of_a_killed_container_end_and_free_its_capacity(
    http: aiohttp.ClientSession, orchestrator: ByocProcess
) -> None:
    async with container(orchestrator, "--max-sessions", "2") as serve:
        await serve.wait_for_log("registered")
        url = f"{orchestrator.url}/live-video-to-video"
        answers = await asyncio.gather(*(curl_d(http, url, b'{"model_id":"my-model"}') for _ in range(2)))
        assert [status for status, _ in answers] == [200, 200]
        await asyncio.gather(*(first_segments(http, answer["subscribe_url"], 1) for _, answer in answers))
        serve.signal(signal.SIGKILL)  # no drain, no final event, no DELETE: the container is just gone
        assert await serve.wait_exit() == -signal.SIGKILL
    async with asyncio.timeout(30):
        while True:  # another process: polled over HTTP
            async with http.get(f"{orchestrator.url}/status") as response:
                state = await response.json()
            if not state["streams"]:
                break
            await asyncio.sleep(0.1)
    ended = {stream["stream_id"]: stream["end_reason"] for stream in state["ended"]}
    assert [ended.get(answer["stream_id"]) for _, answer in answers] == ["container gone"] * 2
    assert state["capabilities"] == [{"name": "my-model", "url": serve.url, "capacity": 2, "load": 0}]
