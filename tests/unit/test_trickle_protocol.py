"""Table-driven tests of the pure trickle protocol module."""

from __future__ import annotations

import pytest

from byoc.trickle.layout import ROLES, StreamChannels, role_of_field
from byoc.trickle.protocol import (
    CLOSED_HEADER,
    LATEST_HEADER,
    SEQ_HEADER,
    Accepted,
    ChannelEnded,
    Fatal,
    GetOutcome,
    Gone,
    JumpToLatest,
    PostOutcome,
    Retry,
    RetryPolicy,
    RetryState,
    SegmentReady,
    channel_url,
    classify_get,
    classify_post,
    deleted_after_last,
    next_url,
    parse_int_header,
    post_failure,
    segment_url,
)

CLOSED = {CLOSED_HEADER: "terminated"}


@pytest.mark.parametrize(
    ("status", "headers", "requested", "expected"),
    [
        # a segment, with and without the headers the server sets
        (200, {SEQ_HEADER: "7", LATEST_HEADER: "8"}, -2, SegmentReady(7, 8)),
        (200, {SEQ_HEADER: "7"}, 7, SegmentReady(7, None)),
        (200, {}, 3, SegmentReady(3, None)),
        (200, {}, -1, Retry("200 without Lp-Trickle-Seq for a relative seq")),
        (200, {SEQ_HEADER: "x"}, 4, SegmentReady(4, None)),
        # the channel is closed: checked before the body ("Entry not found" is not data)
        (200, {**CLOSED, SEQ_HEADER: "3"}, 3, ChannelEnded()),
        (470, {**CLOSED, LATEST_HEADER: "9"}, 3, ChannelEnded()),
        # fell behind or asked too far ahead: jump to the live edge
        (470, {LATEST_HEADER: "12", SEQ_HEADER: "2"}, 2, JumpToLatest(12)),
        (470, {LATEST_HEADER: " 0 "}, 9, JumpToLatest(0)),
        (470, {}, 2, Retry("470 without a usable Lp-Trickle-Latest")),
        (470, {LATEST_HEADER: "-4"}, 2, Retry("470 without a usable Lp-Trickle-Latest")),
        # gone for good
        (404, {}, 0, Gone()),
        (404, CLOSED, 0, Gone()),
        # transient
        (500, {}, 0, Retry("HTTP 500")),
        (503, {}, 0, Retry("HTTP 503")),
        (408, {}, 0, Retry("HTTP 408")),
        (429, {}, 0, Retry("HTTP 429")),
        # a request the server cannot understand: retrying will not help
        (400, {}, 0, Fatal("HTTP 400")),
        (401, {}, 0, Fatal("HTTP 401")),
    ],
)
def test_classify_get(status: int, headers: dict[str, str], requested: int, expected: GetOutcome) -> None:
    assert classify_get(status, headers, requested) == expected


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {SEQ_HEADER: "4"}, Accepted(4)),
        (200, {}, Accepted(None)),
        (200, {**CLOSED, SEQ_HEADER: "4"}, ChannelEnded()),
        (404, {}, Gone()),
        (500, {}, Retry("HTTP 500")),
        (502, {}, Retry("HTTP 502")),
        (400, {}, Fatal("HTTP 400")),
        (405, {}, Fatal("HTTP 405")),
    ],
)
def test_classify_post(status: int, headers: dict[str, str], expected: PostOutcome) -> None:
    assert classify_post(status, headers) == expected


@pytest.mark.parametrize(
    ("outcome", "previous_whole", "expected"),
    [
        (Gone(), True, ChannelEnded()),  # deleted after its last segment, before this GET arrived
        (Gone(), False, Gone()),  # no segment, or one that broke off: the channel is gone
        (Retry("HTTP 503"), True, Retry("HTTP 503")),
        (SegmentReady(3, None), True, SegmentReady(3, None)),
    ],
)
def test_a_404_after_a_whole_segment_is_the_end_of_the_stream(
    outcome: GetOutcome, previous_whole: bool, expected: GetOutcome
) -> None:
    assert deleted_after_last(outcome, previous_whole) == expected


def test_a_failed_post_says_what_it_knows() -> None:
    assert post_failure(503, 4000, Retry("HTTP 503")) == "refused with HTTP 503"
    assert post_failure(None, 0, Retry("reset")) == "failed before a byte was written (reset)"
    assert post_failure(None, 20, Retry("reset")) == "broke off after 20 bytes were written (reset)"


@pytest.mark.parametrize(
    ("base", "name", "seq", "channel", "segment", "nxt"),
    [
        (
            "http://o:8935/ai/trickle/",
            "s1",
            0,
            "http://o:8935/ai/trickle/s1",
            "http://o:8935/ai/trickle/s1/0",
            "http://o:8935/ai/trickle/s1/next",
        ),
        (
            "https://o/ai/trickle",
            "s1-out",
            -2,
            "https://o/ai/trickle/s1-out",
            "https://o/ai/trickle/s1-out/-2",
            "https://o/ai/trickle/s1-out/next",
        ),
    ],
)
def test_urls(base: str, name: str, seq: int, channel: str, segment: str, nxt: str) -> None:
    assert channel_url(base, name) == channel
    assert segment_url(channel, seq) == segment
    assert segment_url(channel + "/", seq) == segment
    assert next_url(channel) == nxt


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({SEQ_HEADER: "5"}, 5), ({SEQ_HEADER: "-1"}, -1), ({SEQ_HEADER: "five"}, None), ({}, None)],
)
def test_parse_int_header(headers: dict[str, str], expected: int | None) -> None:
    assert parse_int_header(headers, SEQ_HEADER) == expected


POLICY = RetryPolicy(max_retries=3, initial_delay_s=0.5, max_delay_s=1.5, multiplier=2.0, max_elapsed_s=10.0)


@pytest.mark.parametrize(
    ("state", "now", "expected_state", "expected_delay"),
    [
        # the first failure starts the clock
        (RetryState(), 100.0, RetryState(1, 100.0), 0.5),
        # exponential, capped at max_delay_s
        (RetryState(1, 100.0), 101.0, RetryState(2, 100.0), 1.0),
        (RetryState(2, 100.0), 102.0, RetryState(3, 100.0), 1.5),
        # the count is spent
        (RetryState(3, 100.0), 103.0, RetryState(4, 100.0), None),
        # the time is spent even though the count is not
        (RetryState(1, 100.0), 110.5, RetryState(2, 100.0), None),
    ],
)
def test_retry_policy(
    state: RetryState, now: float, expected_state: RetryState, expected_delay: float | None
) -> None:
    assert POLICY.after_failure(state, now) == (expected_state, expected_delay)


# --- the channels of one stream (go-livepeer's byoc/stream_orchestrator.go, docs/protocol.md §2.2) ----


def test_stream_channels_are_named_and_typed_as_go_livepeer_creates_them() -> None:
    channels = StreamChannels("cam1-3f9a")
    assert channels.roles == ("input", "output", "control", "events")  # no data unless asked for
    assert channels.names() == {
        "input": "cam1-3f9a",
        "output": "cam1-3f9a-out",
        "control": "cam1-3f9a-control",
        "events": "cam1-3f9a-events",
    }
    assert [channels.mime_type(role) for role in ROLES] == [
        "video/MP2T",
        "video/MP2T",
        "application/json",
        "application/json",
        "application/jsonl",
    ]
    with pytest.raises(KeyError, match="no data channel"):
        channels.name("data")
    assert StreamChannels("cam1-3f9a", data=True).names()["data"] == "cam1-3f9a-data"


def test_the_container_and_the_gateway_see_input_and_output_from_opposite_ends() -> None:
    base = "https://o:8935/ai/trickle/"
    channels = StreamChannels("s1", data=True)
    assert channels.start_body(base, {"prompt": "a cat"}) == {
        "gateway_request_id": "s1",
        "subscribe_url": "https://o:8935/ai/trickle/s1",  # the container reads the input
        "publish_url": "https://o:8935/ai/trickle/s1-out",  # ...and writes the output
        "control_url": "https://o:8935/ai/trickle/s1-control",
        "events_url": "https://o:8935/ai/trickle/s1-events",
        "data_url": "https://o:8935/ai/trickle/s1-data",
        "params": {"prompt": "a cat"},
    }
    assert channels.gateway_urls(base) == {
        "publish_url": "https://o:8935/ai/trickle/s1",  # the gateway writes the input
        "subscribe_url": "https://o:8935/ai/trickle/s1-out",  # ...and reads the output
        "control_url": "https://o:8935/ai/trickle/s1-control",
        "events_url": "https://o:8935/ai/trickle/s1-events",
        "data_url": "https://o:8935/ai/trickle/s1-data",
    }
    assert "data_url" not in StreamChannels("s1").container_urls(base)  # absent, not empty
    assert [role_of_field(f) for f in ("subscribe_url", "publish_url", "data_url")] == [
        "input",
        "output",
        "data",
    ]
    with pytest.raises(KeyError):
        role_of_field("stream_url")
