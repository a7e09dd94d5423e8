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


async def without_streams(http: aiohttp.ClientSession, url: str, *, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """The orchestrator's /status once it holds no stream (another process: polled over HTTP)."""
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(f"{url}/status") as response:
                state: dict[str, Any] = await response.json()
            if not state["streams"]:
                return state
            await asyncio.sleep(0.1)


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
    state = await without_streams(http, orchestrator.url, timeout=10)
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


@pytest.mark.parametrize("protocol", ["byoc", "live-runner"])
def test_demo_writes_a_playable_file(tmp_path: Path, protocol: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "byoc", "demo", "--duration", "4", "--protocol", protocol],
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
    state = await without_streams(http, orchestrator.url, timeout=30)
    ended = {stream["stream_id"]: stream["end_reason"] for stream in state["ended"]}
    assert [ended.get(answer["stream_id"]) for _, answer in answers] == ["container gone"] * 2
    assert state["capabilities"] == [{"name": "my-model", "url": serve.url, "capacity": 2, "load": 0}]


async def ended_streams(
    http: aiohttp.ClientSession, orchestrator: ByocProcess, ids: list[str]
) -> dict[str, Any]:
    """The orchestrator's final statistics of ``ids``, once every one of them has ended."""
    async with asyncio.timeout(30):
        while True:  # another process: polled over HTTP
            async with http.get(f"{orchestrator.url}/status") as response:
                ended = {stream["stream_id"]: stream for stream in (await response.json())["ended"]}
            if all(stream_id in ended for stream_id in ids):
                return {stream_id: ended[stream_id] for stream_id in ids}
            await asyncio.sleep(0.1)


async def wait_output(
    http: aiohttp.ClientSession, orchestrator: ByocProcess, ids: list[str], segments: int
) -> None:
    """Wait until the orchestrator's gateway readers got ``segments`` output segments of every stream."""
    async with asyncio.timeout(60):
        while True:  # another process: polled over HTTP
            async with http.get(f"{orchestrator.url}/status") as response:
                running = {stream["stream_id"]: stream for stream in (await response.json())["streams"]}
            if all(running[stream_id]["output_segments"] >= segments for stream_id in ids):
                return
            await asyncio.sleep(0.1)


async def test_every_stop_gets_the_final_event_and_last_segment_out_before_the_channels_close(
    http: aiohttp.ClientSession, orchestrator: ByocProcess
) -> None:
    """The orchestrator closes a stream's channels as soon as the container answers its stop, as
    go-livepeer does: 20 stops, four streams at a time, and the gateway's readers got every stream's
    ``stream_stopped`` event and every output frame the container says it published."""
    # generous bounds for a busy machine: the answer may wait 8 s (the orchestrator waits 10 s)
    bounds = ("--drain-timeout-s", "12", "--stop-answer-timeout-s", "8")
    async with container(orchestrator, "--max-sessions", "4", *bounds) as serve:
        await serve.wait_for_log("registered")
        url = f"{orchestrator.url}/live-video-to-video"
        stopped: list[str] = []
        for _ in range(5):
            answers = await asyncio.gather(*(curl_d(http, url, b'{"model_id":"my-model"}') for _ in range(4)))
            assert [status for status, _ in answers] == [200] * 4, answers
            ids = [answer["stream_id"] for _, answer in answers]
            await wait_output(http, orchestrator, ids, 2)
            stops = await asyncio.gather(*(curl_d(http, f"{url}/{stream_id}/stop", b"") for stream_id in ids))
            assert [status for status, _ in stops] == [200] * 4, stops
            stopped += ids
        ended = await ended_streams(http, orchestrator, stopped)
        assert len(ended) == 20
        for stream_id, stream in ended.items():
            assert stream["end_reason"] == "stopped"
            assert stream["final_event"], f"{stream_id}: no stream_stopped event read\n{serve.log[-3000:]}"
            assert stream["last_segment_complete"], stream_id
            # every frame the container published was read: the last segment too, and whole
            assert stream["frames_out"] == stream["frames_published"], stream
            assert stream["frames_out"] > 0


async def test_a_container_with_a_token_through_the_orchestrator(
    http: aiohttp.ClientSession, orchestrator: ByocProcess, tmp_path: Path
) -> None:
    """``byoc serve --token-file`` registers its token; the orchestrator sends it as a bearer token on
    start, update and stop. A capability registered with the wrong token gets 401 from the container,
    which the orchestrator answers with 500, removing that capability, as go-livepeer does."""
    token = tmp_path / "token"
    token.write_text("a-stream-token\n")
    async with container(orchestrator, "--token-file", str(token)) as serve:
        await serve.wait_for_log("registered")
        async with http.post(f"{serve.url}/stream/stop", data=b"") as response:
            assert response.status == 401  # the container does want the token
        url = f"{orchestrator.url}/live-video-to-video"
        async with http.post(url, data=b'{"model_id":"my-model"}') as response:
            assert response.status == 200, await response.text()  # the token went with the start
            answer = await response.json()
        stream_id = answer["stream_id"]
        frames, _ = check_processed(await first_segments(http, answer["subscribe_url"], 2))
        assert frames >= 15
        status, update = await curl_d(http, f"{url}/{stream_id}/update", b'{"prompt":"a dog"}')
        assert (status, update["status"]) == (200, "updated")
        status, stop = await curl_d(http, f"{url}/{stream_id}/stop", b"")
        assert (status, stop["status"]) == (200, "stopped")
        ended = (await ended_streams(http, orchestrator, [stream_id]))[stream_id]
        assert (ended["end_reason"], ended["final_event"]) == ("stopped", True)
        assert "a-stream-token" not in serve.log
        # the same container, registered under another name with a wrong token
        wrong = {"name": "impostor", "url": serve.url, "capacity": 1, "token": "not-the-token"}
        async with http.post(
            f"{orchestrator.url}/capability/register", json=wrong, headers={"Authorization": SECRET}
        ) as response:
            assert response.status == 200
        async with http.post(url, data=b'{"model_id":"impostor"}') as response:
            assert (response.status, await response.text()) == (500, "Orchestrator worker failure")
        async with http.get(f"{orchestrator.url}/status") as response:
            state = await response.json()
        assert [c["name"] for c in state["capabilities"]] == ["my-model"]
        assert state["streams"] == []
