"""An ended session is freed by reference counting alone: its stages' codec contexts, frames and threads
go with it at once, not whenever the cyclic garbage collector happens to run."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import weakref
from collections.abc import Iterator

import aiohttp
import pytest

from byoc.builtin.passthrough import PassthroughProcessor
from byoc.dev.trickle_server import RunningTrickle
from byoc.media.decoder import Decoder
from byoc.media.encoder import Encoder
from byoc.processor import Processor
from byoc.session import Session
from byoc.session.worker import ProcessingWorker
from byoc.spec import EndReason, SessionSettings
from tests.conftest import TEST_CLIENT_SETTINGS
from tests.processors import Failing, Recording
from tests.support import StreamHarness, make_segments

SETTINGS = SessionSettings(
    trickle=TEST_CLIENT_SETTINGS, status_interval_s=0.3, drain_timeout_s=3.0, max_consecutive_errors=2
)
CASES = {
    "input_eos": EndReason.INPUT_ENDED,
    "stop": EndReason.STOPPED,
    "processor_error": EndReason.PROCESSOR_ERROR,
    "output_404": EndReason.OUTPUT_GONE,
}


@pytest.fixture(scope="module")
def segments() -> list[list[bytes]]:
    return make_segments(2, frames=15, audio="aac")


@contextlib.contextmanager
def no_cyclic_collection() -> Iterator[None]:
    """Only reference counting frees objects meanwhile (what was enabled before is restored)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def owned(session: Session) -> dict[str, weakref.ref[object]]:
    """Weak references to the session, its context and the stages it owns."""
    refs: dict[str, weakref.ref[object]] = {
        "Session": weakref.ref(session),
        "SessionContext": weakref.ref(session.context),
    }
    for value in vars(session).values():
        if isinstance(value, (Decoder, Encoder, ProcessingWorker)):
            refs[type(value).__name__] = weakref.ref(value)
    return refs


def threads_of(stream_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith(f"-{stream_id}")]


async def run_to_the_end(
    h: StreamHarness, http: aiohttp.ClientSession, case: str, segments: list[list[bytes]]
) -> tuple[EndReason, dict[str, weakref.ref[object]]]:
    """One session through ``case`` to its end; only weak references to it are left afterwards."""
    processor: Processor = {"processor_error": Failing(), "input_eos": Recording()}.get(
        case, PassthroughProcessor()
    )
    overrides = {"output_404": {"publish_url": h.url("output") + "-missing"}}.get(case, {})
    session = Session(h.spec(**overrides), processor, http, SETTINGS)
    refs = owned(session)
    run = asyncio.create_task(session.run())
    feeding = asyncio.create_task(h.publish(segments))
    if case == "stop":
        output = h.channels.name("output")
        await h.server.wait_for_request(lambda r: r.method == "POST" and r.channel == output)
        session.stop()
    elif case == "input_eos":
        await session.wait_started()
        session.update_params({"drop_every": 4})
        await h.control.write_segment(b'{"drop_every": 3}')
        await feeding
        await h.input.close()
    reason = await asyncio.wait_for(run, 15)
    feeding.cancel()
    await asyncio.gather(feeding, return_exceptions=True)
    h.server.close_channel(h.channels.name("output"))  # (when the session published elsewhere)
    await h.readers_done()
    return reason, refs


@pytest.mark.parametrize("case", list(CASES))
async def test_an_ended_session_is_freed_without_the_garbage_collector(
    trickle: RunningTrickle,
    http: aiohttp.ClientSession,
    segments: list[list[bytes]],
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    # pytest keeps every log record, and the record of a failure keeps its traceback, whose frames
    # hold the stage that logged it: without byoc's records only the session's own references count.
    caplog.set_level(logging.CRITICAL + 1, logger="byoc")
    with no_cyclic_collection():
        async with StreamHarness(trickle, http, f"release-{case}", data=True) as h:
            reason, refs = await run_to_the_end(h, http, case, segments)
        assert reason == CASES[case]
        assert {"Session", "SessionContext", "Decoder", "Encoder", "ProcessingWorker"} <= set(refs)
        for thread in threads_of(h.name):  # a stage thread may still be on its way out
            await asyncio.to_thread(thread.join, 10)
        assert [thread.name for thread in threads_of(h.name)] == []
        await asyncio.sleep(0)  # the loop's callbacks for the ended session have run
        alive = [name for name, ref in refs.items() if ref() is not None]
        assert alive == [], f"{case}: still alive after the end, held by a reference cycle: {alive}"
