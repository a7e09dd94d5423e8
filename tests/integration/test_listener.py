"""The listener process (byoc.serve.listener): ``/health`` from outside the runtime's interpreter, every
other connection handed to the runtime intact, and the runtime serving its port itself when the
listener is gone. Real loopback HTTP against the in-process runtime; the client that must keep
working while this interpreter is held runs in a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from byoc.dev.trickle_server import RunningTrickle
from byoc.serve.api import REPORT_STALE_S
from tests.integration.test_api import body_for, call, running
from tests.support import StreamHarness, listener_pids

_PROBE = """
import http.client, json, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
print(json.dumps({"started": time.monotonic()}), flush=True)
while time.monotonic() < end:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = json.loads(response.read())
        print(json.dumps({"at": time.monotonic(), "status": response.status, "body": body}), flush=True)
    except OSError as exc:
        print(json.dumps({"at": time.monotonic(), "error": str(exc)}), flush=True)
    finally:
        connection.close()
    time.sleep(0.05)
"""


def hold_the_interpreter(seconds: float) -> tuple[float, float]:
    """Keep every thread of this process from running Python for ``seconds``: a C call made with the
    interpreter lock held (``ctypes.pythonapi``'s calling convention keeps it). Returns when it began
    and ended on the monotonic clock, which every process on the machine shares."""
    usleep = ctypes.PyDLL(None).usleep
    began = time.monotonic()
    usleep(int(seconds * 1_000_000))
    return began, time.monotonic()


@contextlib.contextmanager
def probing(url: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A process that asks ``/health`` every 50 ms for ``seconds``, one JSON line per answer."""
    port = url.rsplit(":", 1)[1]
    probe = subprocess.Popen(
        [sys.executable, "-c", _PROBE, port, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert probe.stdout is not None
        json.loads(probe.stdout.readline())  # it runs
        yield probe
    finally:
        probe.kill()
        probe.wait()


def answers(probe: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, _ = probe.communicate(timeout=60)
    return [json.loads(line) for line in out.splitlines()]


async def test_health_is_answered_while_the_interpreter_is_held_and_is_error_when_it_stays_held() -> None:
    hold_s = REPORT_STALE_S + 1.5
    async with running() as (runtime, url):
        await runtime.wait_ready()
        with probing(url, hold_s + 2.0) as probe:
            began, ended = hold_the_interpreter(hold_s)
            got = await asyncio.to_thread(answers, probe)
    during = [a for a in got if began < a.get("at", 0) < ended]
    fresh = [a for a in during if a["at"] < began + REPORT_STALE_S - 0.5]
    stale = [a for a in during if a["at"] > began + REPORT_STALE_S + 0.5]
    assert fresh, got  # answered while no thread of the runtime could run
    assert all(a["status"] == 200 and a["body"]["status"] == "ok" for a in fresh), fresh
    assert stale, got
    for answer in stale:
        assert answer["status"] == 503
        assert answer["body"]["state"] == "ERROR"
        assert "has not reported its state" in answer["body"]["error"]
    assert any(a["at"] > ended and a["status"] == 200 for a in got), got[-3:]  # reporting again


async def test_inline_the_health_answers_wait_for_the_interpreter() -> None:
    # the contrast: without the listener process nothing answers while the interpreter is held
    async with running(api_listener="inline") as (runtime, url):
        await runtime.wait_ready()
        assert listener_pids(os.getpid()) == []
        with probing(url, 3.0) as probe:
            began, ended = hold_the_interpreter(1.5)
            got = await asyncio.to_thread(answers, probe)
    assert not [a for a in got if began < a.get("at", 0) < ended], got
    assert any(a.get("status") == 200 for a in got)


async def exchange(url: str, request: bytes) -> list[tuple[int, dict[bytes, bytes], dict[str, Any]]]:
    """Send ``request`` (one or more pipelined requests) on one connection and read until the server
    closes it: each answer's status, headers and JSON body (``{"text": ...}`` when not JSON)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    async with asyncio.timeout(15):
        raw = await reader.read()
    writer.close()
    answers = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(fields[b"content-length"])
        body = raw[:length]
        is_json = fields.get(b"content-type", b"").startswith(b"application/json")
        answers.append((int(head.split(b" ")[1]), fields, json.loads(body) if is_json else {"text": body}))
        raw = raw[length:]
    return answers


async def test_health_is_answered_on_keep_alive_and_any_other_request_goes_to_the_runtime_once() -> None:
    async with running() as (runtime, url):
        await runtime.wait_ready()
        pipelined = (
            b"GET /health HTTP/1.1\r\nHost: byoc\r\n\r\n"
            b"GET /health?probe=1 HTTP/1.1\r\nHost: byoc\r\n\r\n"
            b"GET /version HTTP/1.1\r\nHost: byoc\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: byoc\r\n\r\n"
        )
        answers = await exchange(url, pipelined)
        big = json.dumps({"model_id": "x" * 40_000}).encode()  # more than the listener reads at once
        post = f"POST /stream/start HTTP/1.1\r\nHost: byoc\r\nContent-Length: {len(big)}\r\n\r\n"
        ((status, fields, body),) = await exchange(url, post.encode() + big)
    assert [(a[0], a[2].get("status")) for a in answers[:2]] == [(200, "ok"), (200, "ok")]
    assert b"connection" not in answers[0][1]  # the listener keeps the connection
    # the runtime answers the first other request and closes: the next request comes through the
    # listener again, on a new connection
    assert len(answers) == 3
    assert (answers[2][0], answers[2][2]["pipeline"], answers[2][1][b"connection"]) == (200, "byoc", b"close")
    assert (status, body["field"]) == (400, "gateway_request_id")  # the whole body reached the checks
    assert fields[b"connection"] == b"close"


async def test_a_start_is_in_the_listener_health_before_its_answer(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    async with StreamHarness(trickle, http, "counted") as h, running() as (runtime, url):
        await runtime.wait_ready()
        assert (await call(http, "GET", f"{url}/health"))[1]["sessions"] == 0
        assert (await call(http, "POST", f"{url}/stream/start", json=body_for(h)))[0] == 200
        status, body, _ = await call(http, "GET", f"{url}/health")
        assert (status, body["sessions"], body["state"]) == (200, 1, "OK")


async def test_when_the_listener_process_dies_the_runtime_serves_its_port(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "byoc.serve.handoff")
    async with running() as (runtime, url):
        await runtime.wait_ready()
        (pid,) = listener_pids(os.getpid())
        os.kill(pid, signal.SIGKILL)
        # the connection waits in the listening socket's backlog until this process accepts it
        status, body, _ = await call(http, "GET", f"{url}/health", timeout=aiohttp.ClientTimeout(15))
        assert (status, body["status"]) == (200, "ok")
        assert (await call(http, "GET", f"{url}/version"))[0] == 200
        assert listener_pids(os.getpid()) == []
    assert f"the listener process {pid} ended" in caplog.text


async def test_a_health_request_announcing_a_body_goes_to_the_runtime() -> None:
    # two lengths, the last one 0: the listener must not answer and read "hello" as the next request
    smuggled = b"GET /health HTTP/1.1\r\nHost: byoc\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\nhello"
    async with running() as (runtime, url):
        await runtime.wait_ready()
        answers = await exchange(url, smuggled)
    assert [status for status, _, _ in answers] == [400]  # the runtime's HTTP parser refuses it


async def test_without_a_listener_process_the_runtime_serves_its_port_itself(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on a system without SOCK_SEQPACKET Unix sockets: making the pair fails with an OSError
    monkeypatch.setattr(socket, "SOCK_SEQPACKET", 0x7FFF)
    caplog.set_level(logging.WARNING, "byoc.serve.apiserver")
    async with running() as (runtime, url):
        await runtime.wait_ready()
        assert listener_pids(os.getpid()) == []
        status, body, _ = await call(http, "GET", f"{url}/health")
        assert (status, body["status"]) == (200, "ok")
    assert "no listener process" in caplog.text
