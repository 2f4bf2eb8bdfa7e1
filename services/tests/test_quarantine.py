"""The set-aside rate: per (device, reason), refilling, bounded in memory."""

from __future__ import annotations

from facepipe.quarantine import Quarantine


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_up_to_the_rate_then_one_per_refill():
    clock = Clock()
    q = Quarantine(60, clock=clock)
    assert [q.take("cam-1", "bad_metadata")[0] for _ in range(61)] == [True] * 60 + [False]
    assert q.take("cam-1", "bad_metadata") == (False, 2)  # dropped so far in this episode
    assert q.take("cam-1", "not_jpeg") == (True, 0)  # another reason has its own budget
    assert q.take("cam-2", "bad_metadata") == (True, 0)  # another device too
    clock.now += 1.0  # one token a second at 60 a minute
    assert q.take("cam-1", "bad_metadata") == (True, 2)  # kept; reports the 2 dropped
    assert q.take("cam-1", "bad_metadata") == (False, 1)


def test_zero_keeps_nothing():
    assert Quarantine(0).take("cam-1", "empty") == (False, 1)


def test_memory_is_bounded_by_forgetting_the_oldest_pair():
    q = Quarantine(1, max_keys=100)
    for i in range(1000):
        q.take(f"dev-{i}", "bad_topic")
    assert len(q._buckets) == 100
    assert q.take("dev-999", "bad_topic")[0] is False  # recent: remembered, spent
    assert q.take("dev-0", "bad_topic")[0] is True  # forgotten: a fresh budget
