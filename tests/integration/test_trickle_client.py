"""The trickle client against the byoc trickle server over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from byoc.dev.trickle_server import RequestRecord, RunningTrickle, serve_trickle
from byoc.errors import ChannelGone, DataLineTooLong, RetriesExhausted
from byoc.trickle.channels import ControlReader, DataWriter, EventsWriter
from byoc.trickle.layout import Role, StreamChannels
from byoc.trickle.protocol import SEQ_CURRENT, SEQ_NEXT, channel_url
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber
from tests.conftest import TEST_CLIENT_SETTINGS

S = TEST_CLIENT_SETTINGS


STREAM = StreamChannels("stream", data=True)


def _channel(trickle: RunningTrickle, name: str = "stream", mime: str = "video/MP2T") -> str:
    trickle.server.create_channel(name, mime)
    return channel_url(trickle.base_url, name)


def _stream_channel(trickle: RunningTrickle, role: Role) -> str:
    """One of the stream's channels, created as the orchestrator creates it."""
    return _channel(trickle, STREAM.name(role), STREAM.mime_type(role))


async def _publish(publisher: TricklePublisher, *payloads: bytes) -> None:
    for payload in payloads:
        await publisher.write_segment(payload)


async def test_segments_round_trip_in_order(trickle: RunningTrickle, http: aiohttp.ClientSession) -> None:
    url = _channel(trickle)
    payloads = [f"segment {i}".encode() * (i + 1) for i in range(8)]
    async with TrickleSubscriber(url, session=http, settings=S) as sub:
        publisher = TricklePublisher(url, session=http, settings=S)
        writer = asyncio.create_task(_publish(publisher, *payloads))
        got = []
        async for segment in sub:
            got.append((segment.seq, await segment.read(), segment.complete))
            if len(got) == len(payloads):
                break
        await writer
        await publisher.close()
    assert got == [(i, p, True) for i, p in enumerate(payloads)]
    assert publisher.statistics().segments == len(payloads)


async def test_reader_gets_bytes_before_the_publisher_finishes(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    events: list[str] = []
    first_chunk = asyncio.Event()

    async def read() -> bytes:
        async with TrickleSubscriber(url, session=http, settings=S) as sub:
            segment = await sub.next_segment()
            assert segment is not None
            data = b""
            async for chunk in segment:
                data += chunk
                if not first_chunk.is_set():
                    events.append("reader got first bytes")
                    first_chunk.set()
            events.append("reader saw the segment end")
            return data

    reader = asyncio.create_task(read())
    publisher = TricklePublisher(url, session=http, settings=S)
    async with asyncio.timeout(10):
        async with publisher.segment() as segment:
            await segment.write(b"A" * 1000)
            await first_chunk.wait()  # would never return if bytes were held until the segment ends
            events.append("publisher writes the rest")
            await segment.write(b"B" * 1000)
        events.append("publisher finished the segment")
        data = await reader
    assert data == b"A" * 1000 + b"B" * 1000
    assert events.index("reader got first bytes") < events.index("publisher finished the segment")
    await publisher.close()


@pytest.mark.parametrize(("start_seq", "expected_seq"), [(SEQ_CURRENT, 2), (SEQ_NEXT, 3)])
async def test_live_edge_join(
    trickle: RunningTrickle, http: aiohttp.ClientSession, start_seq: int, expected_seq: int
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    await _publish(publisher, b"zero", b"one")
    in_progress = publisher.segment()
    await in_progress.__aenter__()
    await in_progress.write(b"two-")  # seq 2 is being written: -2 joins it, -1 waits for seq 3

    async def first_segment() -> tuple[int, bytes]:
        async with TrickleSubscriber(url, session=http, start_seq=start_seq, settings=S) as sub:
            segment = await sub.next_segment()
            assert segment is not None
            return segment.seq, await segment.read()

    reader = asyncio.create_task(first_segment())
    # Finish seq 2 and write seq 3 only after the subscriber's GET is at the server.
    await trickle.server.wait_for_request(lambda r: r.method == "GET" and r.seq == str(start_seq), 5)
    await in_progress.write(b"rest")
    await in_progress.__aexit__(None, None, None)
    await publisher.write_segment(b"three")
    seq, data = await asyncio.wait_for(reader, 5)
    assert seq == expected_seq
    assert data == (b"two-rest" if expected_seq == 2 else b"three")
    await publisher.close()


async def test_subscriber_that_fell_behind_jumps_to_the_live_edge(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(b"s0")
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        first = await sub.next_segment()
        assert first is not None
        assert await first.read() == b"s0"
        # Eight more segments while the subscriber reads nothing: with a retention of 5, seq 2 is gone.
        await _publish(publisher, *(f"s{i}".encode() for i in range(1, 9)))
        second = await sub.next_segment()
        assert second is not None
        assert (second.seq, await second.read()) == (1, b"s1")  # it was pre-connected in time
        reader = asyncio.create_task(sub.next_segment())
        await trickle.server.wait_for_request(lambda r: (r.method, r.seq, r.status) == ("GET", "2", 470))
        await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "9"))
        await publisher.write_segment(b"s9")
        third = await reader
        assert third is not None
        assert (third.seq, await third.read()) == (9, b"s9")
        assert (sub.statistics().jumps, sub.statistics().skipped) == (1, 7)  # 2 to 8 were never read
    await publisher.close()


async def test_unknown_channel_raises_channel_gone(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with TrickleSubscriber(channel_url(trickle.base_url, "nope"), session=http, settings=S) as sub:
        with pytest.raises(ChannelGone):
            await sub.next_segment()
        assert sub.ended
        assert await sub.next_segment() is None
    publisher = TricklePublisher(channel_url(trickle.base_url, "nope"), session=http, settings=S)
    with pytest.raises(ChannelGone):
        await publisher.write_segment(b"x")


async def test_delete_while_a_get_waits_is_a_clean_end(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(b"only")
    async with TrickleSubscriber(url, session=http, settings=S) as sub:
        segments = []

        async def consume() -> None:
            async for segment in sub:
                segments.append((segment.seq, await segment.read()))

        reader = asyncio.create_task(consume())
        await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "1"))
        await publisher.close()  # DELETE while the subscriber waits for seq 1
        await asyncio.wait_for(reader, 5)
    assert segments == [(0, b"only")]
    assert not trickle.server.has_channel("stream")


async def test_empty_segment_is_delivered_as_empty(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    await _publish(publisher, b"", b"after")
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        empty = await sub.next_segment()
        assert empty is not None
        assert (empty.seq, await empty.read(), empty.complete) == (0, b"", True)
        after = await sub.next_segment()
        assert after is not None
        assert (after.seq, await after.read()) == (1, b"after")
    await publisher.close()


async def test_publisher_cut_mid_segment_moves_on_and_never_appends(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    trickle.server.faults.cut_post("stream", after_bytes=1000)
    publisher = TricklePublisher(url, session=http, settings=S)
    async with publisher.segment() as segment:
        await segment.write(b"a" * 1000)
        await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("POST", "0"))
        await segment.write(b"b" * 1000)  # the connection is gone: these bytes are dropped
    await publisher.write_segment(b"next")
    stats = publisher.statistics()
    assert (stats.segments, stats.broken_segments) == (1, 1)
    assert trickle.server.segment_data("stream", 0) == b"a" * 1000  # nothing appended
    assert trickle.server.segment_data("stream", 1) == b"next"
    posts = [r.seq for r in trickle.server.requests if r.method == "POST"]
    assert posts.count("0") == 1
    # The broken seq was DELETEd so readers waiting on it are released.
    assert any((r.method, r.seq, r.status) == ("DELETE", "0", 200) for r in trickle.server.requests)
    await publisher.close()


async def _wait_for_count(
    trickle: RunningTrickle, predicate: Callable[[RequestRecord], bool], count: int
) -> None:
    seen: list[RequestRecord] = []

    def counting(record: RequestRecord) -> bool:
        if predicate(record) and all(record is not r for r in seen):
            seen.append(record)
        return len(seen) >= count

    await trickle.server.wait_for_request(counting)


async def test_publisher_retries_a_seq_only_when_nothing_was_sent(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    trickle.server.faults.fail_next(2, status=503, method="POST", channel="stream")
    publisher = TricklePublisher(url, session=http, settings=S)
    async with publisher.segment() as segment:
        # The POSTs for seq 0 and the pre-connected seq 1 are refused before any byte was sent.
        await _wait_for_count(trickle, lambda r: (r.method, r.status) == ("POST", 503), 2)
        await segment.write(b"payload")
    await publisher.write_segment(b"second")
    assert trickle.server.segment_data("stream", 0) == b"payload"
    assert trickle.server.segment_data("stream", 1) == b"second"
    posts = [(r.seq, r.status) for r in trickle.server.requests if r.method == "POST"]
    assert sorted(posts) == [("0", 200), ("0", 503), ("1", 200), ("1", 503)]
    assert publisher.statistics().retries == 2
    await publisher.close()


async def test_publisher_gives_up_after_its_retry_budget(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    trickle.server.faults.fail_next(100, status=502, method="POST", channel="stream")
    publisher = TricklePublisher(url, session=http, settings=S)

    async def write_once_refused_enough() -> None:
        async with publisher.segment() as segment:
            budget = S.retry.max_retries + 1
            await _wait_for_count(
                trickle, lambda r: (r.method, r.seq, r.status) == ("POST", "0", 502), budget
            )
            await segment.write(b"payload")

    with pytest.raises(RetriesExhausted):
        await write_once_refused_enough()
    assert trickle.server.segment_data("stream", 0) is None
    await publisher.close()


async def test_subscriber_retries_5xx_then_gives_up(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(b"data")
    trickle.server.faults.fail_next(2, status=500, method="GET", channel="stream")
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        segment = await sub.next_segment()
        assert segment is not None
        assert await segment.read() == b"data"
        assert sub.statistics().retries == 2
    trickle.server.faults.fail_next(100, status=500, method="GET", channel="stream")
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        with pytest.raises(RetriesExhausted):
            await sub.next_segment()
    await publisher.close()


async def test_broken_body_is_read_again_and_resumed(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    payload = bytes(range(256)) * 400
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(payload)
    trickle.server.faults.cut_get("stream", after_bytes=30_000)
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        segment = await sub.next_segment()
        assert segment is not None
        data = await segment.read()
    assert data == payload
    assert segment.restarts == 1
    assert segment.complete
    gets = [r for r in trickle.server.requests if (r.method, r.seq) == ("GET", "0")]
    assert len(gets) == 2
    await publisher.close()


async def test_a_read_again_is_retried_like_any_get(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    payload = bytes(range(256)) * 400
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(payload)
    trickle.server.faults.cut_get("stream", after_bytes=30_000)
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        segment = await sub.next_segment()
        assert segment is not None
        # the next seq is pre-connected: once that GET is in, the next two GETs are the re-reads of seq 0
        await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "1"))
        trickle.server.faults.fail_next(2, status=503, method="GET", channel="stream")
        data = await segment.read()
        assert sub.statistics().retries == 2
    assert data == payload
    assert (segment.restarts, segment.complete) == (1, True)
    gets = [r.status for r in trickle.server.requests if (r.method, r.seq) == ("GET", "0")]
    assert gets == [200, 503, 503, 200]
    await publisher.close()


async def test_a_segment_evicted_before_it_is_read_again_is_given_up(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    payload = bytes(range(256)) * 400
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(payload)
    trickle.server.faults.cut_get("stream", after_bytes=30_000)
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        segment = await sub.next_segment()
        assert segment is not None
        received = b""
        async for chunk in segment:
            if not received:  # the server keeps sending what it has, up to the cut
                assert trickle.server.faults.evict("stream", 0)
            received += chunk
        assert (segment.complete, segment.restarts) == (False, 0)
        assert payload.startswith(received)
        assert len(received) < len(payload)
        await publisher.write_segment(b"next")
        following = await sub.next_segment()  # the subscriber carries on at the live edge
        assert following is not None
        assert (following.seq, await following.read()) == (1, b"next")
        assert (sub.statistics().jumps, sub.statistics().retries) == (1, 0)
    await publisher.close()


async def test_subscriber_retries_a_refused_connection_then_gives_up(http: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:  # a port that is bound but never listens: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = channel_url(f"http://127.0.0.1:{sock.getsockname()[1]}/ai/trickle/", "stream")
        async with TrickleSubscriber(url, session=http, settings=S) as sub:
            with pytest.raises(RetriesExhausted, match="GET seq -2"):
                await sub.next_segment()
            assert sub.statistics().retries == S.retry.max_retries
            assert sub.ended


async def test_reset_releases_readers_waiting_on_older_segments(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    first = TricklePublisher(url, session=http, settings=S)
    await _publish(first, b"s0", b"s1")
    async with TrickleSubscriber(url, session=http, start_seq=2, settings=S) as sub:
        reader = asyncio.create_task(sub.next_segment())
        await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "2"))
        # A restarted publisher continues at seq 4 and says so: the reader waiting on 2 is released.
        restarted = TricklePublisher(url, session=http, start_seq=4, reset=True, settings=S)
        async with restarted.segment() as segment:
            await segment.write(b"s4")
            released = await asyncio.wait_for(reader, 5)
            assert released is not None
            assert (released.seq, await released.read()) == (2, b"")
    assert any(r.method == "POST" and r.seq == "4" for r in trickle.server.requests), (
        "the reset POST reached the server"
    )
    await restarted.close()


async def test_publisher_tolerates_interim_100_continue(http: aiohttp.ClientSession) -> None:
    async with serve_trickle(first_byte_keepalive_s=0.02) as running:
        url = _channel(running)
        publisher = TricklePublisher(url, session=http, settings=S)
        async with publisher.segment() as segment:
            # The pre-connected POST waits for its first byte; the server keeps it alive with 100s.
            await running.server.wait_for_keepalives(3)
            await segment.write(b"late data")
        assert running.server.segment_data("stream", 0) == b"late data"
        await publisher.close()


async def test_publisher_resumes_a_live_channel(trickle: RunningTrickle, http: aiohttp.ClientSession) -> None:
    url = _channel(trickle)
    first = TricklePublisher(url, session=http, settings=S)
    await _publish(first, b"s0", b"s1", b"s2")
    await first._drop_next()
    second = TricklePublisher(url, session=http, start_seq=SEQ_NEXT, settings=S)
    await second.write_segment(b"s3")
    assert trickle.server.segment_data("stream", 3) == b"s3"
    third = TricklePublisher(url, session=http, settings=S)
    assert await third.resume() == 4
    await second.close()


async def test_control_reader_skips_keepalives_and_reads_whole_messages(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _stream_channel(trickle, "control")
    big = {"prompt": "x" * 100_000, "strength": 0.5}
    publisher = TricklePublisher(url, session=http, mime_type=STREAM.mime_type("control"), settings=S)
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as sub:
        control = ControlReader(sub)
        reader = asyncio.create_task(_collect(control))
        for raw in (b'{"keep":"alive"}', b"not json", b"[1, 2]", json.dumps(big).encode(), b'{"a": 1}'):
            await publisher.write_segment(raw)
        await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "5"))
        await publisher.close()
        messages = await reader
    assert messages == [big, {"a": 1}]
    assert (control.keepalives, control.invalid) == (1, 2)


async def _collect(control: ControlReader) -> list[dict[str, Any]]:
    return [message async for message in control]


async def test_events_are_wrapped_one_per_segment(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _stream_channel(trickle, "events")
    events = EventsWriter(
        TricklePublisher(url, session=http, mime_type=STREAM.mime_type("events"), settings=S)
    )
    await events.send({"type": "status", "state": "ONLINE"})
    await events.send({"type": "custom", "timestamp": 5}, queue_event_type="custom_monitoring_event")
    name = STREAM.name("events")
    documents = [json.loads(trickle.server.segment_data(name, seq) or b"") for seq in (0, 1)]
    await events.close()
    assert documents[0]["queue_event_type"] == "ai_stream_status"
    assert documents[0]["event"]["state"] == "ONLINE"
    assert isinstance(documents[0]["event"]["timestamp"], int)
    assert documents[1] == {
        "event": {"type": "custom", "timestamp": 5},
        "queue_event_type": "custom_monitoring_event",
    }


async def test_data_lines_of_64_kib_are_refused(trickle: RunningTrickle, http: aiohttp.ClientSession) -> None:
    url, name = _stream_channel(trickle, "data"), STREAM.name("data")
    data = DataWriter(TricklePublisher(url, session=http, mime_type=STREAM.mime_type("data"), settings=S))
    await data.write({"n": 1}, {"n": 2})
    with pytest.raises(DataLineTooLong, match="65536"):
        await data.write({"n": 3}, {"blob": "x" * 70_000})
    assert trickle.server.segment_data(name, 0) == b'{"n":1}\n{"n":2}\n'
    assert trickle.server.segment_data(name, 1) in (None, b"")  # nothing of the refused batch
    await data.close()


def test_disabling_tls_verification_is_logged_once() -> None:
    code = (
        "import asyncio, logging\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from byoc.trickle.client import TrickleClientSettings, create_client_session\n"
        "async def main():\n"
        "    for _ in range(3):\n"
        "        async with create_client_session(TrickleClientSettings(verify_tls=False)):\n"
        "            pass\n"
        "    async with create_client_session(TrickleClientSettings()):\n"
        "        pass\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    warnings = [line for line in result.stderr.splitlines() if "verification is OFF" in line]
    assert len(warnings) == 1, result.stderr
