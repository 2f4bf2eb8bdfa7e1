"""How many bad messages face-writer keeps: a token bucket per (device, reason).

Setting a message aside costs an S3 object; a broken camera or a hostile publisher can send
thousands a second. Each (device, reason) pair may set aside a burst of ``per_minute`` messages,
then one every 60/``per_minute`` seconds (at most twice ``per_minute`` in a first minute, then
``per_minute`` a minute); the rest are acknowledged and only counted. The number of pairs
tracked is bounded too: the least recently seen pair is forgotten first (and starts afresh).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MAX_KEYS: Final = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float
    dropped: int = 0  # since the last message that was kept


class Quarantine:
    """Thread-safe token buckets keyed by (device, reason)."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def take(self, device: str, reason: str) -> tuple[bool, int]:
        """May one more message of this pair be kept? Also returns how many of the pair were
        dropped since the last one kept (0 when nothing was), for one log line per episode."""
        key = (device, reason)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(key, None)
            if bucket is None:
                bucket = _Bucket(tokens=float(self.per_minute), updated=now)
            else:
                refill = (now - bucket.updated) * self.per_minute / 60.0
                bucket.tokens = min(float(self.per_minute), bucket.tokens + refill)
                bucket.updated = now
            self._buckets[key] = bucket  # most recently used last
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                dropped, bucket.dropped = bucket.dropped, 0
                return True, dropped
            bucket.dropped += 1
            return False, bucket.dropped
