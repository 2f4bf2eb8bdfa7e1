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
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import paho.mqtt.client as paho
from botocore.exceptions import BotoCoreError
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from facepipe import contract
from facepipe.config import (
    LOGGING_OPTIONS,
    MQTT_OPTIONS,
    ConfigError,
    Option,
    default_hostname,
    float_range,
    int_range,
    non_empty,
    parse_options,
    run_main,
)
from facepipe.logsetup import setup_logging
from facepipe.mqtt import MqttSession, MqttSettings
from facepipe.notify import Notifier, stop_on_signals
from facepipe.s3store import S3Store, backoff_delay, classify
from facepipe.stats import Counters, StatsReporter, serve_metrics

PROG: Final = "face-writer"
log = logging.getLogger("facepipe.writer")

MIB: Final = 1024 * 1024
REJECT_ATTEMPTS: Final = 3
WEDGED_AFTER: Final = 180.0  # a busy worker silent this long means the pool is stuck


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
    Option("max_bytes", int_range(1, 256 * MIB), 5 * MIB, "largest accepted payload (bytes)"),
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


@dataclass
class Job:
    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int  # which connection delivered it: acks are only valid on that one
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class Writer:
    """The pool of upload workers and the ack discipline; MQTT and S3 are injected."""

    def __init__(
        self,
        store: S3Store,
        *,
        topic_prefix: str,
        s3_prefix: str,
        max_bytes: int,
        workers: int,
        counters: Counters,
    ) -> None:
        self.store = store
        self.topic_prefix = topic_prefix
        self.s3_prefix = s3_prefix
        self.max_bytes = max_bytes
        self.counters = counters
        self.capacity = workers * 4
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.capacity)
        self.session: MqttSession | None = None
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
        job = Job(
            mid=msg.mid,
            qos=msg.qos,
            topic=msg.topic,
            payload=bytes(msg.payload),
            generation=self.session.connects,
        )
        self.counters.inc("received")
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
            except Exception:  # never lose a worker: the message stays unacked
                log.exception("unexpected error handling message mid=%d on %r", job.mid, job.topic)
            finally:
                self._busy[index] = False
                self._finished()

    def _process(self, job: Job, index: int) -> None:
        try:
            meta, body = contract.decode_face(job.payload, self.max_bytes)
            contract.check_topic(self.topic_prefix, job.topic, meta)
        except contract.ContractError as exc:
            if self._reject(job, exc, index):
                self._ack(job)
            return
        key = contract.face_key(self.s3_prefix, meta)
        metadata = contract.s3_metadata(meta)
        attempt = 0
        while True:
            self._beats[index] = time.monotonic()
            try:
                self.store.put_face(key, body, metadata)
                break
            except Exception as exc:
                failure = classify(exc)
                self.counters.inc("retries")
                log.debug("put %s failed (%s), attempt %d", key, failure.describe(), attempt + 1)
                if self.abandon.wait(backoff_delay(attempt, failure.kind)):
                    return  # shutting down: left unacknowledged, redelivered later
                attempt += 1
        self.counters.inc("stored")
        log.debug("stored %s (%d bytes)", key, len(body))
        self._ack(job)

    def _reject(self, job: Job, exc: contract.ContractError, index: int) -> bool:
        """Set a bad message aside; False if shutdown interrupted it (then it is not acked)."""
        reason = exc.reason
        self.counters.inc("rejected")
        self.counters.inc(f"rejected_{reason}")
        key = contract.rejected_key(job.received_at, str(uuid.uuid4()))
        metadata = contract.rejected_metadata(reason, job.topic, exc.detail)
        log.warning(
            "rejected message on %r (%d bytes): %s -> s3 key %s",
            job.topic[:200],
            len(job.payload),
            exc,
            key,
        )
        for attempt in range(REJECT_ATTEMPTS):
            self._beats[index] = time.monotonic()
            try:
                self.store.put_rejected(key, job.payload, metadata)
                return True
            except Exception as put_exc:
                failure = classify(put_exc)
                if attempt + 1 == REJECT_ATTEMPTS:
                    log.error(
                        "could not set aside rejected message %s (%s); acknowledging it anyway",
                        key,
                        failure.describe(),
                    )
                    self.counters.inc("rejected_unsaved")
                    return True
                if self.abandon.wait(backoff_delay(attempt, failure.kind)):
                    return False  # shutting down: redelivered and set aside next time
        return True

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


def build_settings(opts: Namespace) -> MqttSettings:
    if opts.qos != 1:
        raise ConfigError(
            "--qos / FACEPIPE_QOS: face-writer needs QoS 1 (acknowledge after storing); "
            f"got {opts.qos}"
        )
    return MqttSettings.from_options(opts, default_client_id=f"{PROG}-{default_hostname()}")


def run(argv: list[str] | None = None) -> int:
    opts = parse_options(PROG, "Store face messages from MQTT in S3.", OPTIONS, argv)
    settings = build_settings(opts)
    setup_logging(opts.log_level)

    counters = Counters(["received", "stored", "acked", "retries", "rejected"], ["in_flight"])
    try:
        store = S3Store(opts.s3_bucket, workers=opts.workers)
    except (ValueError, BotoCoreError) as exc:  # e.g. a malformed AWS_ENDPOINT_URL
        raise ConfigError(f"S3 settings (boto3's AWS_* configuration): {exc}") from None
    writer = Writer(
        store,
        topic_prefix=opts.topic_prefix,
        s3_prefix=opts.s3_prefix,
        max_bytes=opts.max_bytes,
        workers=opts.workers,
        counters=counters,
    )
    subscription = contract.share_subscription(opts.share_group, opts.topic_prefix)
    session = MqttSession(
        settings,
        durable=True,
        manual_ack=True,
        subscriptions=[(subscription, 1)],
        on_message=writer.on_message,
        receive_maximum=writer.capacity,
    )
    writer.session = session
    session.client.on_subscribe = _log_subscribed(subscription)

    notifier = Notifier()
    stop = stop_on_signals()

    if opts.metrics_port:
        serve_metrics("facepipe_writer", counters, opts.metrics_address, opts.metrics_port)
    log.info(
        "storing faces from %s into %s/%s/ with %d workers",
        subscription,
        store.describe(),
        opts.s3_prefix,
        opts.workers,
    )
    writer.start()
    session.start()
    session.wait_connected(5.0)
    notifier.ready("connected" if session.connected.is_set() else "connecting to the broker")

    reporter = StatsReporter(counters, opts.stats_interval, notifier.status, {"stored": "per_s"})
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
    log.info("finishing %d in-flight message(s) (up to %.0fs)", pending, opts.drain_timeout)
    if not writer.drain(opts.drain_timeout):
        log.warning(
            "%d message(s) not stored in time; left unacknowledged for redelivery",
            writer.in_flight,
        )
    writer.stop_workers()
    session.stop()
    counters.set_gauge("in_flight", writer.in_flight)
    log.info("stopped: %s", reporter.line())
    return 0


def _log_subscribed(subscription: str) -> Callable[..., None]:
    def on_subscribe(
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("subscription to %s refused: %s", subscription, ", ".join(failed))
        else:
            log.info("subscribed to %s", subscription)

    return on_subscribe


def main() -> None:
    run_main(PROG, run)


if __name__ == "__main__":
    main()
