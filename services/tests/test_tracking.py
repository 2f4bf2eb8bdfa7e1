"""The IoU tracker: pure logic, no video."""

from __future__ import annotations

import itertools

import pytest

from facepipe.boxes import Box
from facepipe.tracking import Observation, Tracker

FPS = 20.0


def ids():
    counter = itertools.count()
    return lambda: f"t{next(counter)}"


def obs(x: int, y: int = 100, size: int = 80, quality: float = 1.0, tag: str = ""):
    return Observation(Box(x, y, size, size), quality, tag)


def feed(tracker, frames):
    """frames: list of observation lists, one per frame at FPS; returns all publishes."""
    out = []
    for i, observations in enumerate(frames):
        out.extend(tracker.update(i, i / FPS, observations))
    return out


def test_box_iou_and_margin_clamp():
    a, b = Box(0, 0, 10, 10), Box(5, 0, 10, 10)
    assert a.iou(b) == pytest.approx(50 / 150)
    assert a.iou(Box(20, 20, 5, 5)) == 0.0
    assert Box(-5, -5, 20, 20).clamped(10, 10) == Box(0, 0, 10, 10)
    assert Box(50, 50, 5, 5).clamped(10, 10) is None
    assert Box(2, 2, 4, 4).with_margin(0.5, 100, 100) == Box(0, 0, 8, 8)
    assert Box(10, 20, 30, 40).scaled(2.0) == Box(20, 40, 60, 80)


def test_one_frame_false_positives_are_never_published():
    frames = [[obs(100)] if i % 5 == 0 else [] for i in range(100)]
    recurring = Tracker(min_hits=3, max_missed=10, id_factory=ids())  # one track, never confirmed
    assert feed(recurring, frames) == []
    separate = Tracker(min_hits=3, max_missed=3, id_factory=ids())  # a new track each time
    assert feed(separate, frames) == []
    assert separate.suppressed == 20


def test_steady_face_publishes_once_per_min_interval_of_source_time():
    tracker = Tracker(min_interval=2.0, min_hits=3, id_factory=ids())
    # 10 s of a face drifting slowly: publishes at confirmation, then every 2 s.
    frames = [[obs(100 + i // 4)] for i in range(int(10 * FPS))]
    pubs = feed(tracker, frames)
    assert len(pubs) == 5
    assert {p.track_id for p in pubs} == {"t0"}
    assert [p.sequence for p in pubs] == [0, 1, 2, 3, 4]
    assert pubs[0].frame <= 2  # published as soon as confirmed (3rd frame)


def test_rate_depends_on_source_clock_not_on_call_rate():
    slow = Tracker(min_interval=2.0, id_factory=ids())
    fast = Tracker(min_interval=2.0, id_factory=ids())
    frames = [[obs(100)] for _ in range(200)]
    assert len(feed(slow, frames)) == len(feed(fast, frames))


def test_publishes_best_quality_seen_since_last_publish():
    tracker = Tracker(min_interval=1.0, min_hits=2, id_factory=ids())
    qualities = [1, 5, 2, 2, 9, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    frames = [[obs(100, quality=q, tag=f"f{i}")] for i, q in enumerate(qualities)]
    pubs = feed(tracker, frames)
    assert pubs[0].observation.payload == "f1"  # best of frames 0-1 at confirmation
    assert pubs[1].observation.payload == "f4"  # best since: quality 9 at frame 4
    assert pubs[1].frame == 4


def test_two_faces_get_two_tracks_and_new_ids_after_expiry():
    tracker = Tracker(min_interval=100.0, max_missed=3, id_factory=ids())
    both = [[obs(50), obs(400)] for _ in range(10)]
    gap = [[] for _ in range(5)]
    again = [[obs(50)] for _ in range(10)]
    pubs = feed(tracker, both + gap + again)
    assert [p.track_id for p in pubs] == ["t0", "t1", "t2"]


def test_short_gap_keeps_the_track():
    tracker = Tracker(min_interval=100.0, max_missed=5, id_factory=ids())
    frames = [[obs(50)]] * 5 + [[]] * 4 + [[obs(52)]] * 5
    pubs = feed(tracker, frames)
    assert len(pubs) == 1
    assert len(tracker.tracks) == 1


def test_moving_face_stays_one_track():
    tracker = Tracker(min_interval=100.0, iou_threshold=0.3, id_factory=ids())
    frames = [[obs(100 + 4 * i)] for i in range(60)]  # 4 px per frame on an 80 px face
    pubs = feed(tracker, frames)
    assert len(pubs) == 1 and tracker.started == 1


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        Tracker(min_hits=0)
    with pytest.raises(ValueError):
        Tracker(iou_threshold=0)
