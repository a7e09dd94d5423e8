"""The hand-off between media stages: the newest frame wins only when the consumer falls behind."""

from __future__ import annotations

import threading

import pytest

from byoc.media.queues import Closed, StageQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_consumer_that_keeps_up_loses_nothing_even_in_a_burst() -> None:
    clock = Clock()
    queue: StageQueue[int] = StageQueue(capacity=64, max_age_s=0.1, clock=clock)
    for i in range(30):  # a whole segment decoded at once
        queue.put(i)
    taken = []
    for _ in range(30):
        taken.append(queue.get())
        clock.now += 0.002  # 2 ms per frame: the burst is gone in 60 ms
    assert taken == list(range(30))
    assert queue.dropped == 0


def test_a_slow_consumer_gets_the_newest_frame() -> None:
    clock = Clock()
    dropped: list[int] = []
    queue: StageQueue[int] = StageQueue(capacity=64, max_age_s=0.1, clock=clock, on_drop=dropped.append)
    taken, ages = [], []
    frame = 0
    for _ in range(20):  # frames every 33 ms, the consumer needs 60 ms for each
        while clock.now >= frame * 0.033:
            queue.put(frame)
            frame += 1
        got = queue.get()
        taken.append(got)
        ages.append(clock.now - got * 0.033)
        clock.now += 0.060
    assert dropped  # it could not keep up, so frames were skipped...
    assert taken == sorted(taken)
    assert sorted(taken + dropped) == list(range(len(taken) + len(dropped)))  # ...each one counted
    assert max(ages) < 0.1  # ...and what it got was never stale: the delay does not grow


def test_the_last_frame_is_never_dropped_for_age() -> None:
    clock = Clock()
    queue: StageQueue[int] = StageQueue(max_age_s=0.1, clock=clock)
    queue.put(1)
    clock.now = 5.0
    assert queue.get() == 1


def test_capacity_bounds_memory_by_dropping_the_oldest_frame() -> None:
    queue: StageQueue[str] = StageQueue(capacity=2)
    for item in ("a", "b", "c"):
        queue.put(item)
    assert [queue.get(), queue.get()] == ["b", "c"]
    assert queue.dropped == 1


def test_other_items_are_never_dropped_and_keep_their_place() -> None:
    clock = Clock()
    queue: StageQueue[str] = StageQueue(capacity=1, max_age_s=0.01, clock=clock)
    queue.put("frame 1")
    queue.put("boundary", droppable=False)
    queue.put("frame 2")  # pushes out frame 1 (capacity 1), not the boundary
    clock.now = 1.0
    assert [queue.get(), queue.get()] == ["boundary", "frame 2"]


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
