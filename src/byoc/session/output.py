"""A session's output: the encoder's segments published to the output channel from the encoder's own
thread, each one published or counted as lost.

:class:`OutputPump` is the encoder's :class:`~byoc.media.encoder.OutputSink`: what the muxer writes
goes out on the channel's current POST when the encoder flushes (after each video frame, and before it
waits), through a :class:`~byoc.trickle.blocking.BlockingPublisher`, with no event loop in between.
A segment the gateway cannot have received whole is an ``output`` error, counted by reason
(``refused``: the server answered the POST with an error; ``unreachable``: the connection failed, no
answer came, or the output was over before the segment was sent). Losses count against the output's
failure budget; once it is spent, or the channel is gone, the output is over and the encoder's remaining
segments are counted, not sent. The session learns what it must do through the callbacks it gives;
they are called on the encoder's thread (the session moves them to its loop).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from byoc.errors import ChannelClosed, ChannelGone, RetriesExhausted, TrickleError
from byoc.session.policy import FailureBudget
from byoc.session.stats import OutputLosses
from byoc.spec import EndReason
from byoc.trickle.blocking import BlockingPublisher

__all__ = ["OutputPump"]

log = logging.getLogger(__name__)


class OutputPump:
    """Publishes what the encoder writes; see the module docstring.

    ``on_error(kind, message)`` counts an error; ``on_gone(error)`` is told that the output channel is
    gone or closed (the session ends); ``on_given_up(reason)`` that the failure budget is spent (the
    session ends with ``reason``); ``on_first_segment()`` that the first segment with video went out;
    ``on_finished()`` that the encoder has finished (nothing more will be published).
    """

    def __init__(
        self,
        stream_id: str,
        publisher: BlockingPublisher,
        budget: FailureBudget,
        *,
        on_error: Callable[[str, str], None],
        on_gone: Callable[[TrickleError], None],
        on_given_up: Callable[[EndReason], None],
        on_first_segment: Callable[[], None],
        on_finished: Callable[[], None],
    ) -> None:
        self._stream_id = stream_id
        self._publisher = publisher
        self._budget = budget
        self._on_error = on_error
        self._on_gone = on_gone
        self._on_given_up = on_given_up
        self._on_first_segment = on_first_segment
        self._on_finished = on_finished
        self._pending: list[bytes] = []  # written since the last flush
        self._open = False  # a segment's POST is open on the publisher
        self._lost: str | None = None  # why the encoder's current segment is not (all) being published
        self._over = False  # the output is over: nothing more is sent
        self._first = True
        self._cut_off = False  # past the drain deadline: no more output is sent
        self._lock = threading.Lock()  # the losses are read from any thread
        self._lost_segments: Counter[str] = Counter()
        self._lost_frames: Counter[str] = Counter()

    def losses(self) -> OutputLosses:
        with self._lock:
            return OutputLosses(dict(self._lost_segments), dict(self._lost_frames))

    def cut(self) -> None:
        """The drain deadline (from any thread): what is being sent ends now, and nothing more is."""
        self._cut_off = True
        self._publisher.cut()

    # --- OutputSink: called on the encoder's thread ---------------------------------------------

    def write(self, segment: int, data: bytes) -> None:
        if self._lost is None and not self._over:
            self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        try:
            if not self._open:
                self._publisher.open()
                self._open = True
            self._publisher.write(data)
        except TrickleError as exc:
            self._open = False
            self._lost, self._over = self._failed(exc)

    def end(self, segment: int, frames: int) -> None:
        """The end of the encoder's current segment, which holds ``frames`` video frames."""
        self.flush()
        lost = self._lost
        if self._open and lost is None and not self._over:
            try:
                lost = self._publisher.finish()
            except TrickleError as exc:
                lost, self._over = self._failed(exc)
        self._open = False
        if self._over or lost is not None:
            budgeted = not self._over
            self._over = self._count_lost(lost or "unreachable", frames, counted_against_budget=budgeted)
        elif frames:
            self._budget.succeeded()
            if self._first:
                self._first = False
                self._on_first_segment()
        self._lost = None

    def close(self) -> None:
        self._pending.clear()
        if self._open:
            self._open = False
            self._publisher.abort()
        self._on_finished()

    # --- internals ------------------------------------------------------------------------------

    def _failed(self, error: TrickleError) -> tuple[str, bool]:
        """Why the current segment is lost, and whether the output is over."""
        if self._cut_off:
            return "unreachable", True
        if isinstance(error, (ChannelGone, ChannelClosed)):
            self._on_gone(error)  # ends the session
            return "unreachable", True
        log.warning("stream %s: output segment lost: %s", self._stream_id, error)
        return ("unreachable" if isinstance(error, RetriesExhausted) else "refused"), False

    def _count_lost(self, reason: str, frames: int, *, counted_against_budget: bool) -> bool:
        """Count a segment the gateway cannot have received whole (an ``output`` error); returns whether
        the output is over: its failure budget is spent, which ends the session."""
        with self._lock:
            self._lost_segments[reason] += 1
            self._lost_frames[reason] += frames
        self._on_error("output", f"output segment lost ({reason}): {frames} video frames")
        if not counted_against_budget:
            return True
        end = self._budget.failed()
        if end is None:
            return False
        log.error(
            "stream %s: the output lost every segment for over %.1fs; giving it up",
            self._stream_id,
            self._budget.budget_s,
        )
        self._on_given_up(end)
        return True
