"""The one policy a session applies to trickle failures, whichever of its channels they happen on.

* The end of the input or control channel ends the session: ``input_ended`` / ``control_ended``.
* A 404 or a closed channel (ChannelGone, ChannelClosed) ends it: ``input_gone``, ``control_gone``, or
  ``output_gone`` for any channel it publishes (output, events, data). The gateway ended the stream,
  so this is not counted as an error.
* Any other TrickleError (retries exhausted, a protocol error) on the input or control channel is
  counted as a ``trickle`` error and ends the session with ``trickle_error``; on the events or data
  channel it is counted the same way, only that event or batch is lost and the session goes on.
* On the output channel it costs the segment: every output segment the gateway cannot have received
  whole is counted as lost (``refused``, ``broken``, ``unreachable``; an ``output`` error), and the
  session goes on — until the output has lost every segment for longer than its failure budget
  (:class:`FailureBudget`, ``output_failure_budget_s``), which ends it with ``output_unreachable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from byoc.errors import ChannelClosed, ChannelGone, TrickleError
from byoc.spec import EndReason
from byoc.trickle.layout import Role

__all__ = ["FailureBudget", "trickle_failure"]

_ENDED: dict[Role, EndReason] = {"input": EndReason.INPUT_ENDED, "control": EndReason.CONTROL_ENDED}
_GONE: dict[Role, EndReason] = {
    "input": EndReason.INPUT_GONE,
    "control": EndReason.CONTROL_GONE,
    "output": EndReason.OUTPUT_GONE,
    "events": EndReason.OUTPUT_GONE,
    "data": EndReason.OUTPUT_GONE,
}
_ESSENTIAL: frozenset[Role] = frozenset({"input", "control"})


def trickle_failure(channel: Role, error: TrickleError | None) -> EndReason | None:
    """Why the session ends when ``channel`` fails with ``error`` (None: the channel's end of stream);
    None when the session goes on."""
    if error is None:
        return _ENDED.get(channel)
    if isinstance(error, (ChannelGone, ChannelClosed)):
        return _GONE[channel]
    return EndReason.TRICKLE_ERROR if channel in _ESSENTIAL else None


class FailureBudget:
    """How long a channel may fail without one success before the session gives it up.

    The clock starts at the first failure after a success (or the start) and stops at the next success,
    so short outages cost only what they lost, and an output that is gone for good ends the session
    instead of losing every segment for as long as the stream lasts.
    """

    def __init__(
        self, budget_s: float, reason: EndReason, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        self.budget_s = budget_s
        self._reason = reason
        self._clock = clock
        self._failing_since: float | None = None

    def succeeded(self) -> None:
        self._failing_since = None

    def failed(self) -> EndReason | None:
        """Count a failure: the end reason once the channel has failed for longer than the budget."""
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        return self._reason if now - self._failing_since > self.budget_s else None
