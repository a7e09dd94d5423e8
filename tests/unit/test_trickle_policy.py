"""The one policy a session applies to trickle errors, whichever channel they happen on."""

from __future__ import annotations

import pytest

from byoc.errors import ChannelClosed, ChannelGone, RetriesExhausted, TrickleError
from byoc.session.policy import FailureBudget, trickle_failure
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
        ("output", _EXHAUSTED, None),  # that segment is lost (counted); the failure budget decides
        ("output", TrickleError("bad answer"), None),
        ("events", _EXHAUSTED, None),  # that event is lost; the stream goes on
        ("data", _EXHAUSTED, None),  # that batch is lost; the stream goes on
    ],
)
def test_trickle_failure_policy(
    channel: Role, error: TrickleError | None, expected: EndReason | None
) -> None:
    assert trickle_failure(channel, error) == expected


def test_failure_budget_ends_only_an_outage_longer_than_the_budget() -> None:
    now = [100.0]
    budget = FailureBudget(3.0, EndReason.OUTPUT_UNREACHABLE, clock=lambda: now[0])
    assert budget.failed() is None  # the outage starts
    now[0] += 2.0
    assert budget.failed() is None
    budget.succeeded()  # a published segment ends the outage
    now[0] += 2.0
    assert budget.failed() is None  # a new outage, timed from here
    now[0] += 3.0
    assert budget.failed() is None  # exactly the budget: not over it yet
    now[0] += 0.5
    assert budget.failed() == EndReason.OUTPUT_UNREACHABLE


def test_failure_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="budget_s"):
        FailureBudget(0.0, EndReason.OUTPUT_UNREACHABLE)
