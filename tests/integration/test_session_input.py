"""A session's input reader (byoc.session.input) with a real decoder, reading ffmpeg-made media from
the byoc trickle server over loopback: where it reads (its own thread, or the decoder's) follows how
far apart the segments start, and no frame is lost either way or when it changes hands."""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import threading
from collections.abc import Awaitable, Callable

import aiohttp
import av

from byoc.dev.synthetic import publish_live
from byoc.dev.trickle_server import RunningTrickle
from byoc.errors import TrickleError
from byoc.media.decoder import Decoder
from byoc.media.items import Item, VideoItem
from byoc.media.queues import Closed, StageQueue
from byoc.session.input import PULL_PERIOD_S, InputReader, InputStatistics
from byoc.trickle.blocking import BlockingSubscriber
from byoc.trickle.protocol import channel_url
from byoc.trickle.publisher import TricklePublisher
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.corpus import segments

TS_PACKET = 188
LONG_S = 2 * PULL_PERIOD_S  # segments this far apart may be read on the decoder's thread
SHORT_S = PULL_PERIOD_S / 6


@functools.cache
def _media() -> tuple[bytes, int]:
    """3 s of ffmpeg-made H.264 + AAC, and how many video frames FFmpeg decodes from it."""
    data = b"".join(segments("h264-aac"))
    with av.open(io.BytesIO(data), mode="r") as container:
        return data, len(list(container.decode(video=0)))


def _cut(data: bytes, pieces: int) -> list[bytes]:
    """``data`` in ``pieces`` parts of whole TS packets."""
    packets = len(data) // TS_PACKET
    bounds = [packets * n // pieces * TS_PACKET for n in range(pieces + 1)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class _Run:
    """An input reader feeding a decoder from one channel; the decoder's frames go to a queue."""

    def __init__(self, trickle: RunningTrickle, name: str = "input") -> None:
        trickle.server.create_channel(name, "video/MP2T")
        self.url = channel_url(trickle.base_url, name)
        self.queue: StageQueue[Item] = StageQueue(capacity=10_000, budget_s=1000.0)
        self.decoder = Decoder(self.queue, width=256, height=256)
        self.subscriber = BlockingSubscriber(self.url, settings=TEST_CLIENT_SETTINGS, start_seq=0)
        self.ends: list[TrickleError | None] = []
        self.opened: list[int] = []
        self.third_opened = threading.Event()
        self.reader = InputReader(
            self.subscriber, self.decoder, on_segment=self._opened, on_end=self.ends.append
        )

    def _opened(self, index: int) -> None:
        self.opened.append(index)
        if index == 2:
            self.third_opened.set()

    def start(self) -> None:
        self.decoder.start()
        self.reader.start()

    async def ended(self) -> InputStatistics:
        assert await asyncio.to_thread(self.decoder.join, 30)
        assert await asyncio.to_thread(self.reader.join, 30)
        assert self.decoder.error is None
        return self.reader.statistics()

    def frames(self) -> int:
        """The video frames the decoder put out (once it has ended)."""
        count = 0
        while True:
            try:
                item = self.queue.get_nowait()
            except Closed:
                return count
            count += isinstance(item, VideoItem)


async def _publish(
    run: _Run, http: aiohttp.ClientSession, *parts: tuple[list[bytes], float]
) -> Callable[[], Awaitable[None]]:
    """Publish each part's segments ``seconds`` apart (each segment's bytes spread over that time)."""
    publisher = TricklePublisher(run.url, session=http, settings=TEST_CLIENT_SETTINGS)
    for pieces, seconds in parts:
        await publish_live(publisher, ([p] for p in pieces), delivery="spread", segment_s=seconds)
    return publisher.close


async def test_segments_far_apart_are_read_on_the_decoders_thread(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    media, frames = _media()
    run = _Run(trickle)
    run.start()
    close = await _publish(run, http, (_cut(media, 4), LONG_S))
    await close()
    statistics = await run.ended()
    # The first segment is read ahead (nothing says yet how far apart they come); the decoder takes
    # over from a later one on.
    assert statistics.ahead >= 1
    assert statistics.pulled >= 1
    assert statistics.ahead + statistics.pulled == 4
    assert run.opened == [0, 1, 2, 3]
    assert run.frames() == frames
    assert run.ends == [None]
    assert run.subscriber.statistics().jumps == 0


async def test_segments_that_come_sooner_are_read_ahead_again_and_none_is_lost(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    media, frames = _media()
    third = len(media) // 3 // TS_PACKET * TS_PACKET
    run = _Run(trickle)
    run.start()
    close = await _publish(run, http, (_cut(media[:third], 3), LONG_S), (_cut(media[third:], 24), SHORT_S))
    await close()
    statistics = await run.ended()
    assert statistics.pulled >= 1
    assert statistics.handovers >= 2  # to the decoder, and back once the segments came sooner
    assert statistics.ahead + statistics.pulled == 27
    assert run.frames() == frames
    assert run.ends == [None]
    assert run.subscriber.statistics().jumps == 0


async def test_closing_while_the_decoder_reads_ends_both_threads(
    trickle: RunningTrickle, http: aiohttp.ClientSession
) -> None:
    media, frames = _media()
    run = _Run(trickle)
    run.start()
    publishing = asyncio.create_task(_publish(run, http, (_cut(media, 6), LONG_S)))
    assert await asyncio.to_thread(run.third_opened.wait, 30)
    run.reader.close()
    statistics = await run.ended()
    assert statistics.pulled >= 1
    assert run.ends == []  # closed: not an end of the input to report
    assert 0 < run.frames() < frames
    close = await publishing
    await close()
