"""The worker pool of ``--isolation process`` (byoc.isolation), driven as a session's processing thread
drives it: real worker processes, real shared memory, no HTTP."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import av
import numpy as np
import pytest

from byoc.errors import error_kind
from byoc.isolation import PoolSettings, RemoteProcessor, WorkerPool
from byoc.processor import Frame, Processor, SessionContext, load_processor

MIB = 1024 * 1024


class Sink:
    def __init__(self) -> None:
        self.data: list[Any] = []
        self.events: list[Mapping[str, Any]] = []

    def send_data(self, message: Any) -> None:
        self.data.append(message)

    def send_event(self, event: Mapping[str, Any]) -> None:
        self.events.append(event)


def context(name: str, width: int = 64, height: int = 48) -> SessionContext:
    return SessionContext(name, width, height, {}, Sink())


def frame(width: int, height: int, fmt: str = "yuv420p", index: int = 0) -> Frame:
    rgb = np.random.default_rng(index).integers(0, 255, (height, width, 3), dtype=np.uint8)
    av_frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=fmt)
    av_frame.pts = 3000 * index
    return Frame(av_frame, index)


def pixels(result: Any) -> np.ndarray:
    if isinstance(result, Frame):
        return result.rgb
    if isinstance(result, av.VideoFrame):
        return result.to_ndarray(format="rgb24")
    assert isinstance(result, np.ndarray)
    return result


@contextmanager
def pool_of(reference: str, options: dict[str, str] | None = None, **kwargs: Any) -> Iterator[WorkerPool]:
    device_bytes = kwargs.pop("device_bytes", lambda pid: 0)
    pool = WorkerPool(PoolSettings(reference, options or {}, **kwargs), device_bytes=device_bytes)
    pool.start()
    try:
        yield pool
    finally:
        pool.close()


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # other processes: polled
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("width", "height", "fmt"), [(64, 48, "yuv420p"), (33, 25, "yuv420p"), (32, 16, "yuv444p")]
)
def test_frames_cross_both_ways_as_the_processor_made_them(width: int, height: int, fmt: str) -> None:
    local = load_processor("invert")
    with pool_of("invert") as pool:
        remote = pool.processor()
        session = context("s1", width, height)
        remote.on_start(session)
        for index in range(3):
            source = frame(width, height, fmt, index)
            expected = pixels(local.process(source, session))
            assert np.array_equal(pixels(remote.process(source, session)), expected)
        remote.on_stop(session)


def test_a_frame_returned_unchanged_comes_back_as_itself_and_what_the_hooks_send_arrives() -> None:
    with pool_of("tests.processors:Talking") as pool:
        remote = pool.processor()
        session = context("talk")
        remote.on_start(session)
        source = frame(64, 48, index=4)
        assert remote.process(source, session) is source  # no pixels crossed back
        remote.on_stop(session)
        assert session.sink.data == [{"frame": 4, "stream": "talk"}]  # type: ignore[attr-defined]
        assert session.sink.events == [{"type": "seen", "frame": 4}]  # type: ignore[attr-defined]


def test_async_hooks_run_in_the_worker() -> None:
    with pool_of("load", {"mode": "async", "ms": "1"}) as pool:
        remote = pool.processor()
        session = context("async")
        remote.on_start(session)
        source = frame(64, 48)
        assert np.array_equal(pixels(remote.process(source, session)), source.rgb)
        remote.on_stop(session)


def test_a_hook_that_raises_raises_here_under_its_own_name_with_the_workers_traceback() -> None:
    with pool_of("tests.processors:Failing") as pool:
        remote = pool.processor()
        session = context("fails")
        remote.on_start(session)
        with pytest.raises(Exception, match="cannot process frame 2") as raised:
            remote.process(frame(64, 48, index=2), session)
        assert type(raised.value).__name__ == "RuntimeError"
        assert error_kind(raised.value) == "process"
        assert any("tests/processors.py" in note for note in raised.value.__notes__)
        remote.on_stop(session)  # the session goes on after a failed frame


def test_sessions_go_to_the_least_busy_worker() -> None:
    with pool_of("passthrough", workers=2) as pool:
        remote: RemoteProcessor = pool.processor()
        sessions = [context(f"s{i}") for i in range(4)]
        for session in sessions:
            remote.on_start(session)
        loads = sorted(w.sessions for w in pool._workers)
        assert loads == [2, 2]
        for session in sessions:
            remote.on_stop(session)
        assert sorted(w.sessions for w in pool._workers) == [0, 0]


def test_a_worker_that_grew_past_the_threshold_is_recycled_once_its_successor_is_ready() -> None:
    grown: dict[int, int] = {}
    with pool_of(
        "passthrough", leak_threshold_bytes=100 * MIB, device_bytes=lambda pid: grown.get(pid, 0)
    ) as pool:
        remote = pool.processor()
        (old,) = pool.pids()
        first = context("first")
        remote.on_start(first)
        remote.process(frame(64, 48), first)
        grown[old] = 300 * MIB  # its device memory did not come back
        remote.on_stop(first)
        eventually(lambda: old not in pool.pids() and pool.ready_workers() == (1, 1))
        second = context("second")
        remote.on_start(second)  # served by the successor
        assert remote.process(frame(64, 48), second) is not None
        remote.on_stop(second)
        assert pool.pids() != [old]


def test_the_session_of_a_worker_that_died_learns_how_and_a_fresh_worker_serves_the_next() -> None:
    with pool_of("passthrough", workers=1) as pool:
        remote = pool.processor()
        session = context("victim")
        remote.on_start(session)
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Exception, match=r"processor worker 1 died: signal 9 \(SIGKILL\)"):
            remote.process(frame(64, 48), session)
        remote.on_stop(session)
        eventually(lambda: pool.ready_workers() == (1, 1) and pid not in pool.pids())
        fresh = context("fresh")
        remote.on_start(fresh)
        assert remote.process(frame(64, 48), fresh) is not None
        remote.on_stop(fresh)


def test_a_picture_larger_than_the_frame_comes_back_whole() -> None:
    with pool_of("tests.processors:Doubling") as pool:
        remote = pool.processor()
        session = context("big")
        remote.on_start(session)
        source = frame(64, 48)
        result = pixels(remote.process(source, session))
        assert result.shape == (96, 128, 3)
        assert np.array_equal(result[::2, ::2], source.rgb)
        remote.on_stop(session)


def test_audio_goes_to_the_worker_only_for_a_processor_of_audio() -> None:
    samples = np.linspace(-0.5, 0.5, 960, dtype=np.float32).reshape(1, -1).repeat(2, axis=0)
    source = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
    source.sample_rate, source.pts = 48000, 960
    with pool_of("passthrough") as pool:
        assert type(pool.processor()).process_audio is Processor.process_audio  # audio never crosses
    with pool_of("tests.processors:Quieter") as pool:
        remote = pool.processor()
        session = context("audio")
        remote.on_start(session)
        result = remote.process_audio(source, session)
        assert isinstance(result, av.AudioFrame)
        assert (result.sample_rate, result.pts, result.layout.name) == (48000, 960, "stereo")
        assert np.allclose(result.to_ndarray(), samples / 2)
        remote.on_stop(session)
