"""The trickle protocol without I/O: names, URLs, response classification, retry decisions.

Everything here is pure so that the hard cases (470, 404, closed, reset, retry) are table-driven unit
tests. Time is passed in as ``now`` where it matters. The semantics follow go-livepeer's trickle server
(``trickle/trickle_server.go``); see docs/protocol.md §4 of the project documentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from byoc.errors import ChannelClosed, ChannelGone, TrickleError

__all__ = [
    "CLOSED_HEADER",
    "CLOSED_VALUE",
    "FIRST_BYTE_KEEPALIVE_S",
    "LATEST_HEADER",
    "MAX_DATA_LINE_BYTES",
    "RESET_HEADER",
    "RETENTION",
    "SEQ_CURRENT",
    "SEQ_HEADER",
    "SEQ_NEXT",
    "STATUS_SEQ_MISSING",
    "Accepted",
    "ChannelEnded",
    "Fatal",
    "GetOutcome",
    "Gone",
    "JumpToLatest",
    "PostOutcome",
    "Retry",
    "RetryPolicy",
    "RetryState",
    "SegmentReady",
    "channel_url",
    "classify_get",
    "classify_post",
    "deleted_after_last",
    "is_closed",
    "next_url",
    "parse_int_header",
    "post_failure",
    "segment_url",
    "terminal_get_error",
    "terminal_post_error",
]

SEQ_HEADER = "Lp-Trickle-Seq"
LATEST_HEADER = "Lp-Trickle-Latest"
CLOSED_HEADER = "Lp-Trickle-Closed"
RESET_HEADER = "Lp-Trickle-Reset"
CLOSED_VALUE = "terminated"

STATUS_SEQ_MISSING = 470
"""Non-standard status: the channel exists but the requested seq is neither stored nor next."""

SEQ_NEXT = -1
"""Subscribe/publish at the next segment to be written (``nextWrite``)."""
SEQ_CURRENT = -2
"""Subscribe at the segment being written (or last written), from its first byte."""

RETENTION = 5
"""Segments a channel keeps; older seqs answer 470."""

FIRST_BYTE_KEEPALIVE_S = 10.0
"""The server sends an interim ``100 Continue`` this often while a POST has sent no body byte."""

MAX_DATA_LINE_BYTES = 64 * 1024
"""go-livepeer reads data channels with a bufio.Scanner: a line must stay below this size."""


def channel_url(base_url: str, name: str) -> str:
    """URL of channel ``name`` under a trickle base such as ``http://host:8935/ai/trickle/``."""
    return base_url.rstrip("/") + "/" + name


def segment_url(channel: str, seq: int) -> str:
    """URL of one segment of a channel."""
    return f"{channel.rstrip('/')}/{seq}"


def next_url(channel: str) -> str:
    """URL that answers the channel's next write position."""
    return channel.rstrip("/") + "/next"


def parse_int_header(headers: Mapping[str, str], name: str) -> int | None:
    """The integer value of a header, or None when it is absent or not an integer."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def is_closed(headers: Mapping[str, str]) -> bool:
    """True when the server says the whole channel is closed (end of stream)."""
    return bool(headers.get(CLOSED_HEADER))


# --- GET classification -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentReady:
    """200: a segment body follows (possibly empty). Continue with ``seq + 1``."""

    seq: int
    latest: int | None


@dataclass(frozen=True, slots=True)
class JumpToLatest:
    """470: the seq is gone or too far ahead; continue at the live edge ``latest``."""

    latest: int


@dataclass(frozen=True, slots=True)
class ChannelEnded:
    """``Lp-Trickle-Closed``: the channel was closed; a clean end of stream."""


@dataclass(frozen=True, slots=True)
class Gone:
    """404: the channel does not exist. Terminal; never retry."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure (5xx, 408, 429, malformed 470): try the same request again."""

    reason: str


@dataclass(frozen=True, slots=True)
class Fatal:
    """A status that retrying cannot fix (e.g. 400 ``Invalid idx``)."""

    reason: str


GetOutcome = SegmentReady | JumpToLatest | ChannelEnded | Gone | Retry | Fatal


def _transient(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def classify_get(status: int, headers: Mapping[str, str], requested_seq: int) -> GetOutcome:
    """Classify the response to ``GET <channel>/<seq>``.

    ``Lp-Trickle-Closed`` is checked before the status and the body: a closed channel answers 200 with
    the body ``Entry not found``, which must never be taken for segment data.
    """
    if status == 404:
        return Gone()
    if is_closed(headers):
        return ChannelEnded()
    if status == STATUS_SEQ_MISSING:
        latest = parse_int_header(headers, LATEST_HEADER)
        if latest is None or latest < 0:
            return Retry("470 without a usable Lp-Trickle-Latest")
        return JumpToLatest(latest)
    if status == 200:
        seq = parse_int_header(headers, SEQ_HEADER)
        if seq is None or seq < 0:
            if requested_seq < 0:
                return Retry("200 without Lp-Trickle-Seq for a relative seq")
            seq = requested_seq
        return SegmentReady(seq, parse_int_header(headers, LATEST_HEADER))
    if _transient(status):
        return Retry(f"HTTP {status}")
    return Fatal(f"HTTP {status}")


def terminal_get_error(outcome: GetOutcome, url: str) -> None:
    """Raise what ends a subscriber's channel for good: ChannelGone (404), or TrickleError for a status
    that retrying cannot fix; return for the others (the end of the stream among them)."""
    if isinstance(outcome, Gone):
        raise ChannelGone("trickle channel not found", url=url)
    if isinstance(outcome, Fatal):
        raise TrickleError(f"trickle GET failed: {outcome.reason}", url=url)


def deleted_after_last(outcome: GetOutcome, previous_whole: bool) -> GetOutcome:
    """A 404 for the seq after a segment that arrived whole is the end of the stream, not a lost channel:
    the publisher deleted the channel after its last segment, before this GET reached the server (a GET
    already waiting there is answered ``Lp-Trickle-Closed``). Which of the two a reader sees depends
    only on how fast it asked for the next seq, so both end the stream the same way."""
    if isinstance(outcome, Gone) and previous_whole:
        return ChannelEnded()
    return outcome


# --- POST classification ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """200: the segment was stored under ``seq``."""

    seq: int | None


PostOutcome = Accepted | ChannelEnded | Gone | Retry | Fatal


def classify_post(status: int, headers: Mapping[str, str]) -> PostOutcome:
    """Classify the response to ``POST <channel>/<seq>``."""
    if status == 404:
        return Gone()
    if is_closed(headers):
        return ChannelEnded()
    if status == 200:
        return Accepted(parse_int_header(headers, SEQ_HEADER))
    if _transient(status):
        return Retry(f"HTTP {status}")
    return Fatal(f"HTTP {status}")


def terminal_post_error(outcome: PostOutcome, url: str) -> None:
    """Raise what ends a publisher's channel: ChannelGone (404), ChannelClosed, or TrickleError for a
    status that retrying cannot fix; return for Accepted and Retry."""
    if isinstance(outcome, Gone):
        raise ChannelGone("trickle channel not found", url=url)
    if isinstance(outcome, ChannelEnded):
        raise ChannelClosed("trickle channel closed", url=url)
    if isinstance(outcome, Fatal):
        raise TrickleError(f"trickle POST failed: {outcome.reason}", url=url)


def post_failure(status: int | None, sent: int, outcome: PostOutcome) -> str:
    """What happened to a POST, truthfully: a refusal names its status and claims nothing about the
    body (the server may answer before reading it); a broken upload says how much was written."""
    if status is not None:
        return f"refused with HTTP {status}"
    reason = outcome.reason if isinstance(outcome, Retry) else str(outcome)
    if sent == 0:
        return f"failed before a byte was written ({reason})"
    return f"broke off after {sent} bytes were written ({reason})"


# --- retries ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryState:
    """Consecutive failures of one request, and when the first of them happened."""

    failures: int = 0
    first_failure_at: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff.

    ``after_failure`` returns the new state and the delay before the next attempt, or None when the
    budget (``max_retries`` consecutive failures, or ``max_elapsed_s`` since the first one) is spent.
    """

    max_retries: int = 5
    initial_delay_s: float = 0.25
    max_delay_s: float = 2.0
    multiplier: float = 2.0
    max_elapsed_s: float = 30.0

    def after_failure(self, state: RetryState, now: float) -> tuple[RetryState, float | None]:
        first = now if state.first_failure_at is None else state.first_failure_at
        new = RetryState(state.failures + 1, first)
        if new.failures > self.max_retries or now - first > self.max_elapsed_s:
            return new, None
        delay = self.initial_delay_s * self.multiplier ** (new.failures - 1)
        return new, min(delay, self.max_delay_s)
