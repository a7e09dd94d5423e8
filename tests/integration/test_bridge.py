"""The MPEG-TS bridge: re-segments a byte stream at keyframes without re-encoding."""

from __future__ import annotations

import asyncio
import contextlib
import io

import aiohttp

from byoc.dev.publish import TsSegmenter, publish_ts
from byoc.dev.trickle_server import RunningTrickle
from byoc.errors import ChannelGone
from byoc.trickle.protocol import channel_url
from byoc.trickle.subscriber import TrickleSubscriber
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.support import PSI_PIDS, decode, first_ts_pid, first_video_is_keyframe, make_segments


def _stream(audio: str | None = None) -> bytes:
    return b"".join(b"".join(segment) for segment in make_segments(3, frames=10, audio=audio))


def test_segmenter_cuts_at_every_keyframe_in_any_chunking() -> None:
    data = _stream(audio="aac")
    for size in (188, 1000, 65536):
        segmenter = TsSegmenter()
        segments: list[bytes] = []
        for offset in range(0, len(data), size):
            for start, piece in segmenter.feed(data[offset : offset + size]):
                if start:
                    segments.append(b"")
                segments[-1] += piece
        assert segmenter.video_pid == 0x100
        assert len(segments) == 3, size
        assert b"".join(segments) == data  # nothing lost, nothing reordered
        for segment in segments:
            assert first_ts_pid(segment) in PSI_PIDS
            assert first_video_is_keyframe(segment)


async def test_publish_ts_feeds_a_channel(trickle: RunningTrickle, http: aiohttp.ClientSession) -> None:
    trickle.server.create_channel("input")
    url = channel_url(trickle.base_url, "input")
    received: list[bytes] = []

    async def read() -> None:
        async with TrickleSubscriber(url, session=http, start_seq=0, settings=TEST_CLIENT_SETTINGS) as sub:
            with contextlib.suppress(ChannelGone):  # the bridge DELETEs the channel when it is done
                async for segment in sub:
                    received.append(await segment.read())

    reader = asyncio.create_task(read())
    await trickle.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", "0"))
    assert await publish_ts(io.BytesIO(_stream()), url, TEST_CLIENT_SETTINGS) == 3
    await asyncio.wait_for(reader, 10)
    posts = [
        r for r in trickle.server.requests if r.method == "POST" and r.channel == "input" and r.body_bytes
    ]
    assert [r.seq for r in posts] == ["0", "1", "2"]
    # The bridge ran faster than real time and DELETEd the channel at the end: a reader that was not
    # waiting yet may miss the last segment, but what it got is whole and in order.
    assert len(received) >= 2
    frames, _ = decode(b"".join(received))
    assert [f.index for f in frames] == list(range(10 * len(received)))
