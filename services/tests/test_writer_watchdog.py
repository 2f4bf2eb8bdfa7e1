"""The writer's watchdog sees every S3 request as a step of its own.

A worker silent for WEDGED_AFTER seconds while busy makes the writer report itself unhealthy
(systemd's watchdog then restarts it). A face S3 refuses takes up to three PUTs in a row (the
face, its copy under rejected/, the face once more): with a slow S3 each may take a whole
timeout, so the heartbeat must be refreshed before each, or a healthy writer is killed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import paho.mqtt.client as paho
import pytest
from writer_helpers import make_face

from facepipe import writer as writer_module
from facepipe.s3store import REFUSED, S3Failure, S3PutError
from facepipe.stats import Counters
from facepipe.writer import Writer

STEP = 0.6  # each PUT's duration: under the watchdog limit below, two of them are over it
LIMIT = 1.0


@dataclass
class SlowStore:
    """Every PUT takes STEP seconds; the face's first PUT is refused, the rest succeed."""

    pool: Writer | None = None
    health: list[tuple[str, bool]] = field(default_factory=list)
    face_puts: int = 0
    last_success: float = 0.0

    def _slow(self, what: str) -> None:
        time.sleep(STEP)
        assert self.pool is not None
        self.health.append((what, self.pool.healthy()))

    def put_face(self, key: str, body: bytes, metadata: dict[str, str]) -> None:
        self._slow("face")
        self.face_puts += 1
        if self.face_puts == 1:
            raise S3PutError(S3Failure(REFUSED, "InvalidRequest", "refused once"))
        self.last_success = time.monotonic()

    def put_rejected(self, key: str, body: bytes, metadata: dict[str, str]) -> None:
        self._slow("copy")
        self.last_success = time.monotonic()


class Session:
    connects = 0

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def test_a_refused_face_on_a_slow_s3_never_looks_wedged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "WEDGED_AFTER", LIMIT)
    store = SlowStore()
    pool = Writer(
        store,  # type: ignore[arg-type]
        topic_prefix="faces",
        s3_prefix="faces",
        max_bytes=1 << 20,
        workers=1,
        counters=Counters(["stored", "rejected", "spare_copies", "retries", "acked"]),
    )
    store.pool = pool
    session = Session()
    pool.session = session  # type: ignore[assignment]
    pool.start()
    _, payload = make_face("cam-1", 1)
    message = paho.MQTTMessage(mid=7, topic=b"faces/cam-1")
    message.payload = payload
    message.qos = 1
    pool.on_message(message)
    assert pool.drain(timeout=10)
    # The face, its copy, the face again: all three PUTs ran, none of them saw an unhealthy pool.
    assert [what for what, _ in store.health] == ["face", "copy", "face"]
    assert all(healthy for _, healthy in store.health), store.health
    assert session.acked == [7]
    assert pool.counters.get("stored") == 1
