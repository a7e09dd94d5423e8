"""A session's output: the encoder's segments, from its loop sink to the output channel, each one
published or counted as lost.

:class:`OutputPump` runs on the session's loop until the encoder has finished. A segment the gateway
cannot have received whole is an ``output`` error, counted by reason (``refused``: the server answered
the POST with an error; ``unreachable``: the connection failed, no answer came, or the output was over
before the segment was sent). Losses count against the output's failure budget; once it is spent, or
the channel is gone, the output is over and the encoder's remaining segments are counted, not sent.
The session learns what it must do through the callbacks it gives (bound weakly, so that the pump
does not keep an ended session alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from byoc.errors import ChannelClosed, ChannelGone, RetriesExhausted, TrickleError
from byoc.session.policy import FailureBudget
from byoc.session.sink import FINISHED, LoopSink, coalesce
from byoc.session.stats import OutputLosses
from byoc.spec import EndReason
from byoc.trickle.publisher import PublishSegment, TricklePublisher

__all__ = ["OutputPump"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class OutputPump:
    """Publishes what the encoder writes to ``sink``; see the module docstring.

    ``on_error(kind, message)`` counts an error; ``on_gone(error)`` is told that the output channel is
    gone or closed (the session ends); ``on_given_up(reason)`` that the failure budget is spent (the
    session ends with ``reason``); ``on_first_segment()`` that the first segment with video went out.
    """

    def __init__(
        self,
        stream_id: str,
        sink: LoopSink,
        budget: FailureBudget,
        *,
        on_error: Callable[[str, str], None],
        on_gone: Callable[[TrickleError], None],
        on_given_up: Callable[[EndReason], None],
        on_first_segment: Callable[[], None],
    ) -> None:
        self._stream_id = stream_id
        self._sink = sink
        self._budget = budget
        self._on_error = on_error
        self._on_gone = on_gone
        self._on_given_up = on_given_up
        self._on_first_segment = on_first_segment
        self._step: asyncio.Timeout | None = None  # the publishing step in progress
        self._cut_off = False  # past the drain deadline: no more output is sent
        self._lock = threading.Lock()  # the losses are read from any thread
        self._lost_segments: Counter[str] = Counter()
        self._lost_frames: Counter[str] = Counter()

    def losses(self) -> OutputLosses:
        with self._lock:
            return OutputLosses(dict(self._lost_segments), dict(self._lost_frames))

    def cut(self) -> None:
        """The drain deadline: the step in progress ends now, and nothing more is sent."""
        self._cut_off = True
        if self._step is not None:
            self._step.reschedule(asyncio.get_running_loop().time())

    async def run(self, output: TricklePublisher) -> None:
        """Publish the encoder's segments as their bytes arrive, until the encoder has finished."""
        segment: PublishSegment | None = None
        lost: str | None = None  # why the encoder's current segment is not (all) being published
        over = False
        first = True
        while True:
            for item in coalesce(await self._sink.take()):
                if item is FINISHED:
                    if segment is not None:
                        with contextlib.suppress(TrickleError, TimeoutError):
                            await self._publishing(segment.abort())
                    return
                assert isinstance(item, tuple)
                data = item[1]
                if isinstance(data, bytes):  # more of the encoder's current segment
                    if lost is None and not over:
                        try:
                            if segment is None:
                                segment = output.segment()
                                await self._publishing(segment.open())
                            await self._publishing(segment.write(data))
                        except (TrickleError, TimeoutError) as exc:
                            lost, over = self._failed(exc)
                            segment = None
                    continue
                # The end of the encoder's current segment, which holds `data` video frames.
                if segment is not None and lost is None and not over:
                    try:
                        lost = await self._publishing(segment.finish())
                    except (TrickleError, TimeoutError) as exc:
                        lost, over = self._failed(exc)
                segment = None
                if over or lost is not None:
                    over = self._lost(lost or "unreachable", data, counted_against_budget=not over)
                elif data:
                    self._budget.succeeded()
                    if first:
                        first = False
                        self._on_first_segment()
                lost = None

    async def _publishing(self, step: Coroutine[Any, Any, _T]) -> _T:
        """One step of publishing, cut short with TimeoutError at the drain deadline."""
        if self._cut_off:
            step.close()
            raise TimeoutError("the output was cut off at the drain deadline")
        try:
            async with asyncio.timeout(None) as self._step:
                return await step
        finally:
            self._step = None

    def _failed(self, error: TrickleError | TimeoutError) -> tuple[str, bool]:
        """Why the current segment is lost, and whether the output is over."""
        if self._cut_off:
            return "unreachable", True
        if isinstance(error, (ChannelGone, ChannelClosed)):
            self._on_gone(error)  # ends the session
            return "unreachable", True
        log.warning("stream %s: output segment lost: %s", self._stream_id, error)
        return ("unreachable" if isinstance(error, RetriesExhausted) else "refused"), False

    def _lost(self, reason: str, frames: int, *, counted_against_budget: bool) -> bool:
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
