"""The encoder's output on its way to the event loop (byoc.session.sink.LoopSink)."""

from __future__ import annotations

import asyncio
import threading

from byoc.session.sink import FINISHED, LoopSink, coalesce


async def _turns(n: int = 20) -> None:
    """Let the loop run everything that is ready, n times over (callbacks scheduled from threads too)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_writes_wait_for_a_flush_and_leave_together() -> None:
    sink = LoopSink(asyncio.get_running_loop())
    taking = asyncio.create_task(sink.take())
    await _turns()

    # the encoder's thread: audio packets muxed between two video frames
    def audio() -> None:
        sink.write(0, b"audio-1")
        sink.write(0, b"audio-2")

    def video() -> None:
        sink.write(0, b"video")
        sink.flush()

    writer = threading.Thread(target=audio)
    writer.start()
    writer.join()
    await _turns()
    assert not taking.done()  # nobody was woken for the writes alone
    threading.Thread(target=video).start()
    items = await asyncio.wait_for(taking, 10)
    assert coalesce(items) == [(0, b"audio-1audio-2video")]  # one wake-up, one write to the network


async def test_the_end_of_a_segment_and_the_close_wake_the_loop_without_a_flush() -> None:
    sink = LoopSink(asyncio.get_running_loop())
    sink.write(0, b"tail")
    sink.end(0, 30)
    assert await asyncio.wait_for(sink.take(), 10) == [(0, b"tail"), (0, 30)]
    taking = asyncio.create_task(sink.take())
    await _turns()
    threading.Thread(target=sink.close).start()
    assert await asyncio.wait_for(taking, 10) == [FINISHED]
    waiting = asyncio.create_task(sink.take())
    await _turns()
    sink.flush()  # nothing written: no wake-up, nothing to take
    await _turns()
    assert not waiting.done()
    waiting.cancel()
