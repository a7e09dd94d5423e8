"""The one policy a session applies to trickle errors, whichever channel they happen on."""

from __future__ import annotations

import pytest

from byoc.errors import ChannelClosed, ChannelGone, RetriesExhausted, TrickleError
from byoc.session.session import Channel, trickle_failure
from byoc.spec import EndReason

_GONE = ChannelGone("404")
_CLOSED = ChannelClosed("closed")
_EXHAUSTED = RetriesExhausted("gave up")


@pytest.mark.parametrize(
    ("channel", "error", "expected"),
    [
        (Channel.INPUT, None, EndReason.INPUT_ENDED),
        (Channel.CONTROL, None, EndReason.CONTROL_ENDED),
        (Channel.INPUT, _GONE, EndReason.INPUT_GONE),
        (Channel.CONTROL, _GONE, EndReason.CONTROL_GONE),
        (Channel.OUTPUT, _GONE, EndReason.OUTPUT_GONE),
        (Channel.OUTPUT, _CLOSED, EndReason.OUTPUT_GONE),
        (Channel.EVENTS, _GONE, EndReason.OUTPUT_GONE),
        (Channel.EVENTS, _CLOSED, EndReason.OUTPUT_GONE),
        (Channel.DATA, _GONE, EndReason.OUTPUT_GONE),
        (Channel.DATA, _CLOSED, EndReason.OUTPUT_GONE),
        (Channel.INPUT, _EXHAUSTED, EndReason.TRICKLE_ERROR),
        (Channel.CONTROL, _EXHAUSTED, EndReason.TRICKLE_ERROR),
        (Channel.OUTPUT, _EXHAUSTED, EndReason.TRICKLE_ERROR),
        (Channel.OUTPUT, TrickleError("bad answer"), EndReason.TRICKLE_ERROR),
        (Channel.EVENTS, _EXHAUSTED, None),  # that event is lost; the stream goes on
        (Channel.DATA, _EXHAUSTED, None),  # that batch is lost; the stream goes on
    ],
)
def test_trickle_failure_policy(
    channel: Channel, error: TrickleError | None, expected: EndReason | None
) -> None:
    assert trickle_failure(channel, error) == expected
