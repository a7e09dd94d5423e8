"""Loopback demo of the trickle protocol: ``python -m byoc.dev.trickle_demo``.

Starts a trickle server on loopback, publishes a few segments (each streamed in chunks), subscribes to
them from the live edge, and prints what happened on both sides.
"""

from __future__ import annotations

import asyncio
import sys
import time

from byoc.dev.trickle_server import serve_trickle
from byoc.trickle.client import TrickleClientSettings, create_client_session
from byoc.trickle.protocol import channel_url
from byoc.trickle.publisher import TricklePublisher
from byoc.trickle.subscriber import TrickleSubscriber

__all__ = ["run_demo"]

SEGMENTS = 4
CHUNKS_PER_SEGMENT = 3


async def run_demo(out: object = sys.stdout) -> int:
    def say(text: str) -> None:
        print(f"{time.monotonic() - t0:7.3f}s  {text}", file=out, flush=True)  # type: ignore[call-overload]

    t0 = time.monotonic()
    async with serve_trickle() as running, create_client_session(TrickleClientSettings()) as session:
        running.server.create_channel("demo", "video/MP2T")
        url = channel_url(running.base_url, "demo")
        say(f"trickle server on {running.base_url}, channel {url}")
        first_chunk_seen = asyncio.Event()
        received: list[tuple[int, int]] = []

        async def subscribe() -> None:
            async with TrickleSubscriber(url, session=session) as subscriber:
                async for segment in subscriber:
                    size = 0
                    async for chunk in segment:
                        size += len(chunk)
                        say(f"subscriber  seq {segment.seq}: +{len(chunk)} bytes")
                        first_chunk_seen.set()
                    received.append((segment.seq, size))
                    say(f"subscriber  seq {segment.seq}: complete, {size} bytes")
            say("subscriber  end of stream")

        reader = asyncio.create_task(subscribe())
        publisher = TricklePublisher(url, session=session)
        for n in range(SEGMENTS):
            async with publisher.segment() as segment:
                for c in range(CHUNKS_PER_SEGMENT):
                    await segment.write(bytes([n]) * 1000 * (c + 1))
                    say(f"publisher   seq {segment.seq}: wrote chunk {c + 1}/{CHUNKS_PER_SEGMENT}")
                    if n == 0 and c == 0:
                        await first_chunk_seen.wait()
                        say("publisher   (the subscriber got the first chunk before the segment ended)")
        # Close once the subscriber waits for the next seq: it then sees a clean end of stream.
        await running.server.wait_for_request(lambda r: (r.method, r.seq) == ("GET", str(SEGMENTS)))
        await publisher.close()
        say("publisher   closed the channel (DELETE)")
        await reader
    say(f"done: {len(received)} segments received: {received}")
    return 0 if len(received) == SEGMENTS else 1


def main() -> int:
    return asyncio.run(run_demo())


if __name__ == "__main__":
    sys.exit(main())
