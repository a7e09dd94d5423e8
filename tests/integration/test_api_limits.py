"""The API's edge under hostile or broken clients: stream ids, timeouts, connection and size limits, JSON
that cannot be used. Real loopback HTTP (aiohttp and raw sockets) against the in-process runtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from byoc.dev.trickle_server import RunningTrickle
from tests.integration.test_api import body_for, call, running
from tests.integration.test_thread_ownership import errors_total, first_event
from tests.support import StreamHarness


async def raw_exchange(url: str, request: bytes, timeout: float = 15.0) -> tuple[int, dict[str, Any]]:  # noqa: ASYNC109
    """Send ``request`` as it is and read the answer until the server closes: status and JSON body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(timeout):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else {}


def raw_post(path: str, body: bytes, *headers: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: byoc", b"Connection: close", *headers]
    lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@contextlib.asynccontextmanager
async def partial_request(url: str, head: bytes, body: bytes = b"") -> AsyncIterator[asyncio.StreamReader]:
    """A connection that sent ``head`` (headers, maybe part of a body) and nothing more.

    With ``body``, ``head`` ends in ``Expect: 100-continue``: the server's ``100 Continue`` says its
    handler has taken the request (the connection is busy) before ``body`` is sent."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    try:
        if body:
            async with asyncio.timeout(10):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            writer.write(body)
        yield reader
    finally:
        writer.close()


def busy_head(content_length: int) -> bytes:
    """Headers of a params update whose body is on its way, for :func:`partial_request`."""
    return (
        f"POST /stream/params HTTP/1.1\r\nHost: byoc\r\nContent-Length: {content_length}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()


# --- 1. stream ids --------------------------------------------------------------------------------

BAD_IDS: list[tuple[str, bytes]] = [
    ("a byte that is not UTF-8", b"live\xff"),
    ("LINE SEPARATOR", "live\u2028x".encode()),
    ("NEXT LINE", "live\u0085x".encode()),
    ("RIGHT-TO-LEFT OVERRIDE", "live\u202ex".encode()),
    ("a space", b"live x"),
    ("too long", b"x" * 257),
]


async def test_stream_ids_outside_printable_ascii_are_refused_on_every_route(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http, "live") as live, running() as (runtime, url):
        await runtime.wait_ready()
        body = json.dumps(body_for(live)).encode()
        for what, bad in BAD_IDS:
            status, answer = await raw_exchange(url, raw_post("/stream/start", body, b"X-Stream-Id: " + bad))
            assert (status, answer.get("field")) == (400, "X-Stream-Id"), what
            assert "printable ASCII" in answer["error"], what
        for field in ("gateway_request_id", "stream_id"):
            weird = {field: "live\u2028INFO forged line"}
            status, answer, _ = await call(http, "POST", f"{url}/stream/stop", json=weird)
            assert (status, answer.get("field")) == (400, field)
        status, answer, _ = await call(
            http, "POST", f"{url}/stream/start", json=body_for(live, gateway_request_id="a\u202eb")
        )
        assert (status, answer.get("field")) == (400, "gateway_request_id")
        status, answer, _ = await call(http, "GET", f"{url}/stream/status", params={"stream_id": "a\u0085b"})
        assert (status, answer.get("field")) == (400, "stream_id")
        assert runtime.sessions_active() == 0
        # a well-formed id still starts its stream
        status, _ = await raw_exchange(url, raw_post("/stream/start", body, b"X-Stream-Id: live"))
        assert status == 200


# --- 2. timeouts and the connection cap -----------------------------------------------------------


async def test_a_request_whose_headers_never_end_is_closed_after_the_header_timeout(
    http: aiohttp.ClientSession,
) -> None:
    async with running(api_header_timeout_s=1.0) as (_, url):
        started = asyncio.get_running_loop().time()
        async with partial_request(url, b"GET /health HTTP/1.1\r\nHost: byoc\r\n") as reader:
            async with asyncio.timeout(1.0 + 10):
                assert await reader.read() == b""  # the server closed the connection
        assert asyncio.get_running_loop().time() - started >= 1.0
        assert (await call(http, "GET", f"{url}/health"))[0] == 200


async def test_a_body_that_never_arrives_gets_408_and_an_announced_huge_one_413_at_once(
    http: aiohttp.ClientSession,
) -> None:
    async with running(api_body_timeout_s=1.0) as (_, url):
        head = b"POST /stream/params HTTP/1.1\r\nHost: byoc\r\nContent-Length: 500000\r\n\r\n" + b"x" * 1000
        async with partial_request(url, head) as reader:
            async with asyncio.timeout(1.0 + 10):
                answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ")
        huge = (
            b"POST /stream/params HTTP/1.1\r\nHost: byoc\r\nContent-Length: 200000000\r\n\r\n" + b"x" * 1000
        )
        async with partial_request(url, huge) as reader:
            async with asyncio.timeout(10):  # far below the body timeout of 30 s it would otherwise wait
                answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert sum((await errors_total(http, url)).values()) == 0


async def test_idle_connections_make_way_and_health_is_served_when_every_connection_is_busy(
    http: aiohttp.ClientSession,
) -> None:
    cap = 8
    async with running(api_max_connections=cap) as (_, url), contextlib.AsyncExitStack() as stack:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(cap * 6):  # idle: connected, sent nothing
            _, writer = await asyncio.open_connection(host, int(port))
            stack.callback(writer.close)
        health = b"GET /health HTTP/1.1\r\nHost: byoc\r\nConnection: close\r\n\r\n"
        assert (await raw_exchange(url, health))[0] == 200
        # every connection busy: each in the middle of a body
        for _ in range(cap):
            await stack.enter_async_context(partial_request(url, busy_head(100), b"{"))
        assert (await raw_exchange(url, health))[0] == 200
        status, answer = await raw_exchange(url, raw_post("/stream/stop", b"", b"X-Stream-Id: s"))
        assert status == 503
        assert "only /health" in answer["error"]


# --- 3. sizes -------------------------------------------------------------------------------------


async def test_oversized_params_and_outputs_are_refused_and_events_carry_a_digest(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    limit = 16 * 1024
    settings: dict[str, Any] = {
        "max_params_bytes": limit,
        "max_output_pixels": 640 * 480,
        "status_interval_s": 0.2,
    }
    async with StreamHarness(trickle, http, "big") as h, running(**settings) as (runtime, url):
        await runtime.wait_ready()
        params: dict[str, Any] = {"prompt": "p" * (limit + 1)}
        status, answer, _ = await call(http, "POST", f"{url}/stream/start", json=body_for(h, params=params))
        assert (status, answer["field"]) == (400, "params")
        status, answer, _ = await call(
            http, "POST", f"{url}/stream/start", json=body_for(h, params={"width": 4096, "height": 4096})
        )
        assert (status, answer["field"]) == (400, "params.width")
        assert str(640 * 480) in answer["error"]
        large = {"prompt": "p" * (limit // 2)}
        assert (await call(http, "POST", f"{url}/stream/start", json=body_for(h, params=large)))[0] == 200
        # updates add up: the second half would take the stream's parameters past the limit
        headers = {"X-Stream-Id": "big"}
        status, answer, _ = await call(
            http, "POST", f"{url}/stream/params", json={"other": "q" * (limit // 2)}, headers=headers
        )
        assert (status, answer["field"]) == (400, "params")
        status, answer, _ = await call(http, "GET", f"{url}/stream/status?stream_id=big")
        assert answer["params"] == large
        event = await first_event(h, lambda event: event.get("type") == "status")
        assert "last_params" not in event["inference_status"]
        compact = json.dumps(large, separators=(",", ":"))
        assert event["inference_status"]["last_params_digest"]["bytes"] == len(compact)
        assert len(json.dumps(event)) < 4096


async def test_concurrent_large_bodies_beyond_the_budget_get_503(http: aiohttp.ClientSession) -> None:
    body_size = 600 * 1024
    async with (
        running(api_body_memory_bytes=2 * body_size, max_body_bytes=body_size) as (_, url),
        contextlib.AsyncExitStack() as stack,
    ):
        for _ in range(2):  # two bodies on their way hold the whole budget
            await stack.enter_async_context(partial_request(url, busy_head(body_size), b"{"))
        third = raw_post("/stream/params", b"{" + b" " * (body_size - 2) + b"}")
        status, answer = await raw_exchange(url, third)
        assert (status, "request bodies" in answer["error"]) == (503, True)
        await stack.aclose()  # once they are gone, there is room again
        status, _ = await raw_exchange(url, raw_post("/stream/params", b"{}", b"X-Stream-Id: nope"))
        assert status == 404


# --- 4. unusable JSON and clients that go away ----------------------------------------------------

UNUSABLE_JSON: list[tuple[str, bytes]] = [
    ("NaN", b'{"gateway_request_id": "x", "params": {"width": NaN, "height": 256}}'),
    ("Infinity", b'{"gateway_request_id": "x", "params": {"width": Infinity, "height": 256}}'),
    (
        "a number too large for a float",
        b'{"gateway_request_id": "x", "params": {"width": 1e999, "height": 2}}',
    ),
    ("100,000 nested arrays", b"[" * 100_000 + b"]" * 100_000),
    ("100,000 nested objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
]


async def test_non_finite_numbers_and_deep_nesting_get_400(http: aiohttp.ClientSession) -> None:
    async with running() as (_, url):
        for what, raw in UNUSABLE_JSON:
            for path in ("/stream/start", "/stream/params"):
                status, answer, _ = await call(http, "POST", f"{url}{path}", data=raw)
                assert (status, answer.get("field")) == (400, "body"), (what, path)
            status, answer, _ = await call(http, "POST", f"{url}/stream/stop", data=raw)
            assert (status, answer["status"]) == (200, "not running"), what  # any body: no id in it
        assert sum((await errors_total(http, url)).values()) == 0


async def test_a_client_that_leaves_mid_body_is_not_a_server_error(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="byoc.serve.api")
    async with running() as (_, url):
        head = b"POST /stream/params HTTP/1.1\r\nHost: byoc\r\nContent-Length: 1000\r\n\r\n{"
        async with partial_request(url, head):
            pass  # closed with 999 bytes of the body still to come
        async with asyncio.timeout(10):
            while True:  # polls the log for the server's side of it
                if any("went away" in record.getMessage() for record in caplog.records):
                    break
                await asyncio.sleep(0.02)
        assert sum((await errors_total(http, url)).values()) == 0
    assert not [r for r in caplog.records if r.name == "byoc.serve.api" and r.levelno >= logging.WARNING]
