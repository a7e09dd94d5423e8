"""What a session's output loses, and how its end copes with channels that fail or never answer.

Real loopback trickle server with its fault injection; the "silent" endpoint is a raw TCP server that
reads whatever it is sent and never answers, like an orchestrator that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.serve.metrics import ERROR_TYPES
from byoc.session import Session
from byoc.spec import EndReason, SessionSettings
from tests.conftest import TEST_CLIENT_SETTINGS, assert_every_frame_accounted
from tests.support import StreamHarness, decode, make_segments

DRAIN_S = 3.0
SLACK_S = 5.0


@contextlib.asynccontextmanager
async def silent_endpoint() -> AsyncIterator[str]:
    """A base URL whose server accepts connections, reads every request and never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/ai/trickle/"
    finally:
        server.close()


class _Errors:
    """A SessionObserver that keeps the error kinds, as the runtime's metrics count them."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def frame_done(self, latency_s: float) -> None:
        pass

    def processed(self, seconds: float) -> None:
        pass

    def error(self, kind: str) -> None:
        self.kinds.append(kind)


def _settings(output_failure_budget_s: float = 20.0) -> SessionSettings:
    return SessionSettings(
        trickle=TEST_CLIENT_SETTINGS,
        status_interval_s=0.5,
        drain_timeout_s=DRAIN_S,
        output_failure_budget_s=output_failure_budget_s,
    )


async def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait for a condition on a session's statistics (counted by its threads: no event to wait on)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_output_losses_are_counted_as_the_gateway_saw_them(
    trickle: RunningTrickle, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="byoc")
    async with StreamHarness(trickle, http) as h:
        output = h.channels.name("output")
        observer = _Errors()
        settings = _settings(output_failure_budget_s=60.0)
        session = Session(h.spec(), PassthroughProcessor(), http, settings, observer)
        run = asyncio.create_task(session.run())
        feeding = asyncio.create_task(h.publish(make_segments(10, frames=15)))
        faults = h.server.faults
        await h.server.wait_for_request(
            lambda r: r.method == "POST" and r.channel == output and r.status == 200, timeout=20
        )
        faults.fail_next(100_000, status=503, method="POST", channel=output)  # the output refuses ...
        await _until(lambda: sum(session.statistics().output_lost.segments.values()) >= 2)
        faults.clear()  # ... until two segments are lost; then two uploads break off
        faults.cut_post(output, after_bytes=20_000, count=2)
        await feeding
        await h.input.close()
        assert await asyncio.wait_for(run, 20) == EndReason.INPUT_ENDED  # within its failure budget
        await h.readers_done()

    posts = [r for r in h.server.requests if r.method == "POST" and r.channel == output]
    stored = {int(r.seq) for r in posts if r.status == 200 and r.body_bytes > 0 and r.seq is not None}
    stats = session.statistics()
    lost = stats.output_lost
    assert lost.segments.get("broken") == 2  # the two cut uploads
    assert sum(lost.segments.values()) >= 4
    assert set(lost.segments) <= {"refused", "broken", "unreachable"}
    # out - lost is exactly what the server stored, in segments and in frames
    assert stats.output_segments - sum(lost.segments.values()) == len(stored)
    received = sum(len(decode(segment.data)[0]) for segment in h.output if segment.seq in stored)
    assert stats.frames_out - sum(lost.frames.values()) == received
    assert assert_every_frame_accounted(h.events[-1]["event"]["statistics"], 150) == 150
    # an error, in the statistics, the events and the final event
    assert stats.errors == {"output": sum(lost.segments.values())}
    assert observer.kinds == ["output"] * sum(lost.segments.values())
    assert "output" in ERROR_TYPES  # byoc_errors_total{type="output"}
    assert [e["event"]["kind"] for e in h.events if e["event"]["type"] == "error"] == ["output"]
    assert any(sum(e["event"].get("output_lost", {}).get("segments", {}).values()) for e in h.events)
    assert h.events[-1]["event"]["statistics"]["output"]["lost"] == lost.as_dict()
    # a refused upload is logged as refused, never as bytes that were sent; its seq is used again, so
    # no seq is left for readers to wait on: each one is stored or, broken, DELETEd
    assert any(r.status == 503 for r in posts)
    given_up = [r.getMessage() for r in caplog.records if "could not be opened" in r.getMessage()]
    assert given_up
    assert all("refused with HTTP 503" in message for message in given_up), given_up
    deleted = {
        int(r.seq)
        for r in h.server.requests
        if (r.method, r.channel) == ("DELETE", output) and r.seq is not None
    }
    assert stored | deleted == set(range(max(stored) + 1))


async def test_output_unreachable_past_its_budget_ends_the_session(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http) as h:
        output = h.channels.name("output")
        session = Session(h.spec(), PassthroughProcessor(), http, _settings(output_failure_budget_s=1.5))
        run = asyncio.create_task(session.run())
        feeding = asyncio.create_task(h.publish(make_segments(30, frames=15)))
        await h.server.wait_for_request(
            lambda r: r.method == "POST" and r.channel == output and r.status == 200, timeout=20
        )
        h.server.faults.fail_next(100_000, status=503, method="POST", channel=output)
        reason = await asyncio.wait_for(run, 20)
        input_left = not feeding.done()
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        await h.readers_done()
    assert reason == EndReason.OUTPUT_UNREACHABLE
    assert input_left  # it ended on its own, not because the input ran out
    final = h.events[-1]["event"]
    assert (final["type"], final["reason"]) == ("stream_stopped", "output_unreachable")
    lost = final["statistics"]["output"]["lost"]["segments"]
    assert sum(lost.values()) >= 2
    assert final["statistics"]["errors"]["output"] == sum(lost.values())
    assert not h.server.has_channel(output)  # DELETEd all the same


@pytest.mark.parametrize("fault", ["refusing", "silent"])
async def test_failing_events_never_skip_the_deletes(
    trickle: RunningTrickle, http: aiohttp.ClientSession, fault: str
) -> None:
    async with silent_endpoint() as silent, StreamHarness(trickle, http, data=True) as h:
        overrides = {}
        if fault == "silent":
            overrides = {"events_url": silent + h.channels.name("events")}
        else:
            h.server.faults.fail_next(100_000, status=500, method="POST", channel=h.channels.name("events"))
        session = Session(h.spec(**overrides), PassthroughProcessor(), http, _settings())
        run = asyncio.create_task(session.run())
        await h.publish(make_segments(2, frames=15))
        await h.server.wait_for_request(
            lambda r: r.method == "POST" and r.channel == h.channels.name("output") and r.status == 200
        )
        session.stop()
        await asyncio.wait_for(asyncio.wait([run]), DRAIN_S + SLACK_S)
        published = [h.channels.name(role) for role in ("output", "data")]
        assert [channel for channel in published if h.server.has_channel(channel)] == []
        reason = run.result()
        h.server.close_channel(h.channels.name("events"))  # (when the session published elsewhere)
        await h.readers_done()
    assert reason == EndReason.STOPPED


async def test_stop_with_unresponsive_channels_ends_within_the_drain_timeout(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with silent_endpoint() as silent, StreamHarness(trickle, http) as h:
        spec = h.spec(
            publish_url=silent + h.channels.name("output"), events_url=silent + h.channels.name("events")
        )
        session = Session(spec, PassthroughProcessor(), http, _settings())
        run = asyncio.create_task(session.run())
        feeding = asyncio.create_task(h.publish(make_segments(20, frames=15)))
        await h.server.wait_for_request(lambda r: r.method == "GET" and r.channel == "s1" and r.status == 200)
        await _until(lambda: session.statistics().output_segments >= 1)  # it waits for an answer
        stopped_at = time.monotonic()
        session.stop()
        reason = await asyncio.wait_for(run, 60)
        took = time.monotonic() - stopped_at
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        h.server.close_channel(h.channels.name("output"))
        h.server.close_channel(h.channels.name("events"))
        await h.readers_done()
    assert reason == EndReason.STOPPED
    assert took < DRAIN_S + SLACK_S, f"the stop took {took:.1f}s"
    stats = session.statistics()
    assert stats.output_segments >= 1
    assert sum(stats.output_lost.frames.values()) == stats.frames_out  # nothing reached the gateway
    leftover = [t.get_name() for t in asyncio.all_tasks() if silent in t.get_name()]
    assert leftover == []
