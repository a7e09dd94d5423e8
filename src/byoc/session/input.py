"""A session's input: the subscribe channel's segments, read where it costs least and loses nothing.

:class:`InputReader` reads the channel with a :class:`~byoc.trickle.blocking.BlockingSubscriber` in
one of two ways, and moves between them at segment starts:

* **ahead**, on a thread of its own: the bytes go to the decoder (:meth:`Decoder.put
  <byoc.media.decoder.Decoder.put>`) as they arrive, up to ``max_buffered_bytes`` ahead of it. A
  decoder that is busy for a moment (a keyframe, an encode on its thread) never leaves the reader
  behind the server's retention window, where whole segments would be skipped: with segments of a
  few packets each, the five segments a channel keeps are a few milliseconds of media.
* **pulled**, on the decoder's thread (:meth:`Decoder.pull_from
  <byoc.media.decoder.Decoder.pull_from>`): the decoder reads the socket itself when it has decoded
  everything it had. One thread wakes per arrival instead of two, about 0.1 ms of CPU a frame
  (README, "Reading where it costs least").

The reader starts ahead, and lets the decoder pull while segments start at least
:data:`PULL_PERIOD_S` apart and the server has nothing newer than the segment just opened and the one
pre-connected after it: five such segments are over a second of slack. A segment that starts sooner,
or a server that reports newer segments than that, hands the reading back to the thread.

The session hears of each segment's start (its input timeout counts from there) and of the input's end
through the callbacks it gives; they are called on whichever thread is reading.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from byoc.errors import TrickleError
from byoc.media.decoder import Decoder
from byoc.media.stage import Stage
from byoc.trickle.blocking import BlockingSubscriber

__all__ = ["PULL_PERIOD_S", "InputReader", "InputStatistics"]

PULL_PERIOD_S = 0.25
"""Segments that start at least this far apart may be read on the decoder's thread."""


@dataclass(frozen=True, slots=True)
class InputStatistics:
    """How many input segments the reading thread opened (``ahead``) and the decoder's (``pulled``),
    and how often the reading changed hands (``handovers``)."""

    ahead: int
    pulled: int
    handovers: int


class InputReader(Stage):
    """Reads ``subscriber`` into ``decoder`` until the channel ends, fails or :meth:`close` is called.

    ``on_segment(index)``: the ``index``-th input segment (from 0) started arriving; ``on_end(error)``:
    the channel ended (None) or failed, unless the reader was closed first. The decoder's input ends
    with the reader, whatever ends it.
    """

    def __init__(
        self,
        subscriber: BlockingSubscriber,
        decoder: Decoder,
        *,
        name: str = "input",
        nice: int = 0,
        on_segment: Callable[[int], None],
        on_end: Callable[[TrickleError | None], None],
    ) -> None:
        super().__init__(name, nice=nice)
        self.subscriber = subscriber
        self._decoder = decoder
        self._on_segment = on_segment
        self._on_end = on_end
        self._cond = threading.Condition()
        self._pulling = False  # the decoder's thread reads (else this stage's thread)
        self._done = False
        self._in_segment = False
        self._opened: float | None = None  # when the last segment was opened
        self._ahead = self._pulled = self._handovers = 0

    def statistics(self) -> InputStatistics:
        return InputStatistics(self._ahead, self._pulled, self._handovers)

    def close(self) -> None:
        """From any thread: stop reading now (what was read is still decoded, then the decoder's
        input ends)."""
        self.subscriber.close()
        with self._cond:
            self._cond.notify_all()
        self._decoder.end()

    def _run(self) -> None:
        ended = False
        try:
            while self._my_turn():
                while not self._step(wait=True):
                    pass
            ended = True
        finally:
            if not ended:  # an unexpected error: the decoder must not wait for more input
                self._finish_input()

    def _my_turn(self) -> bool:
        """Wait while the decoder's thread reads; False once the input is over (or was closed while
        the decoder read: it ends the input then)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pulling or self._done or self.subscriber.closed)
            return not self._pulling and not self._done

    def _pull(self) -> None:
        """On the decoder's thread: one step of reading, then back to decoding."""
        self._step(wait=False)

    def _step(self, *, wait: bool) -> bool:
        """Open the next segment, or hand the decoder the next bytes of this one, or end it; True
        once this thread is no longer the one that reads (the input is over, or it changed hands)."""
        subscriber, decoder = self.subscriber, self._decoder
        try:
            if self._in_segment:
                if data := subscriber.read():
                    decoder.put(data, wait=wait)
                    return False
                self._in_segment = False
                decoder.end_segment()
                return False
            seq = subscriber.next_segment()
        except TrickleError as exc:
            self._finish(exc)
            return True
        if seq is None:
            self._finish(None)
            return True
        self._in_segment = True
        if self._pulling:
            self._pulled += 1
        else:
            self._ahead += 1
        self._on_segment(self._ahead + self._pulled - 1)
        now, opened = time.monotonic(), self._opened
        self._opened = now
        pull = opened is not None and now - opened >= PULL_PERIOD_S and subscriber.behind == 0
        if pull == self._pulling:
            return False
        self._hand_over(pull)
        return True

    def _hand_over(self, pull: bool) -> None:
        self._handovers += 1
        with self._cond:
            self._pulling = pull
            self._cond.notify_all()
        self._decoder.pull_from(self._pull if pull else None)

    def _finish(self, error: TrickleError | None) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()
        self._finish_input()
        if not self.subscriber.closed:
            self._on_end(error)

    def _finish_input(self) -> None:
        self._decoder.pull_from(None)
        self._decoder.end()
