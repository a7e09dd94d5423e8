"""The one policy a session applies to trickle errors, whichever channel they happen on."""

from __future__ import annotations

import pytest

from byoc.errors import ChannelClosed, ChannelGone, RetriesExhausted, TrickleError
from byoc.session.policy import trickle_failure
from byoc.spec import EndReason
from byoc.trickle.layout import Role

_GONE = ChannelGone("404")
_CLOSED = ChannelClosed("closed")
_EXHAUSTED = RetriesExhausted("gave up")


@pytest.mark.parametrize(
    ("channel", "error", "expected"),
    [
        ("input", None, EndReason.INPUT_ENDED),
        ("control", None, EndReason.CONTROL_ENDED),
        ("input", _GONE, EndReason.INPUT_GONE),
        ("control", _GONE, EndReason.CONTROL_GONE),
        ("output", _GONE, EndReason.OUTPUT_GONE),
        ("output", _CLOSED, EndReason.OUTPUT_GONE),
        ("events", _GONE, EndReason.OUTPUT_GONE),
        ("events", _CLOSED, EndReason.OUTPUT_GONE),
        ("data", _GONE, EndReason.OUTPUT_GONE),
        ("data", _CLOSED, EndReason.OUTPUT_GONE),
        ("input", _EXHAUSTED, EndReason.TRICKLE_ERROR),
        ("control", _EXHAUSTED, EndReason.TRICKLE_ERROR),
        ("output", _EXHAUSTED, EndReason.TRICKLE_ERROR),
        ("output", TrickleError("bad answer"), EndReason.TRICKLE_ERROR),
        ("events", _EXHAUSTED, None),  # that event is lost; the stream goes on
        ("data", _EXHAUSTED, None),  # that batch is lost; the stream goes on
    ],
)
def test_trickle_failure_policy(
    channel: Role, error: TrickleError | None, expected: EndReason | None
) -> None:
    assert trickle_failure(channel, error) == expected
