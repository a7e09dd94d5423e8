"""What the listener process (byoc.serve.listener) takes for itself, and the answer it gives."""

from __future__ import annotations

import pytest

from byoc.serve.listener import HealthAnswer, is_health_request


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /health HTTP/1.1\r\n", True),
        (b"GET /health?verbose=1 HTTP/1.0\r\nHost: x\r\n\r\n", True),
        (b"GET /health HTTP/1.1", None),  # the line is not complete yet
        (b"", None),
        (b"HEAD /health HTTP/1.1\r\n", False),
        (b"POST /health HTTP/1.1\r\n", False),
        (b"GET /healthz HTTP/1.1\r\n", False),
        (b"GET /health/x HTTP/1.1\r\n", False),
        (b"GET /metrics HTTP/1.1\r\n", False),
        (b"GET  /health HTTP/1.1\r\n", False),
        (b"GET /health HTTP/2\r\n", False),
        (b"\r\nGET /health HTTP/1.1\r\n", False),
    ],
)
def test_only_a_plain_get_of_health_is_taken(head: bytes, expected: bool | None) -> None:
    assert is_health_request(head) is expected


def answer(at: float) -> HealthAnswer:
    return HealthAnswer(
        200,
        {"status": "ok", "uptime_s": 10.0},
        503,
        {"status": "error", "uptime_s": 10.0, "error": "silent"},
        at,
        5.0,
    )


def test_the_answer_carries_uptime_forward_and_turns_stale() -> None:
    sent = answer(at=100.0)
    assert sent.current(100.0) == (200, {"status": "ok", "uptime_s": 10.0})
    assert sent.current(104.25) == (200, {"status": "ok", "uptime_s": 14.25})
    assert sent.current(105.5) == (503, {"status": "error", "uptime_s": 15.5, "error": "silent"})
    assert sent.body["uptime_s"] == 10.0  # the message itself is not changed


def test_an_answer_without_uptime_and_the_wire_form() -> None:
    sent = HealthAnswer(200, {"status": "IDLE"}, 200, {"status": "ERROR"}, 1.0, 5.0)
    assert HealthAnswer.decode(sent.encode()) == sent
    assert sent.current(2.0) == (200, {"status": "IDLE"})
    assert sent.current(7.0) == (200, {"status": "ERROR"})
