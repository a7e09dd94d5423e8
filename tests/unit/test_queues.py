"""The hand-off between media stages: lateness in stream time; bursts held, stale frames give way."""

from __future__ import annotations

import threading
import time

import pytest

from byoc.media.queues import Closed, StageQueue, StreamClock

FPS = 30


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def due(frame: int) -> float:
    """Frame ``frame`` of a 30 fps stream whose frame 0 is due at 0."""
    return frame / FPS


def queue_of_frames(clock: Clock, **kwargs: object) -> StageQueue[int]:
    """Frames are ints; frame n is due at n / 30 s."""
    return StageQueue(clock=clock, due_of=due, **kwargs)  # type: ignore[arg-type]


def test_a_burst_of_early_frames_is_held_and_a_consumer_that_keeps_up_loses_nothing() -> None:
    clock = Clock()
    queue = queue_of_frames(clock, capacity=64, budget_s=0.5)
    taken = []
    for segment in range(3):  # each 1 s segment arrives whole when its first frame is due
        clock.now = float(segment)
        for frame in range(segment * FPS, (segment + 1) * FPS):
            queue.put(frame, block=False)
        for _ in range(FPS):
            taken.append(queue.get())
            clock.now += 0.030  # 30 ms a frame: held back for up to a second in the queue, never late
    assert taken == list(range(3 * FPS))
    assert queue.drop_counts() == {"late": 0, "overflow": 0}


def test_a_full_queue_makes_the_producer_wait_instead_of_dropping() -> None:
    start = time.monotonic() + 60.0  # every frame is early
    queue: StageQueue[int] = StageQueue(capacity=4, due_of=lambda frame: start + frame / FPS)

    def produce() -> None:
        for frame in range(40):
            queue.put(frame)  # waits while 4 frames are held

    producer = threading.Thread(target=produce)
    producer.start()
    taken, held = [], []
    for _ in range(40):
        taken.append(queue.get(timeout=10))
        held.append(len(queue))
    producer.join(10)
    assert taken == list(range(40))
    assert max(held) <= 4
    assert queue.drop_counts() == {"late": 0, "overflow": 0}


def test_a_waiting_producer_stops_waiting_once_the_oldest_frame_is_late() -> None:
    start = time.monotonic()
    queue: StageQueue[int] = StageQueue(capacity=1, budget_s=0.05, due_of=lambda frame: start + frame / FPS)
    queue.put(0)
    queue.put(1)  # waits until frame 0 is late (50 ms), then pushes it out
    assert queue.get() == 1
    assert queue.drop_counts() == {"late": 1, "overflow": 0}


def test_late_frames_give_way_to_newer_ones() -> None:
    clock = Clock()
    dropped: list[tuple[int, str]] = []
    queue = queue_of_frames(clock, capacity=64, budget_s=0.5, on_drop=lambda f, why: dropped.append((f, why)))
    for frame in range(10):
        queue.put(frame, block=False)
    clock.now = due(5) + 0.5 + 0.001  # frames 0..5 are past their deadline
    assert queue.get() == 6
    assert dropped == [(frame, "late") for frame in range(6)]
    queue.put(10, block=False)
    clock.now = due(8) + 0.5 + 0.001
    queue.put(11, block=False)  # a put pushes out the late frames before it
    assert [frame for frame, _ in dropped[6:]] == [7, 8]
    assert [queue.get() for _ in range(3)] == [9, 10, 11]
    assert queue.drop_counts() == {"late": 8, "overflow": 0}


def test_the_newest_frame_is_never_dropped_for_lateness() -> None:
    clock = Clock()
    queue = queue_of_frames(clock, budget_s=0.1)
    queue.put(1)
    clock.now = 5.0
    assert queue.get() == 1
    assert queue.dropped == 0


def test_a_consumer_slower_than_the_stream_gets_the_newest_due_frame() -> None:
    clock = Clock()
    dropped: list[int] = []
    queue = queue_of_frames(clock, capacity=64, budget_s=0.5, on_drop=lambda f, why: dropped.append(f))
    taken, lags = [], []
    frame = 0
    for _ in range(60):  # frames arrive when due, the consumer needs 60 ms for each
        while due(frame) <= clock.now:
            queue.put(frame, block=False)
            frame += 1
        got = queue.get()
        taken.append(got)
        lags.append(clock.now - due(got))
        clock.now += 0.060
    assert dropped  # it could not keep up, so frames were skipped...
    assert taken == sorted(taken)
    assert sorted(taken + dropped) == list(range(len(taken) + len(dropped)))  # ...each one counted
    assert max(lags) < 0.5  # never late...
    assert max(lags[-30:]) < 0.1  # ...and once it is known to be slow, close to live: the delay does not grow


def test_a_consumer_busy_for_a_moment_catches_up_without_losing_a_frame() -> None:
    clock = Clock()
    queue = queue_of_frames(clock, capacity=64, budget_s=0.5)
    taken = []
    frame = 0
    for n in range(90):  # 60 ms a frame for 6 frames (falls 0.16 s behind), then 10 ms
        clock.now = max(clock.now, due(frame)) if len(queue) == 0 else clock.now  # idle until the next
        while due(frame) <= clock.now:
            queue.put(frame, block=False)
            frame += 1
        taken.append(queue.get())
        clock.now += 0.060 if 2 <= n < 8 else 0.010
    assert taken == list(range(90))
    assert queue.dropped == 0


def test_a_put_that_may_not_wait_pushes_out_the_oldest_frame() -> None:
    clock = Clock()
    queue = queue_of_frames(clock, capacity=2)
    for frame in (1, 2, 3):
        queue.put(frame, block=False)
    assert [queue.get(), queue.get()] == [2, 3]
    assert queue.drop_counts() == {"late": 0, "overflow": 1}


def test_other_items_are_never_dropped_and_keep_their_place() -> None:
    clock = Clock()
    queue: StageQueue[str] = StageQueue(capacity=1, budget_s=0.01, clock=clock)
    queue.put("frame 1", block=False)
    queue.put("boundary", droppable=False)
    queue.put("frame 2", block=False)  # pushes out frame 1 (capacity 1), not the boundary
    queue.put("audio", droppable=False)
    clock.now = 1.0
    assert [queue.get(), queue.get(), queue.get()] == ["boundary", "frame 2", "audio"]
    assert queue.drop_counts() == {"late": 0, "overflow": 1}


def test_close_releases_a_waiting_producer() -> None:
    start = time.monotonic() + 60.0
    queue: StageQueue[int] = StageQueue(capacity=1, due_of=lambda frame: start + frame)
    queue.put(0)
    failures: list[BaseException] = []

    def produce() -> None:
        try:
            queue.put(1)
        except Closed as exc:
            failures.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    queue.close()
    producer.join(10)
    assert not producer.is_alive()
    assert len(failures) == 1
    assert queue.get() == 0  # what was in it is still handed out


def test_the_stream_clock_maps_timestamps_to_the_first_frame_s_arrival() -> None:
    clock = Clock()
    stream = StreamClock(clock=clock)
    clock.now = 10.0
    assert stream.arrived(900_000) == 10.0
    assert stream.arrived(903_000) == pytest.approx(10.0 + 1 / 30)  # a burst: early, not late
    clock.now = 12.0
    assert stream.arrived(1_080_000) == pytest.approx(12.0)


def test_the_stream_clock_follows_an_input_that_stays_behind_but_not_a_catch_up() -> None:
    clock = Clock()
    stream = StreamClock(resync_s=1.0, clock=clock)
    stream.arrived(0)
    # A stall, then a backlog at once: its frames are late, and the clock keeps them late.
    clock.now = 3.0
    backlog = [stream.arrived(pts) for pts in range(90_000, 270_000, 3000)]
    assert backlog == pytest.approx([pts / 90_000 for pts in range(90_000, 270_000, 3000)])
    catching_up = stream.catching_up
    for pts in range(270_000, 450_000, 3000):  # then frames on time
        clock.now = pts / 90_000
        assert stream.arrived(pts) == pytest.approx(clock.now)
    assert (catching_up, stream.catching_up) == (True, False)
    # The source pauses for 2 s and goes on where it stopped: after a second behind, it is on time again.
    lags = []
    for pts in range(450_000, 720_000, 3000):
        clock.now = 2.0 + pts / 90_000
        lags.append(clock.now - stream.arrived(pts))
    assert lags[0] == pytest.approx(2.0)
    assert lags[-1] == pytest.approx(0.0, abs=1e-6)


def test_close_hands_out_what_is_left_then_raises() -> None:
    queue: StageQueue[int] = StageQueue()
    queue.put(1)
    queue.close()
    assert queue.get() == 1
    with pytest.raises(Closed):
        queue.get()
    with pytest.raises(Closed):
        queue.put(2)
    with pytest.raises(Closed):
        queue.get_nowait()


def test_get_waits_for_another_thread_and_times_out() -> None:
    queue: StageQueue[int] = StageQueue()
    with pytest.raises(TimeoutError):
        queue.get(timeout=0.01)
    assert queue.get_nowait() is None
    woken: list[bool] = []
    queue.set_waker(lambda: woken.append(True))
    producer = threading.Thread(target=queue.put, args=(7,))
    producer.start()
    assert queue.get(timeout=5) == 7
    producer.join()
    assert woken == [True]


def test_items_put_without_a_wake_ride_with_the_next_wake_and_keep_their_place() -> None:
    queue: StageQueue[str] = StageQueue()
    wakes: list[bool] = []
    queue.set_waker(lambda: wakes.append(True))
    queue.put("audio 1", droppable=False, wake=False)
    queue.put("audio 2", droppable=False, wake=False)
    assert wakes == []  # nobody was woken for them
    queue.put("frame")
    assert wakes == [True]  # one wake for all three
    queue.wake()
    assert wakes == [True]  # nothing left unannounced
    queue.put("audio 3", droppable=False, wake=False)
    queue.wake()  # the producer is about to wait: what it held back goes on
    queue.wake()
    assert wakes == [True, True]
    assert [queue.get_nowait() for _ in range(4)] == ["audio 1", "audio 2", "frame", "audio 3"]
