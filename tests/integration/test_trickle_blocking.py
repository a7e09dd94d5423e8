"""The blocking trickle client (byoc.trickle.blocking), which a session's media threads use, against
the byoc trickle server over real loopback HTTP. Its calls block, so they run on threads here while
the server runs on the test's loop."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import aiohttp
import pytest

from byoc.dev.trickle_server import RunningTrickle, serve_trickle
from byoc.errors import ChannelGone
from byoc.trickle.blocking import BlockingPublisher, BlockingSubscriber
from byoc.trickle.protocol import RetryPolicy, channel_url
from byoc.trickle.publisher import SegmentLoss, TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber
from tests.conftest import TEST_CLIENT_SETTINGS

S = TEST_CLIENT_SETTINGS


def _channel(trickle: RunningTrickle, name: str = "stream") -> str:
    trickle.server.create_channel(name, "video/MP2T")
    return channel_url(trickle.base_url, name)


def _read_all(subscriber: BlockingSubscriber, limit: int | None = None) -> list[tuple[int, bytes]]:
    """Every segment until the channel ends (or ``limit`` segments)."""
    got: list[tuple[int, bytes]] = []
    while (limit is None or len(got) < limit) and (seq := subscriber.next_segment()) is not None:
        parts = []
        while data := subscriber.read():
            parts.append(data)
        got.append((seq, b"".join(parts)))
    return got


async def test_segments_are_read_in_order_until_the_channel_is_deleted(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    payloads = [f"segment {i}".encode() * (1000 * i + 1) for i in range(4)]  # fewer than a channel keeps
    subscriber = BlockingSubscriber(url, settings=S, start_seq=0)
    reader = asyncio.create_task(asyncio.to_thread(_read_all, subscriber))
    await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "0"))  # it waits at 0
    publisher = TricklePublisher(url, session=http, settings=S)
    for payload in payloads:
        await publisher.write_segment(payload)
    await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", str(len(payloads))))
    await publisher.close()  # DELETE while the next GET waits: the end of the stream
    assert await asyncio.wait_for(reader, 10) == list(enumerate(payloads))
    assert subscriber.statistics().segments == len(payloads)


async def test_a_404_after_a_whole_segment_is_the_end_but_a_first_404_is_gone(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(b"last")
    patient = RetryPolicy(max_retries=10_000, initial_delay_s=0.05, max_delay_s=0.05, max_elapsed_s=60.0)
    settings = dataclasses.replace(S, retry=patient, preconnect_refresh_s=0.2)
    subscriber = BlockingSubscriber(url, settings=settings, start_seq=0)
    assert await asyncio.to_thread(_read_all, subscriber, 1) == [(0, b"last")]
    # The next seq's GET (re-issued every refresh period) is refused until the channel is gone: the
    # order in which a reader slow to ask for the next seq meets a gateway that deletes the channel
    # after its last segment.
    trickle.server.faults.fail_next(1_000_000, status=503, method="GET")
    following = asyncio.create_task(asyncio.to_thread(subscriber.next_segment))
    await trickle.server.wait_for_request(lambda r: (r.method, r.seq, r.status) == ("GET", "1", 503))
    await publisher.close()
    trickle.server.faults.clear()
    assert await asyncio.wait_for(following, 10) is None  # the end of the stream, not ChannelGone
    assert [r.status for r in trickle.server.requests if (r.method, r.seq) == ("GET", "1")][-1] == 404

    with pytest.raises(ChannelGone):  # a channel that is not there from the first GET is gone
        await asyncio.to_thread(BlockingSubscriber(url, settings=S).next_segment)


async def test_a_reader_that_fell_behind_jumps_to_the_live_edge(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(b"s0")
    subscriber = BlockingSubscriber(url, settings=S, start_seq=0)
    assert await asyncio.to_thread(_read_all, subscriber, 1) == [(0, b"s0")]
    # Eight more segments while the reader reads nothing: with a retention of 5, seq 2 is gone.
    for i in range(1, 9):
        await publisher.write_segment(b"s%d" % i)
    assert await asyncio.to_thread(_read_all, subscriber, 1) == [(1, b"s1")]  # pre-connected in time
    reader = asyncio.create_task(asyncio.to_thread(_read_all, subscriber, 1))
    await trickle.server.wait_for_request(lambda r: (r.method, r.seq, r.status) == ("GET", "2", 470))
    await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "9"))
    await publisher.write_segment(b"s9")
    assert await asyncio.wait_for(reader, 10) == [(9, b"s9")]
    assert (subscriber.statistics().jumps, subscriber.statistics().skipped) == (1, 7)  # 2 to 8: never read
    await publisher.close()


async def test_behind_counts_the_segments_begun_past_the_next(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = TricklePublisher(url, session=http, settings=S)
    for i in range(4):
        await publisher.write_segment(b"s%d" % i)
    subscriber = BlockingSubscriber(url, settings=S, start_seq=0)

    def behinds() -> list[int]:
        found: list[int] = []
        while len(found) < 4 and subscriber.next_segment() is not None:
            found.append(subscriber.behind)
            while subscriber.read():
                pass
        return found

    # Seq 0 was asked for with 1-3 there, seq 1 (pre-connected then) with 2 and 3, seq 2 (pre-connected
    # when 1 opened) and seq 3 with nothing past the one after them.
    assert await asyncio.to_thread(behinds) == [2, 1, 0, 0]
    await publisher.close()


async def test_a_broken_body_is_read_again_from_where_it_broke(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    payload = bytes(range(256)) * 400
    publisher = TricklePublisher(url, session=http, settings=S)
    await publisher.write_segment(payload)
    trickle.server.faults.cut_get("stream", after_bytes=30_000)
    subscriber = BlockingSubscriber(url, settings=S, start_seq=0)
    assert await asyncio.to_thread(_read_all, subscriber, 1) == [(0, payload)]
    assert subscriber.statistics().restarts == 1
    assert len([r for r in trickle.server.requests if (r.method, r.seq) == ("GET", "0")]) == 2
    await publisher.close()


async def test_a_read_again_that_finds_the_channel_gone_raises_at_the_next_segment(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    trickle.server.faults.cut_get("stream", after_bytes=30_000)
    subscriber = BlockingSubscriber(url, settings=S, start_seq=0)
    reading = asyncio.create_task(asyncio.to_thread(_read_all, subscriber))
    await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "0"))  # it waits at 0
    publisher = TricklePublisher(url, session=http, settings=S)
    async with publisher.segment() as segment:
        await segment.write(bytes(20_000))  # the body breaks only once 30 000 bytes went out...
        # ... by when every GET is answered 404: the segment's read again, and the next seq's
        trickle.server.faults.fail_next(2, status=404, method="GET")
        await segment.write(bytes(180_000))
    with pytest.raises(ChannelGone):
        await asyncio.wait_for(reading, 10)
    assert subscriber.statistics().restarts == 0  # the read again found nothing to resume
    await publisher.close()


async def test_close_from_another_thread_ends_a_waiting_read(trickle: RunningTrickle) -> None:
    url = _channel(trickle)
    subscriber = BlockingSubscriber(url, settings=S)
    waiting = asyncio.create_task(asyncio.to_thread(subscriber.next_segment))
    await trickle.server.wait_for_request(lambda r: r.method == "GET", timeout=10)
    subscriber.close()
    assert await asyncio.wait_for(waiting, 10) is None
    assert subscriber.closed


async def test_published_segments_are_stored_whole(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    url = _channel(trickle)
    publisher = BlockingPublisher(url, settings=S)

    def publish() -> list[SegmentLoss | None]:
        results: list[SegmentLoss | None] = []
        for i in range(3):
            publisher.open()
            for part in range(4):
                publisher.write(b"segment %d part %d;" % (i, part))
            results.append(publisher.finish())
        return results

    assert await asyncio.to_thread(publish) == [None, None, None]
    for i in range(3):
        assert trickle.server.segment_data("stream", i) == b"".join(
            b"segment %d part %d;" % (i, part) for part in range(4)
        )
    assert publisher.statistics().segments == 3
    async with TrickleSubscriber(url, session=http, start_seq=0, settings=S) as reader:
        segment = await reader.next_segment()
        assert segment is not None
        assert (segment.seq, await segment.read()) == (0, trickle.server.segment_data("stream", 0))
    await asyncio.to_thread(publisher.close)
    assert not trickle.server.has_channel("stream")


async def test_a_seq_is_posted_again_only_while_none_of_it_was_sent(trickle: RunningTrickle) -> None:
    url = _channel(trickle)
    # Refused before any of their body: the first segment's POST and the one pre-connected for the
    # second while the first was written.
    trickle.server.faults.fail_next(2, status=503, method="POST")
    publisher = BlockingPublisher(url, settings=S)

    def publish() -> list[SegmentLoss | None]:
        results: list[SegmentLoss | None] = []
        for data in (b"first", b"second"):
            publisher.open()
            publisher.write(data)
            results.append(publisher.finish())
        return results

    assert await asyncio.to_thread(publish) == [None, None]
    assert [trickle.server.segment_data("stream", i) for i in range(2)] == [b"first", b"second"]
    assert publisher.statistics().retries == 2
    refused = [r.seq or "" for r in trickle.server.requests if r.method == "POST" and r.status == 503]
    assert sorted(refused) == ["0", "1"]


async def test_a_segment_cut_after_some_bytes_is_lost_deleted_and_the_next_goes_on(
    trickle: RunningTrickle,
) -> None:
    url = _channel(trickle)
    trickle.server.faults.cut_post("stream", after_bytes=10_000)
    publisher = BlockingPublisher(url, settings=S)

    def publish() -> list[SegmentLoss | None]:
        results: list[SegmentLoss | None] = []
        for _ in range(2):
            publisher.open()
            for _ in range(10):
                publisher.write(b"x" * 4000)
            results.append(publisher.finish())
        return results

    first, second = await asyncio.to_thread(publish)
    assert first in ("broken", "refused")
    assert second is None
    assert trickle.server.segment_data("stream", 1) == b"x" * 40_000
    deletes = [r for r in trickle.server.requests if (r.method, r.seq) == ("DELETE", "0")]
    assert len(deletes) == 1
    assert publisher.statistics().broken_segments == 1


async def test_publishing_to_an_unknown_channel_raises_channel_gone(trickle: RunningTrickle) -> None:
    publisher = BlockingPublisher(channel_url(trickle.base_url, "nope"), settings=S)

    def publish() -> None:
        publisher.open()
        publisher.write(b"x")
        publisher.finish()

    with pytest.raises(ChannelGone):
        await asyncio.to_thread(publish)


async def test_interim_100_continue_answers_are_skipped() -> None:
    async with serve_trickle(first_byte_keepalive_s=0.02) as running:
        url = _channel(running)
        publisher = BlockingPublisher(url, settings=S)

        def first() -> None:
            publisher.open()
            publisher.write(b"first")
            assert publisher.finish() is None

        def second() -> SegmentLoss | None:
            publisher.open()  # on the pre-connected POST, which got 100s while it waited
            publisher.write(b"late data")
            return publisher.finish()

        await asyncio.to_thread(first)
        await running.server.wait_for_keepalives(3)
        assert await asyncio.to_thread(second) is None
        assert running.server.segment_data("stream", 1) == b"late data"


async def test_cut_from_another_thread_ends_a_post_that_gets_no_answer() -> None:
    """A server that takes the body and never answers: cut() ends the wait for the answer at once,
    long before the response timeout."""
    received = threading.Event()
    server = await asyncio.start_server(lambda r, w: _swallow(r, received), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = dataclasses.replace(S, response_timeout_s=300.0)
    publisher = BlockingPublisher(f"http://127.0.0.1:{port}/stream", settings=settings)

    def publish() -> SegmentLoss | None:
        publisher.open()
        publisher.write(b"data")
        return publisher.finish()

    try:
        publishing = asyncio.create_task(asyncio.to_thread(publish))
        await asyncio.to_thread(received.wait, 10)
        publisher.cut()
        assert await asyncio.wait_for(publishing, 10) == "broken"  # sent, never confirmed
        assert publisher.statistics().broken_segments == 1
    finally:
        server.close()


async def _swallow(reader: asyncio.StreamReader, received: threading.Event) -> None:
    """Read requests (headers and body) and never answer them; ``received`` once a body came."""
    while data := await reader.read(65536):
        if b"data" in data:
            received.set()
