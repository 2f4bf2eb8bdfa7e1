"""A light IoU tracker that decides which face crops get published.

Rules (all times are on the *source clock*: frame index / fps for files, monotonic seconds
since start for live sources, so a file yields the same faces however fast it is played):

- Detections are matched to tracks greedily by IoU (highest first, at least
  ``iou_threshold``); an unmatched detection starts a new track with a fresh id.
- A track is *confirmed* once it was seen in ``min_hits`` consecutive processed frames.
  Until then nothing is published: a detection that flickers for one or two frames (a
  typical Haar false positive), even if it recurs at the same place, never leaves the device.
- On confirmation the track publishes the best observation seen so far; after that it
  publishes at most once per ``min_interval`` seconds, each time the best observation seen
  since its previous publish. "Best" is the caller's ``quality`` (sharpness x area).
- A track not matched for more than ``max_missed`` consecutive frames ends. Observations it
  gathered after its last publish are dropped: publishing them would break the rate limit,
  and the face was published less than ``min_interval`` ago.

The tracker is pure logic: the caller passes an opaque ``payload`` (the crop) with each
observation and gets it back in :class:`Publish`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from facepipe.boxes import Box

T = TypeVar("T")


@dataclass(frozen=True)
class Observation(Generic[T]):
    box: Box
    quality: float
    payload: T


@dataclass(frozen=True)
class Publish(Generic[T]):
    """An observation chosen for publishing, with the frame it came from."""

    track_id: str
    frame: int
    source_time: float
    observation: Observation[T]
    sequence: int  # 0 for a track's first publish, then 1, 2, ...


@dataclass
class _Candidate(Generic[T]):
    frame: int
    source_time: float
    observation: Observation[T]


@dataclass
class Track(Generic[T]):
    track_id: str
    box: Box
    streak: int = 0  # consecutive frames with a detection
    misses: int = 0
    published: int = 0
    last_publish_time: float | None = None
    best: _Candidate[T] | None = None

    @property
    def confirmed(self) -> bool:
        return self.published > 0


def new_track_id() -> str:
    return uuid.uuid4().hex


class Tracker(Generic[T]):
    def __init__(
        self,
        *,
        min_interval: float = 2.0,
        iou_threshold: float = 0.3,
        min_hits: int = 3,
        max_missed: int = 10,
        id_factory: Callable[[], str] = new_track_id,
    ) -> None:
        if min_interval < 0 or not 0 < iou_threshold <= 1 or min_hits < 1 or max_missed < 0:
            raise ValueError("invalid tracker settings")
        self.min_interval = min_interval
        self.iou_threshold = iou_threshold
        self.min_hits = min_hits
        self.max_missed = max_missed
        self._new_id = id_factory
        self.tracks: list[Track[T]] = []
        self.started = 0  # tracks ever started
        self.suppressed = 0  # tracks that ended before confirmation

    def update(
        self, frame: int, source_time: float, observations: Sequence[Observation[T]]
    ) -> list[Publish[T]]:
        """Feed one processed frame's detections; return what to publish now."""
        matches = self._associate(observations)
        matched_tracks = set()
        out: list[Publish[T]] = []
        for obs_index, obs in enumerate(observations):
            track = matches.get(obs_index)
            if track is None:
                track = Track(self._new_id(), obs.box)
                self.tracks.append(track)
                self.started += 1
            else:
                track.misses = 0
            matched_tracks.add(id(track))
            track.streak += 1
            track.box = obs.box
            cand = _Candidate(frame, source_time, obs)
            if track.best is None or obs.quality > track.best.observation.quality:
                track.best = cand
            pub = self._maybe_publish(track, source_time)
            if pub is not None:
                out.append(pub)
        alive: list[Track[T]] = []
        for track in self.tracks:
            if id(track) not in matched_tracks:
                track.misses += 1
                track.streak = 0
                if track.misses > self.max_missed:
                    if not track.confirmed:
                        self.suppressed += 1
                    continue
            alive.append(track)
        self.tracks = alive
        return out

    def _maybe_publish(self, track: Track[T], now: float) -> Publish[T] | None:
        if track.best is None or (not track.confirmed and track.streak < self.min_hits):
            return None
        if track.last_publish_time is not None and now - track.last_publish_time < (
            self.min_interval
        ):
            return None
        best = track.best
        pub = Publish(
            track.track_id, best.frame, best.source_time, best.observation, track.published
        )
        track.published += 1
        track.last_publish_time = now
        track.best = None
        return pub

    def _associate(self, observations: Sequence[Observation[T]]) -> dict[int, Track[T]]:
        pairs: list[tuple[float, int, int]] = []
        for ti, track in enumerate(self.tracks):
            for oi, obs in enumerate(observations):
                iou = track.box.iou(obs.box)
                if iou >= self.iou_threshold:
                    pairs.append((iou, ti, oi))
        pairs.sort(reverse=True)
        used_t: set[int] = set()
        result: dict[int, Track[T]] = {}
        for _, ti, oi in pairs:
            if ti in used_t or oi in result:
                continue
            used_t.add(ti)
            result[oi] = self.tracks[ti]
        return result
