"""The in-process trickle server over real loopback HTTP, row by row against go-livepeer's semantics.

Events are ordered through server state (``segment_data``, ``faults.pending``, the request log) and
queue-fed request bodies, never by sleeping for a guessed time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
import pytest

from byoc.dev.trickle_server import RequestRecord, RunningTrickle, serve_trickle
from byoc.trickle.protocol import CLOSED_HEADER, CLOSED_VALUE, LATEST_HEADER, RESET_HEADER, SEQ_HEADER

pytestmark = pytest.mark.timeout(10)

CH = "ch"
TEXT_PLAIN = "text/plain; charset=utf-8"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Feed:
    """A request body that yields exactly what the test puts in, when it puts it in."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def send(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk


async def until(condition: Callable[[], bool], limit_s: float = 3.0) -> None:
    """Wait for server-side state to change (a condition, not a guessed delay).

    The server exposes no event for "a handler reached this point", so this polls its state.
    """
    async with asyncio.timeout(limit_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


def url(rt: RunningTrickle, path: str) -> str:
    return rt.base_url + path


def last_get(rt: RunningTrickle, seq: str) -> RequestRecord:
    """The newest logged GET of ``seq`` (its byte count is final once the response has ended)."""
    return [r for r in rt.server.requests if r.method == "GET" and r.seq == seq][-1]


@pytest.fixture
async def trickle() -> AsyncIterator[RunningTrickle]:
    async with serve_trickle() as running:
        running.server.create_channel(CH)
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def expect(
    resp: aiohttp.ClientResponse,
    status: int,
    body: bytes | None = None,
    headers: Mapping[str, str | None] | None = None,
) -> None:
    """Read the whole response; assert its status, body and headers (``None``: header absent)."""
    data = await resp.read()
    assert resp.status == status, (resp.status, data)
    if body is not None:
        assert data == body
    for name, value in (headers or {}).items():
        assert resp.headers.get(name) == value, name


# --- unknown channels and bad seqs ----------------------------------------------------------------


async def test_unknown_channel_answers_like_go(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    not_found = b"Stream not found\n"
    await expect(
        await session.get(url(trickle, "nope/next")), 404, not_found, headers={"Content-Type": TEXT_PLAIN}
    )
    await expect(await session.get(url(trickle, "nope/0")), 404, not_found)
    # the channel is checked before the seq is parsed
    await expect(await session.get(url(trickle, "nope/abc")), 404, not_found)
    resp = await session.post(url(trickle, "nope/0"), data=b"x")
    await expect(resp, 404, not_found, headers={"Connection": "close"})
    await expect(await session.post(url(trickle, "nope")), 404, not_found)
    await expect(
        await session.delete(url(trickle, "nope")),
        400,
        b"Invalid stream\n",
        headers={"Content-Type": TEXT_PLAIN},
    )
    await expect(await session.delete(url(trickle, "nope/0")), 404, not_found)
    assert not trickle.server.has_channel("nope")
    assert trickle.server.channel_names() == [CH]


@pytest.mark.parametrize("seq", ["abc", "1.0", "0x1", "1e3", "-3", "-100", "99999999999999999999"])
async def test_get_rejects_bad_seqs(
    trickle: RunningTrickle, session: aiohttp.ClientSession, seq: str
) -> None:
    await expect(
        await session.get(url(trickle, f"{CH}/{seq}")),
        400,
        b"Invalid idx\n",
        headers={"Content-Type": TEXT_PLAIN},
    )


@pytest.mark.parametrize("seq", ["abc", "-2", "-7"])
async def test_post_rejects_bad_seqs(
    trickle: RunningTrickle, session: aiohttp.ClientSession, seq: str
) -> None:
    await expect(await session.post(url(trickle, f"{CH}/{seq}"), data=b"x"), 400, b"Invalid idx\n")
    assert trickle.server.segment_data(CH, 0) is None


async def test_delete_seq_errors_and_success(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    for seq in ("x", "-1"):
        await expect(await session.delete(url(trickle, f"{CH}/{seq}")), 400, b"Invalid idx\n")
    await expect(await session.delete(url(trickle, f"{CH}/3")), 400, b"Nonexistent segment\n")
    feed = Feed()
    feed.send(b"part")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: trickle.server.segment_data(CH, 0) == b"part")
    get = await session.get(url(trickle, f"{CH}/0"))
    assert await get.content.readexactly(4) == b"part"
    await expect(await session.delete(url(trickle, f"{CH}/0")), 200, b"")
    assert await get.read() == b""  # the reader got a clean end of the segment
    feed.end()
    await expect(await post, 200, headers={SEQ_HEADER: "0"})


# --- next, relative seqs, pre-creation ------------------------------------------------------------


async def test_next_and_relative_seqs(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    await expect(await session.get(url(trickle, f"{CH}/next")), 200, b"0", headers={LATEST_HEADER: "0"})
    for seq, body in ((0, b"a"), (1, b"b")):
        await expect(
            await session.post(url(trickle, f"{CH}/{seq}"), data=body), 200, headers={SEQ_HEADER: str(seq)}
        )
    resp = await session.get(url(trickle, f"{CH}/next"))
    await expect(resp, 200, b"2", headers={LATEST_HEADER: "2", CLOSED_HEADER: None})

    # -2 is the last written segment, from its first byte
    resp = await session.get(url(trickle, f"{CH}/-2"))
    await expect(resp, 200, b"b", headers={SEQ_HEADER: "1", LATEST_HEADER: "2", "Content-Type": "video/MP2T"})

    # -1 is the next one: the GET pre-creates seq 2 and waits for it
    get = asyncio.create_task(session.get(url(trickle, f"{CH}/-1")))
    await until(lambda: trickle.server.segment_data(CH, 2) == b"")
    assert not get.done()
    await expect(await session.post(url(trickle, f"{CH}/-1"), data=b"c"), 200, headers={SEQ_HEADER: "2"})
    # Lp-Trickle-Latest is left out when the segment is the one that was next at lookup time
    await expect(await get, 200, b"c", headers={SEQ_HEADER: "2", LATEST_HEADER: None})


async def test_fresh_channel_precreates_seq_0_and_1(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    server = trickle.server
    current = asyncio.create_task(session.get(url(trickle, f"{CH}/-2")))  # nextWrite 0 -> seq 0
    ahead = asyncio.create_task(session.get(url(trickle, f"{CH}/1")))  # allowed while nextWrite is 0
    await until(lambda: server.segment_data(CH, 0) == b"" and server.segment_data(CH, 1) == b"")
    resp = await session.get(url(trickle, f"{CH}/2"))
    await expect(resp, 470, b"Entry not found", headers={LATEST_HEADER: "0", SEQ_HEADER: "2"})
    await session.post(url(trickle, f"{CH}/0"), data=b"zero")
    await session.post(url(trickle, f"{CH}/1"), data=b"one")
    await expect(await current, 200, b"zero", headers={SEQ_HEADER: "0", LATEST_HEADER: None})
    # latest was 0 when the GET for seq 1 looked it up
    await expect(await ahead, 200, b"one", headers={SEQ_HEADER: "1", LATEST_HEADER: "0"})


async def test_get_streams_bytes_while_post_is_uploading(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    feed = Feed()
    feed.send(b"first-")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: trickle.server.segment_data(CH, 0) == b"first-")
    await expect(await session.get(url(trickle, f"{CH}/next")), 200, b"1")  # advanced on the first byte

    get = await session.get(url(trickle, f"{CH}/0"))
    assert get.status == 200
    assert get.headers[SEQ_HEADER] == "0"
    assert get.headers[LATEST_HEADER] == "1"
    assert get.headers["Content-Type"] == "video/MP2T"
    assert await get.content.readexactly(6) == b"first-"
    assert not post.done()
    feed.send(b"second")
    assert await get.content.readexactly(6) == b"second"
    assert not post.done()
    feed.end()
    assert await get.read() == b""
    await expect(await post, 200, b"", headers={SEQ_HEADER: "0"})
    assert last_get(trickle, "0").body_bytes == 12


async def test_470_once_a_seq_leaves_the_ring(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    for seq in range(7):
        await session.post(url(trickle, f"{CH}/{seq}"), data=f"s{seq}".encode())
    for seq in (0, 1, 8, 9):
        resp = await session.get(url(trickle, f"{CH}/{seq}"))
        await expect(resp, 470, b"Entry not found", headers={LATEST_HEADER: "7", SEQ_HEADER: str(seq)})
        assert resp.reason == "status code 470"
    await expect(await session.get(url(trickle, f"{CH}/2")), 200, b"s2", headers={LATEST_HEADER: "7"})

    # a waiting POST for seq 11 takes slot 1 from seq 6; -2 (= 6) is then missing and, as in Go,
    # the 470 echoes the unresolved seq
    feed = Feed()
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/11"), data=feed.body(), expect100=True))
    await until(lambda: trickle.server.segment_data(CH, 11) == b"")
    await expect(
        await session.get(url(trickle, f"{CH}/-2")), 470, headers={SEQ_HEADER: "-2", LATEST_HEADER: "7"}
    )
    feed.end()
    await expect(await post, 200, headers={SEQ_HEADER: "11"})


# --- closing ---------------------------------------------------------------------------------------


async def test_delete_wakes_waiting_reader_with_closed(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    get = asyncio.create_task(session.get(url(trickle, f"{CH}/0")))
    await until(lambda: trickle.server.segment_data(CH, 0) == b"")
    await expect(await session.delete(url(trickle, CH)), 200, b"")
    await expect(
        await get, 200, b"", headers={SEQ_HEADER: "0", LATEST_HEADER: "0", CLOSED_HEADER: CLOSED_VALUE}
    )
    assert not trickle.server.has_channel(CH)
    await expect(await session.get(url(trickle, f"{CH}/0")), 404)
    await expect(await session.get(url(trickle, f"{CH}/next")), 404)
    await expect(await session.delete(url(trickle, CH)), 400, b"Invalid stream\n")


async def test_delete_ends_a_streaming_reader_cleanly(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    feed = Feed()
    feed.send(b"abc")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: trickle.server.segment_data(CH, 0) == b"abc")
    get = await session.get(url(trickle, f"{CH}/0"))
    assert await get.content.readexactly(3) == b"abc"
    assert trickle.server.close_channel(CH)
    assert await get.read() == b""  # end of body, no transport error
    feed.end()
    await expect(await post, 200, headers={SEQ_HEADER: "0"})  # the POST outlives its channel, like in Go


async def test_closed_channel_answers_entry_not_found(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    # The delay holds the GET between channel lookup and segment lookup, where a DELETE can land.
    trickle.server.faults.delay_first_byte(CH, seconds=0.3)  # ample time for the DELETE to land
    get = asyncio.create_task(session.get(url(trickle, f"{CH}/3")))
    await until(lambda: trickle.server.faults.pending() == 0)
    await expect(await session.delete(url(trickle, CH)), 200)
    resp = await get
    await expect(
        resp,
        200,
        b"Entry not found",
        headers={CLOSED_HEADER: CLOSED_VALUE, SEQ_HEADER: "3", LATEST_HEADER: "0"},
    )


async def test_empty_segment(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    resp = await session.post(url(trickle, f"{CH}/0"), data=b"")
    await expect(resp, 200, b"", headers={"Connection": "close", SEQ_HEADER: "0", CLOSED_HEADER: None})
    await expect(await session.get(url(trickle, f"{CH}/next")), 200, b"1")
    resp = await session.get(url(trickle, f"{CH}/0"))
    await expect(resp, 200, b"", headers={SEQ_HEADER: "0", LATEST_HEADER: "1", CLOSED_HEADER: None})


async def test_repost_of_open_segment_appends(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    server = trickle.server
    feed = Feed()
    feed.send(b"Hello")
    first = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: server.segment_data(CH, 0) == b"Hello")
    await expect(await session.post(url(trickle, f"{CH}/0"), data=b"World"), 200, headers={SEQ_HEADER: "0"})
    assert server.segment_data(CH, 0) == b"HelloWorld"
    feed.send(b"!")  # the first upload goes on writing, even into the now-closed segment
    feed.end()
    await expect(await first, 200, headers={SEQ_HEADER: "0"})
    await expect(await session.get(url(trickle, f"{CH}/0")), 200, b"HelloWorld!")

    # a POST to a completed segment sees it closed before its first byte: nothing is appended
    resp = await session.post(url(trickle, f"{CH}/0"), data=b"again")
    await expect(resp, 200, b"", headers={"Connection": "close", SEQ_HEADER: "0"})
    assert server.segment_data(CH, 0) == b"HelloWorld!"


async def test_reset_releases_readers_of_older_segments(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    server = trickle.server
    feed = Feed()
    feed.send(b"Hello")
    old = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: server.segment_data(CH, 0) == b"Hello")
    get = await session.get(url(trickle, f"{CH}/0"))
    assert await get.content.readexactly(5) == b"Hello"

    resp = await session.post(url(trickle, f"{CH}/-1"), data=b"after-reset", headers={RESET_HEADER: "true"})
    await expect(resp, 200, headers={SEQ_HEADER: "1"})
    assert await get.read() == b""  # released with what it had
    await expect(await session.get(url(trickle, f"{CH}/1")), 200, b"after-reset")

    feed.send(b"late")  # the old publisher can still append until it ends its body
    feed.end()
    await expect(await old, 200, headers={SEQ_HEADER: "0"})
    assert server.segment_data(CH, 0) == b"Hellolate"


@pytest.mark.parametrize("close_whole_channel", [True, False])
async def test_post_waiting_for_first_byte_is_released_by_delete(
    trickle: RunningTrickle, session: aiohttp.ClientSession, close_whole_channel: bool
) -> None:
    feed = Feed()
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body(), expect100=True))
    await until(lambda: trickle.server.segment_data(CH, 0) == b"")
    target = CH if close_whole_channel else f"{CH}/0"
    await expect(await session.delete(url(trickle, target)), 200)
    closed = CLOSED_VALUE if close_whole_channel else None
    await expect(
        await post, 200, b"", headers={"Connection": "close", SEQ_HEADER: "0", CLOSED_HEADER: closed}
    )
    feed.end()
    if not close_whole_channel:  # next_write still moves past the released seq
        await expect(await session.get(url(trickle, f"{CH}/next")), 200, b"1")


# --- first-byte keep-alive -------------------------------------------------------------------------


async def test_keepalive_100_continue_is_skipped_by_aiohttp(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="byoc.dev.trickle_server")
    async with serve_trickle(first_byte_keepalive_s=0.02) as rt, aiohttp.ClientSession() as session:
        rt.server.create_channel(CH)
        feed = Feed()
        # aiohttp only sends request headers with the first body chunk unless it expects a 100
        post = asyncio.create_task(session.post(url(rt, f"{CH}/0"), data=feed.body(), expect100=True))
        await until(lambda: caplog.text.count("100 Continue") >= 2)
        feed.send(b"payload")
        feed.end()
        await expect(await post, 200, b"", headers={SEQ_HEADER: "0"})
        await expect(await session.get(url(rt, f"{CH}/0")), 200, b"payload")


async def test_keepalive_100_continue_on_the_wire() -> None:
    async with serve_trickle(first_byte_keepalive_s=0.02) as rt:
        rt.server.create_channel(CH)
        reader, writer = await asyncio.open_connection("127.0.0.1", rt.port)
        head = f"POST {rt.server.base_path}{CH}/0 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        assert await reader.readexactly(2 * len(CONTINUE)) == 2 * CONTINUE
        writer.write(b"5\r\nhello\r\n0\r\n\r\n")
        while (block := await reader.readuntil(b"\r\n\r\n")) == CONTINUE:
            pass
        assert block.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nLp-Trickle-Seq: 0\r\n" in block
        writer.close()
        await writer.wait_closed()
        assert rt.server.segment_data(CH, 0) == b"hello"


# --- idle sweep and autocreate ---------------------------------------------------------------------


async def test_idle_sweep_with_fake_clock() -> None:
    now = [1000.0]
    async with serve_trickle(clock=lambda: now[0]) as rt, aiohttp.ClientSession() as session:
        server = rt.server
        server.create_channel("old")
        server.create_channel("_internal")
        now[0] += 200
        server.create_channel("young")
        now[0] += 101
        waiting = asyncio.create_task(session.get(url(rt, "old/0")))
        await until(lambda: server.segment_data("old", 0) == b"")
        assert server.sweep_idle_channels() == ["old"]
        await expect(await waiting, 200, b"", headers={CLOSED_HEADER: CLOSED_VALUE})
        await expect(await session.get(url(rt, "old/next")), 404)
        assert sorted(server.channel_names()) == ["_internal", "young"]

        await session.post(url(rt, "young/0"), data=b"x")  # a write start refreshes the idle time
        now[0] += 300
        assert server.sweep_idle_channels() == []
        now[0] += 1
        assert server.sweep_idle_channels() == ["young"]
        assert server.channel_names() == ["_internal"]


async def test_background_sweeper_runs() -> None:
    now = [0.0]
    async with serve_trickle(clock=lambda: now[0], idle_timeout_s=5, sweep_interval_s=0.01) as rt:
        rt.server.create_channel("idle")
        now[0] = 6.0
        await until(lambda: not rt.server.has_channel("idle"))


async def test_autocreate_on(session: aiohttp.ClientSession) -> None:
    async with serve_trickle(autocreate=True) as rt:
        resp = await session.post(url(rt, "events"), headers={"Expect-Content": "application/json"})
        await expect(resp, 200)
        await session.post(url(rt, "events/0"), data=b"{}", headers={"Content-Type": "text/plain"})
        await expect(
            await session.get(url(rt, "events/0")), 200, b"{}", headers={"Content-Type": "application/json"}
        )
        resp = await session.post(
            url(rt, "data/0"), data=b"[]", headers={"Content-Type": "application/jsonl"}
        )
        await expect(resp, 200, headers={SEQ_HEADER: "0"})
        await expect(
            await session.get(url(rt, "data/0")), 200, b"[]", headers={"Content-Type": "application/jsonl"}
        )


async def test_autocreate_off(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    await expect(await session.post(url(trickle, "later")), 404, b"Stream not found\n")
    assert not trickle.server.has_channel("later")
    trickle.server.create_channel("later", "application/json")
    trickle.server.create_channel("later")  # idempotent: keeps the MIME type
    await expect(await session.post(url(trickle, "later")), 200, b"")
    await session.post(url(trickle, "later/0"), data=b"1", headers={"Content-Type": "video/mp2t"})
    await expect(
        await session.get(url(trickle, "later/0")), 200, b"1", headers={"Content-Type": "application/json"}
    )


# --- fault injection -------------------------------------------------------------------------------


async def test_fail_next(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    faults = trickle.server.faults
    faults.fail_next(2, status=503, method="GET", channel=CH)
    resp = await session.get(url(trickle, f"{CH}/next"))
    await expect(resp, 503, b"Service Unavailable\n", headers={"Content-Type": TEXT_PLAIN})
    await expect(await session.post(url(trickle, f"{CH}/0"), data=b"x"), 200)  # POST does not match
    await expect(await session.get(url(trickle, f"{CH}/0")), 503)
    await expect(await session.get(url(trickle, f"{CH}/0")), 200, b"x")
    faults.fail_next(1, status=500, channel="other")
    await expect(await session.get(url(trickle, f"{CH}/0")), 200)
    assert faults.pending() == 1
    faults.clear()
    assert faults.pending() == 0
    assert [r.status for r in trickle.server.requests] == [503, 200, 503, 200, 200]


async def test_cut_get_on_the_wire(trickle: RunningTrickle) -> None:
    server = trickle.server
    server.create_channel("raw")
    await _raw(trickle, f"POST {server.base_path}raw/0 HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789")
    server.faults.cut_get("raw", after_bytes=4)
    data = await _raw(trickle, f"GET {server.base_path}raw/0 HTTP/1.1\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"4\r\n0123\r\n"  # four bytes, then the connection ends without the last chunk
    record = last_get(trickle, "0")
    assert (record.channel, record.status, record.body_bytes) == ("raw", 200, 4)
    # the rule is used up: the next GET is whole
    data = await _raw(trickle, f"GET {server.base_path}raw/0 HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert data.endswith(b"a\r\n0123456789\r\n0\r\n\r\n")


async def _raw(rt: RunningTrickle, request: str) -> bytes:
    """Send one request on a fresh connection; return everything until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rt.port)
    writer.write(request.replace("\r\n", "\r\nHost: x\r\n", 1).encode())
    if "Content-Length" in request:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return head
    data = await reader.read()
    writer.close()
    return data


async def test_cut_get_while_streaming(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    feed = Feed()
    feed.send(b"abc")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: trickle.server.segment_data(CH, 0) == b"abc")
    trickle.server.faults.cut_get(CH, after_bytes=5)
    get = await session.get(url(trickle, f"{CH}/0"))
    assert await get.content.readexactly(3) == b"abc"
    feed.send(b"defgh")
    with pytest.raises(aiohttp.ClientPayloadError):
        await get.read()
    assert last_get(trickle, "0").body_bytes == 5
    feed.end()
    await expect(await post, 200)


async def test_cut_post_keeps_received_bytes(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    server = trickle.server
    server.faults.cut_post(CH, after_bytes=3)
    with pytest.raises(aiohttp.ClientError):
        await session.post(url(trickle, f"{CH}/0"), data=b"abcdef")
    record = await server.wait_for_request(lambda r: r.method == "POST")
    assert (record.status, record.body_bytes) == (0, 3)
    assert server.segment_data(CH, 0) == b"abc"
    await expect(await session.get(url(trickle, f"{CH}/next")), 200, b"1")
    # the segment was left open, so a retry on the same seq appends (the hazard clients must avoid)
    await expect(await session.post(url(trickle, f"{CH}/0"), data=b"def"), 200)
    await expect(await session.get(url(trickle, f"{CH}/0")), 200, b"abcdef")


async def test_cut_post_across_chunks(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    server = trickle.server
    server.faults.cut_post(after_bytes=4)
    feed = Feed()
    feed.send(b"ab")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: server.segment_data(CH, 0) == b"ab")
    feed.send(b"cdef")
    with pytest.raises(aiohttp.ClientError):
        await post
    assert server.segment_data(CH, 0) == b"abcd"
    feed.end()


async def test_reader_going_away_is_quiet(
    trickle: RunningTrickle, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    feed = Feed()
    feed.send(b"abc")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: trickle.server.segment_data(CH, 0) == b"abc")
    get = await session.get(url(trickle, f"{CH}/0"))
    assert await get.content.readexactly(3) == b"abc"
    get.close()  # drop the connection mid-segment
    feed.send(b"d" * 65536)
    feed.end()
    await expect(await post, 200)
    await until(lambda: last_get(trickle, "0").body_bytes > 0)  # the handler has finished
    assert last_get(trickle, "0").status == 200
    assert 3 <= last_get(trickle, "0").body_bytes <= 3 + 65536
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_cut_post_before_any_byte(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    trickle.server.faults.cut_post(after_bytes=0)
    with pytest.raises(aiohttp.ClientError):
        await session.post(url(trickle, f"{CH}/0"), data=b"abc")
    assert trickle.server.segment_data(CH, 0) == b""
    await expect(await session.get(url(trickle, f"{CH}/next")), 200, b"0")  # no byte, no advance


async def test_body_read_error_answers_500_and_leaves_segment_open(
    trickle: RunningTrickle, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    server = trickle.server
    feed = Feed()
    feed.send(b"par")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/0"), data=feed.body()))
    await until(lambda: server.segment_data(CH, 0) == b"par")
    post.cancel()  # the publisher goes away mid-body
    with pytest.raises(asyncio.CancelledError):
        await post
    record = await server.wait_for_request(lambda r: r.method == "POST")
    assert (record.status, record.body_bytes) == (500, 3)
    await expect(await session.post(url(trickle, f"{CH}/0"), data=b"tial"), 200)
    assert server.segment_data(CH, 0) == b"partial"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_delay_first_byte(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    await session.post(url(trickle, f"{CH}/0"), data=b"x")
    trickle.server.faults.delay_first_byte(seconds=0.15)
    started = time.monotonic()
    await expect(await session.get(url(trickle, f"{CH}/0")), 200, b"x")
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    await expect(await session.get(url(trickle, f"{CH}/0")), 200, b"x")
    assert time.monotonic() - started < 0.15


async def test_evict(trickle: RunningTrickle, session: aiohttp.ClientSession) -> None:
    server = trickle.server
    await session.post(url(trickle, f"{CH}/0"), data=b"a")
    assert server.faults.evict(CH, 0)
    assert not server.faults.evict(CH, 0)
    assert not server.faults.evict("nope", 0)
    await expect(
        await session.get(url(trickle, f"{CH}/0")), 470, headers={LATEST_HEADER: "1", SEQ_HEADER: "0"}
    )

    feed = Feed()
    feed.send(b"x")
    post = asyncio.create_task(session.post(url(trickle, f"{CH}/1"), data=feed.body()))
    await until(lambda: server.segment_data(CH, 1) == b"x")
    get = await session.get(url(trickle, f"{CH}/1"))
    assert await get.content.readexactly(1) == b"x"
    assert server.faults.evict(CH, 1)
    assert await get.read() == b""  # the reader is released
    feed.end()
    await expect(await post, 200)


# --- request log and shutdown ----------------------------------------------------------------------


async def test_request_log_and_wait_for_request(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    server = trickle.server
    await session.post(url(trickle, f"{CH}/0"), data=b"12345")
    await session.get(url(trickle, f"{CH}/7"))
    already = await server.wait_for_request(lambda r: r.method == "POST")
    assert (already.channel, already.seq, already.status, already.body_bytes) == (CH, "0", 200, 5)
    assert list(server.requests)[-1].status == 470

    later = asyncio.create_task(server.wait_for_request(lambda r: r.method == "DELETE"))
    await session.delete(url(trickle, CH))
    record = await later
    assert (record.channel, record.seq, record.status) == (CH, None, 200)
    with pytest.raises(TimeoutError):
        await server.wait_for_request(lambda r: r.status == 418, timeout=0.05)


async def test_waiting_get_is_logged_once_at_the_server(
    trickle: RunningTrickle, session: aiohttp.ClientSession
) -> None:
    get = asyncio.create_task(session.get(url(trickle, f"{CH}/-1")))
    record = await trickle.server.wait_for_request(lambda r: r.method == "GET" and r.seq == "-1")
    assert (record.status, record.body_bytes) == (200, 0)
    assert trickle.server.segment_data(CH, 0) == b""  # the GET pre-created seq 0 and waits on it
    assert not get.done()
    await session.post(url(trickle, f"{CH}/0"), data=b"late")
    await expect(await get, 200, b"late")
    assert last_get(trickle, "-1").body_bytes == 4
    assert len([r for r in trickle.server.requests if r.method == "GET"]) == 1


async def test_shutdown_releases_waiting_handlers() -> None:
    async with aiohttp.ClientSession() as session:
        async with serve_trickle(shutdown_timeout_s=0.2) as rt:
            rt.server.create_channel(CH)
            get = asyncio.create_task(session.get(url(rt, f"{CH}/0")))
            feed = Feed()
            post = asyncio.create_task(session.post(url(rt, f"{CH}/1"), data=feed.body(), expect100=True))
            await until(lambda: rt.server.segment_data(CH, 0) == b"" and rt.server.segment_data(CH, 1) == b"")
            started = time.monotonic()
        assert time.monotonic() - started < 1.0
        await expect(await get, 200, b"", headers={CLOSED_HEADER: CLOSED_VALUE})
        await expect(await post, 200, b"", headers={CLOSED_HEADER: CLOSED_VALUE, SEQ_HEADER: "1"})
        feed.end()
