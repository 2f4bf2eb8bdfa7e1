"""face-writer: faces from MQTT into S3, at least once, with back-pressure.

Subscribes ``$share/<group>/<prefix>/+`` at QoS 1 with a durable session and ``manual_ack``:
a message is acknowledged only after its object is in S3, so a writer that dies, or an S3
that is down, never loses a face; the broker redelivers what was not acknowledged. Keys are
derived from the message's metadata only, so a redelivery overwrites the same object.

Back-pressure: uploads run in a pool of ``--workers`` threads fed by a bounded queue. With
MQTT v5 the writer announces a Receive Maximum equal to the queue's size, so the broker stops
sending when that many messages are unacknowledged and paho's network thread never blocks
(a blocked network thread stops keepalive pings, paho #328). With MQTT 3.1.1 there is no
Receive Maximum; the broker's ``max_inflight_messages`` (default 20) bounds delivery, and if
that is larger than the queue, ``on_message`` blocks on the full queue: reading pauses, pings
pause too, and a stall longer than 1.5 x keepalive makes the broker drop the connection; the
unacknowledged messages are then redelivered, never lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import paho.mqtt.client as paho
from botocore.exceptions import BotoCoreError

from facepipe import brokerstats, contract
from facepipe.brokerstats import BrokerStats
from facepipe.config import (
    LOGGING_OPTIONS,
    MQTT_OPTIONS,
    ConfigError,
    LoggingConfig,
    MqttConfig,
    Option,
    config_of,
    default_hostname,
    float_range,
    int_range,
    non_empty,
    parse_config,
    parse_networks,
    run_main,
)
from facepipe.logsetup import setup_logging
from facepipe.mqtt import MqttSession, MqttSettings
from facepipe.notify import Notifier, stop_on_signals
from facepipe.quarantine import Quarantine
from facepipe.s3store import BLOCKED, REFUSED, S3Failure, S3PutError, S3Store, backoff_delay
from facepipe.stats import Counters, StatsReporter, serve_metrics

PROG: Final = "face-writer"
log = logging.getLogger(__name__)

# The stats line's and the metrics' names (facepipe_writer_<name>_total; gauges without _total).
# Per-reason counters (rejected_<reason>, dropped_<reason>) appear once a reason occurs.
COUNTERS: Final = ("received", "stored", "acked", "acks_sent", "retries", "rejected", "dropped")
GAUGES: Final = ("in_flight",)

MIB: Final = 1024 * 1024
DAY: Final = 86400.0
SET_ASIDE_ATTEMPTS: Final = 3  # failed PUTs of a bad message's copy before it may be given up
WEDGED_AFTER: Final = 180.0  # a busy worker silent this long means the pool is stuck
# Announced MQTT 5 Maximum Packet Size = max_bytes + room for the longest topic and properties.
PACKET_OVERHEAD: Final = 70 * 1024


def _s3_prefix(text: str) -> str:
    value = text.strip().strip("/")
    if not value or value.split("/")[0] == contract.REJECTED_PREFIX:
        raise ValueError(f"{text!r} must be non-empty and not under {contract.REJECTED_PREFIX}/")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{text!r} contains control characters")
    return value


def _share_group(text: str) -> str:
    value = text.strip()
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{text!r} must be non-empty without / + #")
    return value


OPTIONS: Final = (
    Option("s3_bucket", non_empty, None, "S3 bucket to store faces in", required=True),
    Option("s3_prefix", _s3_prefix, "faces", "key prefix for faces in the bucket"),
    Option("share_group", _share_group, "writers", "MQTT shared-subscription group"),
    Option(
        "max_bytes",
        int_range(1024, 256 * MIB),
        MIB,
        "largest accepted payload in bytes (match the brokers' message_size_limit)",
    ),
    Option(
        "max_age",
        float_range(60, 10 * 366 * DAY),
        7 * DAY,
        "seconds: faces captured longer ago are set aside (too_old)",
    ),
    Option(
        "max_future",
        float_range(0, DAY),
        300.0,
        "seconds: faces captured further ahead of this clock are set aside (in_future)",
    ),
    Option(
        "max_attempts",
        int_range(1, 1000),
        20,
        "failed PUTs of one message before it is set aside, if S3 takes other objects",
    ),
    Option(
        "set_aside_per_minute",
        int_range(0, 100_000),
        60,
        "bad messages kept under rejected/ per device and reason per minute; the rest are "
        "counted and dropped",
    ),
    Option("workers", int_range(1, 256), 8, "parallel S3 uploads"),
    Option(
        "drain_timeout",
        float_range(0),
        30.0,
        "seconds to finish in-flight uploads on SIGTERM (unfinished ones are redelivered)",
    ),
    *MQTT_OPTIONS,
    *LOGGING_OPTIONS,
)


@config_of(OPTIONS)
@dataclass(frozen=True)
class WriterConfig:
    s3_bucket: str
    s3_prefix: str
    share_group: str
    max_bytes: int
    max_age: float
    max_future: float
    max_attempts: int
    set_aside_per_minute: int
    workers: int
    drain_timeout: float
    mqtt: MqttConfig
    logging: LoggingConfig


@dataclass
class Job:
    mid: int
    qos: int
    topic: str
    payload: bytes  # the message, or its first SET_ASIDE_MAX_BYTES when it is over max_bytes
    size: int  # the message's real size
    generation: int  # which connection delivered it: acks are only valid on that one
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class _Abandoned(Exception):
    """Shutdown interrupted a retry: the message stays unacknowledged for redelivery."""


def _topic_of(msg: paho.MQTTMessage) -> str:
    try:
        return msg.topic
    except UnicodeDecodeError:  # a broker should never pass one on; it is a bad topic then
        return bytes(msg._topic).decode("utf-8", "replace")


class AckSender:
    """Tells each edge which of its faces are handled for good, so its outbox can forget them.

    Face ids are batched per device and published from this thread every ``interval`` seconds
    (or sooner when a batch is full) on ``<prefix>-ack/<device>`` at QoS 1. A lost
    acknowledgement only makes the edge publish the face again, which overwrites its own object.
    """

    def __init__(self, topic_prefix: str, counters: Counters, interval: float = 0.1) -> None:
        self.topic_prefix = topic_prefix
        self.counters = counters
        self.interval = interval
        self.session: MqttSession | None = None
        self._pending: dict[str, list[str]] = {}
        self._count = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="acks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, device: str, face_id: str) -> None:
        with self._cond:
            self._pending.setdefault(device, []).append(face_id)
            self._count += 1
            if self._count >= contract.MAX_ACK_IDS:
                self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is pending, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stopping and self._count < contract.MAX_ACK_IDS:
                    self._cond.wait(self.interval)
                batch, self._pending, self._count = self._pending, {}, 0
                stopping = self._stopping
            self._send(batch)
            if stopping:
                return

    def _send(self, batch: dict[str, list[str]]) -> None:
        assert self.session is not None
        for device, face_ids in batch.items():
            topic = contract.ack_topic(self.topic_prefix, device)
            for start in range(0, len(face_ids), contract.MAX_ACK_IDS):
                chunk = face_ids[start : start + contract.MAX_ACK_IDS]
                self.session.publish(topic, contract.encode_ack(chunk), qos=1)
                self.counters.inc("acks_sent", len(chunk))


class Writer:
    """The pool of upload workers and the ack discipline; MQTT and S3 are injected.

    Every message ends acknowledged, in exactly one of three ways: stored under faces/, set
    aside under rejected/ (a bad message, or one S3 will not take), or dropped and counted
    (a bad message over the set-aside rate). Only two things leave a message unacknowledged:
    shutdown, and an S3 that takes nothing at all (then everything waits, as it must).
    """

    def __init__(
        self,
        store: S3Store,
        *,
        topic_prefix: str,
        s3_prefix: str,
        max_bytes: int,
        workers: int,
        counters: Counters,
        window: contract.TimeWindow | None = None,
        max_attempts: int = 20,
        set_aside_per_minute: int = 60,
    ) -> None:
        self.store = store
        self.topic_prefix = topic_prefix
        self.s3_prefix = s3_prefix
        self.max_bytes = max_bytes
        self.counters = counters
        self.window = window or contract.TimeWindow()
        self.max_attempts = max_attempts
        self.quarantine = Quarantine(set_aside_per_minute)
        self.capacity = workers * 4
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.capacity)
        self.session: MqttSession | None = None
        self.acks: AckSender | None = None
        self.stopping = threading.Event()  # no new messages
        self.abandon = threading.Event()  # give up in-flight retries (they stay unacked)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._beats: list[float] = [time.monotonic()] * workers
        self._busy: list[bool] = [False] * workers
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), name=f"upload-{i}", daemon=True)
            for i in range(workers)
        ]

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def healthy(self) -> bool:
        """Every worker thread alive, and none stuck in one step for WEDGED_AFTER seconds."""
        now = time.monotonic()
        for i, thread in enumerate(self._threads):
            if not thread.is_alive():
                return False
            if self._busy[i] and now - self._beats[i] > WEDGED_AFTER:
                return False
        return True

    def drain(self, timeout: float) -> bool:
        """Wait for queued and running jobs to finish; True if all did."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.in_flight == 0

    def stop_workers(self) -> None:
        self.abandon.set()
        for _ in self._threads:
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(timeout=5)

    # --- paho's network thread ---------------------------------------------------------

    def on_message(self, msg: paho.MQTTMessage) -> None:
        if self.stopping.is_set():
            return  # not acknowledged: the broker redelivers it to our session later
        assert self.session is not None
        payload = msg.payload
        size = len(payload)
        if size > self.max_bytes:  # never hold more of an oversized message than is set aside
            payload = payload[: contract.SET_ASIDE_MAX_BYTES]
        job = Job(
            mid=msg.mid,
            qos=msg.qos,
            topic=_topic_of(msg),
            payload=bytes(payload),
            size=size,
            generation=self.session.connects,
        )
        self.counters.inc("received")
        if job.qos == 0:  # not covered by Receive Maximum: never let one block this thread
            try:
                with self._lock:
                    self._in_flight += 1
                self.queue.put_nowait(job)
            except queue.Full:
                self._finished()
                self.counters.inc("dropped_qos0")  # at most once is what QoS 0 promises
            return
        with self._lock:
            self._in_flight += 1
        while True:
            try:
                # Normally never blocks (Receive Maximum == capacity); see module docstring.
                self.queue.put(job, timeout=1.0)
                return
            except queue.Full:
                if self.stopping.is_set():
                    self._finished()
                    return

    # --- workers -----------------------------------------------------------------------

    def _finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _worker(self, index: int) -> None:
        while True:
            self._beats[index] = time.monotonic()
            try:
                job = self.queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if job is None:
                return
            if self.abandon.is_set():  # shutting down: leave it unacknowledged for redelivery
                self._finished()
                continue
            self._busy[index] = True
            try:
                self._process(job, index)
            except _Abandoned:
                pass  # left unacknowledged, redelivered later
            except Exception as exc:  # a bug of ours: keep the message aside, never stall on it
                log.error(
                    "unexpected error handling a message on %s: %s",
                    contract.printable(job.topic),
                    contract.printable(f"{type(exc).__name__}: {exc}"),
                )
                log.debug("traceback", exc_info=True)
                try:
                    self._set_aside(job, contract.Reason.INTERNAL_ERROR, type(exc).__name__, index)
                except _Abandoned:
                    pass
                except Exception:
                    log.exception("could not set the message aside either; acknowledging it")
                    self._ack(job)
            finally:
                self._busy[index] = False
                self._finished()

    def _process(self, job: Job, index: int) -> None:
        meta: contract.FaceMeta | None = None
        try:
            if job.size > self.max_bytes:
                raise contract.ContractError(
                    contract.Reason.TOO_LARGE, f"{job.size} bytes > {self.max_bytes}"
                )
            meta, body = contract.decode_face(job.payload)
            contract.check_topic(self.topic_prefix, job.topic, meta)
            self.window.check(meta.captured_at, datetime.now(UTC))
        except contract.ContractError as exc:
            self._set_aside(job, exc.reason, exc.detail, index, meta)
            return
        key = contract.face_key(self.s3_prefix, meta)
        metadata = contract.s3_metadata(meta)
        started = time.monotonic()

        def put_face() -> None:
            self.store.put_face(key, body, metadata)

        stored = self._put(
            index,
            put_face,
            lambda failure: self._give_up_face(job, meta, failure, started, put_face, index),
            self.max_attempts,
        )
        if stored:
            self.counters.inc("stored")
            log.debug("stored %s (%d bytes)", key, len(body))
            self._done(job, meta.face_id)

    def _put(
        self,
        index: int,
        put: Callable[[], None],
        give_up: Callable[[S3Failure], bool],
        cap: int,
    ) -> bool:
        """``put()`` until it succeeds (True) or ``give_up(failure)`` ends it (False).

        ``give_up`` is asked after a refusal, and after every failure from the ``cap``-th
        on; when it declines, the PUT is retried with backoff (a refusal like a blocked S3).
        Raises _Abandoned on shutdown.
        """
        attempt = 0
        while True:
            self._beats[index] = time.monotonic()
            try:
                put()
                return True
            except S3PutError as exc:
                failure = exc.failure
            attempt += 1
            self.counters.inc("retries")
            log.debug("attempt %d failed: %s", attempt, failure.describe())
            if (failure.kind == REFUSED or attempt >= cap) and give_up(failure):
                return False
            kind = BLOCKED if failure.kind == REFUSED else failure.kind
            if self.abandon.wait(backoff_delay(attempt - 1, kind)):
                raise _Abandoned

    def _give_up_face(
        self,
        job: Job,
        meta: contract.FaceMeta,
        failure: S3Failure,
        started: float,
        put_face: Callable[[], None],
        index: int,
    ) -> bool:
        """A valid face S3 refused, or failed ``max_attempts`` times: end it, or not yet.

        Its whole message is kept under rejected/ if S3 takes that copy (then S3 works and the
        face is the problem; the edge is told the face is in the bucket). The face itself is
        tried once more right after its copy is taken: an S3 that refused or failed everything
        may have recovered between the two PUTs, and then the face belongs under faces/ (it
        is stored there, and the copy is a spare, counted as ``spare_copies``). Without a copy (over
        the set-aside rate, or the copy fails too) it is given up only if S3 stored another
        object since this face's first attempt; the edge is then not told, so its outbox keeps
        the face and publishes it again later. Otherwise S3 takes nothing at all: an outage,
        and the face is retried (False). Each PUT here is a step of its own for the watchdog
        (``WEDGED_AFTER``): a slow S3 may take a whole timeout per PUT.
        """
        reason = (
            contract.Reason.S3_REFUSED if failure.kind == REFUSED else contract.Reason.S3_GAVE_UP
        )
        device = meta.device_id
        if self._may_keep(device, reason, count=False):
            key, body, metadata = self._copy(job, device, reason, failure.describe(), whole=True)
            try:
                self._beats[index] = time.monotonic()
                self.store.put_rejected(key, body, metadata)
            except S3PutError:
                pass
            else:
                try:
                    self._beats[index] = time.monotonic()
                    put_face()
                except S3PutError:
                    pass  # S3 works, and still not for this face: the copy stands for it
                else:
                    self.counters.inc("stored")
                    self.counters.inc("spare_copies")
                    log.warning(
                        "face %s on %s stored after all: S3 took its copy at %s, then the face "
                        "(it had failed: %s); the copy is a spare",
                        meta.face_id,
                        contract.printable(job.topic),
                        key,
                        failure.describe(),
                    )
                    self._done(job, meta.face_id)
                    return True
                self.counters.inc("rejected")
                self.counters.inc(f"rejected_{reason}")
                log.warning(
                    "S3 does not take face %s on %s (%s); kept whole at %s",
                    meta.face_id,
                    contract.printable(job.topic),
                    failure.describe(),
                    key,
                )
                self._done(job, meta.face_id)
                return True
        if self.store.last_success <= started:
            return False  # S3 took nothing since this face came: keep trying
        self.counters.inc("rejected")
        self.counters.inc(f"rejected_{reason}")
        self.counters.inc("dropped")
        self.counters.inc(f"dropped_{reason}")
        log.error(
            "gave up face %s on %s: S3 stores other objects but not this one nor a copy (%s); "
            "its publisher keeps it and may send it again",
            meta.face_id,
            contract.printable(job.topic),
            failure.describe(),
        )
        self._ack(job)
        return True

    def _set_aside(
        self,
        job: Job,
        reason: str,
        detail: str,
        index: int,
        meta: contract.FaceMeta | None = None,
    ) -> None:
        """Keep a copy of a message that breaks the contract, then acknowledge it: to the
        broker, and, when it is a readable face (``meta``: a time outside the window, another
        device than its topic), to its edge too, whose outbox then forgets it. A readable face
        is kept whole (it is at most max_bytes), anything else cut to 64 KiB.

        Over the set-aside rate the copy is skipped (counted as dropped). The copy is retried
        while S3 stores nothing (an outage); it is given up (counted) once S3 has stored other
        objects since, and it still failed 3 times or was refused.
        """
        device = contract.rejected_device(self.topic_prefix, job.topic)
        self.counters.inc("rejected")
        self.counters.inc(f"rejected_{reason}")
        if not self._may_keep(device, reason):
            self._finish(job, meta)
            return
        key, body, metadata = self._copy(job, device, reason, detail, whole=meta is not None)
        log.warning(
            "set aside a message on %s (%d bytes): %s: %s -> %s",
            contract.printable(job.topic),
            job.size,
            reason,
            detail,
            key,
        )
        started = time.monotonic()
        stored = self._put(
            index,
            lambda: self.store.put_rejected(key, body, metadata),
            lambda _failure: self.store.last_success > started,
            SET_ASIDE_ATTEMPTS,
        )
        if not stored:
            log.error("could not set aside %s; acknowledged anyway", key)
            self.counters.inc("set_aside_failed")
        self._finish(job, meta)

    def _finish(self, job: Job, meta: contract.FaceMeta | None) -> None:
        if meta is not None:
            self._done(job, meta.face_id)
        else:
            self._ack(job)

    def _may_keep(self, device: str, reason: str, count: bool = True) -> bool:
        """The set-aside rate per (device, reason). With ``count``, a message over it is
        dropped: counted, and logged once per episode."""
        allowed, dropped = self.quarantine.take(device, reason)
        if allowed and dropped:
            log.warning(
                "%s: %d %s message(s) were dropped over the set-aside rate",
                device,
                dropped,
                reason,
            )
        if allowed or not count:
            return allowed
        self.counters.inc("dropped")
        self.counters.inc(f"dropped_{reason}")
        if dropped == 1:
            log.warning(
                "%s: more than %d %s messages a minute; dropping the rest (counted)",
                device,
                self.quarantine.per_minute,
                reason,
            )
        return False

    def _copy(
        self, job: Job, device: str, reason: str, detail: str, whole: bool
    ) -> tuple[str, bytes, dict[str, str]]:
        """Key, body and metadata of a set-aside copy: a readable face ``whole`` (it is at most
        max_bytes), anything else cut to SET_ASIDE_MAX_BYTES."""
        key = contract.rejected_key(device, job.received_at, str(uuid.uuid4()))
        body = job.payload if whole else job.payload[: contract.SET_ASIDE_MAX_BYTES]
        metadata = contract.rejected_metadata(reason, job.topic, detail, job.size, len(body))
        return key, body, metadata

    def _done(self, job: Job, face_id: str) -> None:
        """The writer is done with this face for good (stored, kept under rejected/, or dropped
        over the set-aside rate): acknowledge it to the broker and to the edge that sent it,
        whose outbox then forgets it."""
        device = contract.rejected_device(self.topic_prefix, job.topic)
        if self.acks is not None and device != contract.UNKNOWN_DEVICE:
            self.acks.add(device, face_id)
        self._ack(job)

    def _ack(self, job: Job) -> None:
        assert self.session is not None
        if job.qos == 0:
            return
        if job.generation != self.session.connects:
            # Delivered on an earlier connection: the broker redelivers it on this one, and
            # that copy gets (re)stored and acknowledged. Packet ids are per connection.
            self.counters.inc("stale_acks_skipped")
            return
        self.session.ack(job.mid, job.qos)
        self.counters.inc("acked")


def build_settings(cfg: MqttConfig) -> MqttSettings:
    if cfg.qos != 1:
        raise ConfigError(
            "--qos / FACEPIPE_QOS: face-writer needs QoS 1 (acknowledge after storing); "
            f"got {cfg.qos}"
        )
    return MqttSettings.from_config(cfg, default_client_id=f"{PROG}-{default_hostname()}")


def run(argv: list[str] | None = None) -> int:
    cfg = parse_config(WriterConfig, PROG, "Store face messages from MQTT in S3.", argv)
    settings = build_settings(cfg.mqtt)
    setup_logging(cfg.logging.log_level)

    counters = Counters(
        [*COUNTERS, *brokerstats.COUNTERS],
        [*GAUGES, *brokerstats.GAUGES],
        unknown=brokerstats.FIGURES,
    )
    try:
        store = S3Store(cfg.s3_bucket, workers=cfg.workers)
    except (ValueError, BotoCoreError) as exc:  # e.g. a malformed AWS_ENDPOINT_URL
        raise ConfigError(f"S3 settings (boto3's AWS_* configuration): {exc}") from None
    writer = Writer(
        store,
        topic_prefix=cfg.mqtt.topic_prefix,
        s3_prefix=cfg.s3_prefix,
        max_bytes=cfg.max_bytes,
        workers=cfg.workers,
        counters=counters,
        window=contract.TimeWindow(
            max_age=timedelta(seconds=cfg.max_age), max_future=timedelta(seconds=cfg.max_future)
        ),
        max_attempts=cfg.max_attempts,
        set_aside_per_minute=cfg.set_aside_per_minute,
    )
    subscription = contract.share_subscription(cfg.share_group, cfg.mqtt.topic_prefix)
    session = MqttSession(
        settings,
        durable=True,
        manual_ack=True,
        subscriptions=[(subscription, 1)],
        on_message=writer.on_message,
        receive_maximum=writer.capacity,
        maximum_packet_size=cfg.max_bytes + PACKET_OVERHEAD,
    )
    writer.session = session
    BrokerStats(counters).attach(session)  # the cloud broker's backlog and drops
    acks = AckSender(cfg.mqtt.topic_prefix, counters)
    acks.session = session
    writer.acks = acks

    notifier = Notifier()
    stop = stop_on_signals()

    if cfg.logging.metrics_port:
        serve_metrics(
            "facepipe_writer",
            counters,
            cfg.logging.metrics_address,
            cfg.logging.metrics_port,
            parse_networks(cfg.logging.metrics_allow),
        )
    log.info(
        "storing faces from %s into %s/%s/ with %d workers",
        subscription,
        store.describe(),
        cfg.s3_prefix,
        cfg.workers,
    )
    writer.start()
    acks.start()
    session.start()
    session.wait_connected(5.0)
    notifier.ready("connected" if session.connected.is_set() else "connecting to the broker")

    reporter = StatsReporter(
        counters, cfg.logging.stats_interval, notifier.status, {"stored": "per_s"}
    )
    wedged = False
    while not stop.wait(0.5):
        counters.set_gauge("in_flight", writer.in_flight)
        reporter.tick()
        if writer.healthy():
            notifier.watchdog()
            if wedged:
                log.info("upload pool is moving again")
                wedged = False
        elif not wedged:
            log.error("upload pool is wedged; no longer pinging the systemd watchdog")
            wedged = True

    # Shutdown: take nothing new, finish and acknowledge what is in flight, disconnect.
    notifier.stopping()
    writer.stopping.set()
    pending = writer.in_flight
    log.info("finishing %d in-flight message(s) (up to %.0fs)", pending, cfg.drain_timeout)
    if not writer.drain(cfg.drain_timeout):
        log.warning(
            "%d message(s) not stored in time; left unacknowledged for redelivery",
            writer.in_flight,
        )
    writer.stop_workers()
    acks.stop()
    session.stop()
    counters.set_gauge("in_flight", writer.in_flight)
    log.info("stopped: %s", reporter.line())
    return 0


def main() -> None:
    run_main(PROG, run)


if __name__ == "__main__":
    main()
