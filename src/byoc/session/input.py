"""A session's input: the subscribe channel's segments, read on a thread of their own.

:class:`InputReader` reads the channel with a :class:`~byoc.trickle.blocking.BlockingSubscriber` and
hands the bytes to the decoder (:meth:`~byoc.media.decoder.Decoder.put`), which waits while the decoder
is a whole segment or more behind: no event loop stands between the network and the demuxer. The reader
runs ahead of the decoder by up to that much, so a decoder that is slow for a moment (a keyframe, an
encode on its thread) never leaves the reader behind the server's retention window, where whole
segments would be skipped: with segments of a few packets each, the five segments a channel keeps are
a few milliseconds of media. (Reading on the decoder's own thread costs about 0.1 ms a frame less and
loses segments exactly that way; README, "Media I/O off the event loop".)

The session hears of each segment's start (its input timeout counts from there) and of the input's end
through the callbacks it gives; they are called on the reader's thread.
"""

from __future__ import annotations

from collections.abc import Callable

from byoc.errors import TrickleError
from byoc.media.decoder import Decoder
from byoc.media.stage import Stage
from byoc.trickle.blocking import BlockingSubscriber

__all__ = ["InputReader"]


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

    def close(self) -> None:
        """From any thread: stop reading now (what was read is still decoded)."""
        self.subscriber.close()

    def _run(self) -> None:
        decoder, subscriber = self._decoder, self.subscriber
        error: TrickleError | None = None
        try:
            index = 0
            while subscriber.next_segment() is not None:
                self._on_segment(index)
                index += 1
                while data := subscriber.read():
                    decoder.put(data)
                decoder.end_segment()
        except TrickleError as exc:
            error = exc
        finally:
            decoder.end()
        if not subscriber.closed:
            self._on_end(error)
