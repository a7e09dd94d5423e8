"""The one policy a session applies to trickle failures, whichever of its channels they happen on.

* The end of the input or control channel ends the session: ``input_ended`` / ``control_ended``.
* A 404 or a closed channel (ChannelGone, ChannelClosed) ends it: ``input_gone``, ``control_gone``, or
  ``output_gone`` for any channel it publishes (output, events, data). The gateway ended the stream,
  so this is not counted as an error.
* Any other TrickleError (retries exhausted, a protocol error) is counted as a ``trickle`` error. On
  the input, control or output channel it ends the session with ``trickle_error``; on the events or
  data channel only that event or batch is lost and the session goes on.
"""

from __future__ import annotations

from byoc.errors import ChannelClosed, ChannelGone, TrickleError
from byoc.spec import EndReason
from byoc.trickle.layout import Role

__all__ = ["trickle_failure"]

_ENDED: dict[Role, EndReason] = {"input": EndReason.INPUT_ENDED, "control": EndReason.CONTROL_ENDED}
_GONE: dict[Role, EndReason] = {
    "input": EndReason.INPUT_GONE,
    "control": EndReason.CONTROL_GONE,
    "output": EndReason.OUTPUT_GONE,
    "events": EndReason.OUTPUT_GONE,
    "data": EndReason.OUTPUT_GONE,
}
_ESSENTIAL: frozenset[Role] = frozenset({"input", "control", "output"})


def trickle_failure(channel: Role, error: TrickleError | None) -> EndReason | None:
    """Why the session ends when ``channel`` fails with ``error`` (None: the channel's end of stream);
    None when the session goes on."""
    if error is None:
        return _ENDED.get(channel)
    if isinstance(error, (ChannelGone, ChannelClosed)):
        return _GONE[channel]
    return EndReason.TRICKLE_ERROR if channel in _ESSENTIAL else None
