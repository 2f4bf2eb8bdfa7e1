"""End-to-end delivery of faces from an edge: outbox -> broker -> bridge -> writer -> S3 -> ack.

:class:`BrokerPublisher` publishes to the local broker and tracks the broker's PUBACKs.
:class:`Delivery` adds the end-to-end guarantee on top: every face goes into an
:class:`~facepipe.outbox.Outbox` (fsync'd) *before* it is published, and leaves it only when
the writer acknowledges it on ``<prefix>-ack/<device>`` after storing it. Faces that were not
acknowledged are published again:

- only while the edge's bridge is connected (its retained ``1``/``0`` state topic) and this
  client is connected to its broker;
- when it was lost: a face published only once and at least ``reorder_grace`` (default
  ``ack_timeout``) seconds *later* was acknowledged (queues keep order, so the older one is gone:
  a broker crash, a power cut). Only faces published once move this horizon: an ack cannot say
  which copy of a republished face it answers;
- or when the pipe is stalled: no acknowledgement at all for ``ack_timeout`` seconds of bridge
  uptime while faces wait. A backlog that drains in order is never republished, however long it
  takes;
- paced: a face republished ``k`` times waits ``ack_timeout * 2**k`` (at most an hour) before
  the next stall-driven attempt; at most ``window`` republished faces wait for their
  acknowledgement at a time and at most ``rate`` go out per second;
- after a restart every face left in the outbox counts as published at start-up.

A republished face is the same message, so the writer overwrites its own object: no duplicates.
Third-party publishers use the same classes (see services/README.md, "Delivery for other
publishers") or the ``facepipe-publish`` command.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from facepipe import contract
from facepipe.config import (
    LOGGING_OPTIONS,
    MQTT_OPTIONS,
    ConfigError,
    LoggingConfig,
    MqttConfig,
    Option,
    config_of,
    float_range,
    int_range,
    non_empty,
)
from facepipe.mqtt import MqttSession, MqttSettings, Will
from facepipe.outbox import Entry, Outbox, OutboxError
from facepipe.stats import Counters

log = logging.getLogger(__name__)

# Counters and gauges a Delivery keeps (the caller's Counters must accept them).
DELIVERY_COUNTERS: Final = (
    "accepted",
    "publish_deferred",
    "e2e_acked",
    "republished",
    "outbox_dropped",
    "outbox_expired",
    "outbox_errors",
    "bad_acks",
)
DELIVERY_GAUGES: Final = ("outbox_depth", "outbox_bytes", "outbox_oldest_s", "bridge_up")
BRIDGE_UP: Final = b"1"
MAX_BACKOFF: Final = 3600.0  # a face stalls at most this long between two republishes


class BrokerPublisher:
    """Publishes messages and tracks the ones the broker has not acknowledged yet.

    Acknowledgements come from paho's ``on_publish`` (PUBACK for QoS 1, sent for QoS 0),
    matched by message id. ``MQTTMessageInfo.is_published`` is not used: it raises for a
    message published while disconnected, although paho still holds and later sends it.
    """

    def __init__(
        self, session: MqttSession, topic: str, qos: int, max_pending: int, counters: Counters
    ) -> None:
        self.session = session
        self.topic = topic
        self.qos = qos
        self.max_pending = max_pending
        self.counters = counters
        self._lock = threading.Lock()
        self._pending: dict[int, bool] = {}  # mid -> is a face
        self._early: set[int] = set()  # acks that arrived before publish() returned
        self.properties: Properties | None = None
        if session.settings.v5:
            self.properties = Properties(PacketTypes.PUBLISH)
            self.properties.ContentType = contract.CONTENT_TYPE
        session.client.on_publish = self._on_publish

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused message %d: %s", mid, reason)
            self.counters.inc("publish_refused")
        with self._lock:
            is_face = self._pending.pop(mid, None)
            if is_face is None:
                self._early.add(mid)
        if is_face:
            self.counters.inc("acked")

    def _track(self, mid: int, is_face: bool) -> None:
        with self._lock:
            if mid in self._early:
                self._early.discard(mid)
                acked_now = True
            else:
                self._pending[mid] = is_face
                acked_now = False
        if acked_now and is_face:
            self.counters.inc("acked")

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def publish(self, payload: bytes, count: bool = True) -> bool:
        """Publish a face; False if paho's bounded queue is full (with ``count``: counted as
        ``publish_dropped``, and a success as ``published``)."""
        info = self.session.publish(self.topic, payload, self.qos, properties=self.properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            if count:
                self.counters.inc("publish_dropped")
            return False
        # MQTT_ERR_NO_CONN still queues the message: paho sends it after reconnecting.
        if count:
            self.counters.inc("published")
        self._track(info.mid, True)
        return True

    def publish_status(self, topic: str, payload: bytes) -> int | None:
        """A retained QoS 1 status message; returns its mid (None if it could not be queued)."""
        info = self.session.publish(topic, payload, 1, retain=True)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return None
        self._track(info.mid, False)
        return info.mid

    def is_acked(self, mid: int | None) -> bool:
        with self._lock:
            return mid is not None and mid not in self._pending

    def wait_room(self, stop: threading.Event, tick: Callable[[], None]) -> None:
        """Block (file sources) while ``max_pending`` messages are unacknowledged."""
        while self.pending() >= self.max_pending and not stop.is_set():
            tick()
            time.sleep(0.02)

    def drain(
        self,
        stop: threading.Event,
        timeout: float,
        tick: Callable[[], None],
        unfinished: Callable[[], int] = lambda: 0,
    ) -> bool:
        """Wait until every publish is acknowledged by the broker; False on timeout.

        Before ``stop`` is set this waits as long as it takes (a finished file), and also
        until ``unfinished()`` is 0 (the outbox: until the cloud acknowledged every face);
        once it is set (SIGTERM), for the broker's acknowledgements only, at most ``timeout``
        seconds more (the outbox keeps what is not acknowledged for the next start).
        """
        deadline: float | None = None
        last_log = time.monotonic()
        while self.pending() or (not stop.is_set() and unfinished()):
            now = time.monotonic()
            if deadline is None and stop.is_set():
                deadline = now + timeout
            if deadline is not None and now >= deadline:
                return False
            if now - last_log >= 10:
                log.info(
                    "waiting for %d broker and %d end-to-end acknowledgement(s)",
                    self.pending(),
                    unfinished(),
                )
                last_log = now
            tick()
            time.sleep(0.02)
        return True


class Delivery:
    """An edge publisher's end-to-end guarantee: see the module docstring.

    Call :meth:`submit` for each face, :meth:`tick` often (it does its work at most once a
    second) and feed the session's messages to :meth:`handle`; subscribe the session to
    :meth:`subscriptions`.
    """

    def __init__(
        self,
        publisher: BrokerPublisher,
        outbox: Outbox,
        *,
        ack_topic: str,
        bridge_state_topic: str | None,
        counters: Counters,
        ack_timeout: float = 60.0,
        reorder_grace: float | None = None,
        window: int = 100,
        rate: float = 20.0,
        resend_leftovers: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.publisher = publisher
        self.outbox = outbox
        self.ack_topic = ack_topic
        self.bridge_state_topic = bridge_state_topic or None
        self.counters = counters
        self.ack_timeout = ack_timeout
        self.reorder_grace = ack_timeout if reorder_grace is None else reorder_grace
        self.window = window
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        started = clock()
        # Without a state topic the bridge is taken as always up (a publisher with no bridge).
        self._bridge_up = self.bridge_state_topic is None
        self._bridge_since = started
        self._latest_acked = float("-inf")  # latest publish time of a face acked after 1 publish
        self._last_ack = started  # when an acknowledgement last arrived
        self._tokens = float(rate)
        self._last_tick = float("-inf")
        self._outbox_failing = False
        # Faces left by a previous run count as published now (they may still sit in a broker's
        # queue): republished if not acknowledged in time. With resend_leftovers, at once.
        if not resend_leftovers:
            for entry in outbox.entries():
                entry.published_at = started
                entry.publishes = 1

    def subscriptions(self) -> list[tuple[str, int]]:
        topics = [(self.ack_topic, 1)]
        if self.bridge_state_topic:
            topics.append((self.bridge_state_topic, 1))
        return topics

    @property
    def bridge_up(self) -> bool:
        with self._lock:
            return self._bridge_up

    # --- faces -------------------------------------------------------------------------

    def submit(self, face_id: str, payload: bytes) -> bool:
        """Accept a face (durably, before anything else) and publish it.

        Returns whether the broker client took it now; either way an accepted face is
        published again until it is acknowledged.
        """
        try:
            dropped = self.outbox.put(face_id, payload)
        except OSError as exc:  # disk full or failing: publish anyway, without the guarantee
            self.counters.inc("outbox_errors")
            if not self._outbox_failing:
                log.error(
                    "outbox %s: cannot write (%s); publishing without it", self.outbox.path, exc
                )
                self._outbox_failing = True
            return self.publisher.publish(payload)
        if self._outbox_failing:
            log.info("outbox %s: writing again", self.outbox.path)
            self._outbox_failing = False
        self.counters.inc("accepted")
        if dropped:
            self.counters.inc("outbox_dropped", len(dropped))
            log.warning(
                "outbox full (%d faces, %d bytes at most): dropped the %d oldest",
                self.outbox.max_faces,
                self.outbox.max_bytes,
                len(dropped),
            )
        taken = self.publisher.publish(payload, count=False)
        self.counters.inc("published" if taken else "publish_deferred")
        entry = self.outbox.get(face_id)
        if entry is not None and taken:
            entry.published_at = self._clock()
            entry.publishes += 1
        return taken

    # --- messages from the broker (paho's network thread) --------------------------------

    def handle(self, msg: paho.MQTTMessage) -> bool:
        """Take an acknowledgement or a bridge state; False if the message is neither."""
        if msg.topic == self.ack_topic:
            self._on_ack(bytes(msg.payload))
            return True
        if self.bridge_state_topic and msg.topic == self.bridge_state_topic:
            up = bytes(msg.payload).strip() == BRIDGE_UP
            with self._lock:
                changed = up != self._bridge_up
                self._bridge_up = up
                if changed and up:
                    self._bridge_since = self._clock()
            if changed:
                log.info("bridge %s", "connected" if up else "disconnected")
            return True
        return False

    def _on_ack(self, payload: bytes) -> None:
        try:
            face_ids = contract.decode_ack(payload)
        except contract.ContractError as exc:
            self.counters.inc("bad_acks")
            log.warning("ignored an acknowledgement on %s: %s", self.ack_topic, exc.detail)
            return
        latest = float("-inf")
        acked = 0
        for face_id in face_ids:
            entry = self.outbox.ack(face_id)
            if entry is not None:
                acked += 1
                if entry.publishes == 1:  # unambiguous: the ack answers that one publish
                    latest = max(latest, entry.published_at)
        if acked:
            self.counters.inc("e2e_acked", acked)
            with self._lock:
                self._latest_acked = max(self._latest_acked, latest)
                self._last_ack = self._clock()

    # --- the main loop -------------------------------------------------------------------

    def tick(self, force: bool = False) -> None:
        """Expire, republish what is due, update the gauges; at most once a second."""
        now = self._clock()
        if now - self._last_tick < 1.0 and not force:
            return
        elapsed = min(now - self._last_tick, 10.0)
        self._last_tick = now
        self._tokens = min(float(self.rate), self._tokens + elapsed * self.rate)
        expired = self.outbox.expire()
        if expired:
            self.counters.inc("outbox_expired", len(expired))
            log.warning(
                "outbox: dropped %d face(s) older than %.0fs (the writer would set them aside)",
                len(expired),
                self.outbox.max_age or 0,
            )
        before = self.counters.get("republished")
        self._republish(now)
        republished = self.counters.get("republished") - before
        if republished:
            log.info("republished %d unacknowledged face(s)", republished)
        self.counters.set_gauge("outbox_depth", self.outbox.depth)
        self.counters.set_gauge("outbox_bytes", self.outbox.size)
        self.counters.set_gauge("outbox_oldest_s", round(self.outbox.oldest_age(), 1))
        self.counters.set_gauge("bridge_up", 1.0 if self.bridge_up else 0.0)

    def _backoff(self, entry: Entry) -> float:
        """How long a face waits for its acknowledgement before a stall sends it again."""
        return min(MAX_BACKOFF, self.ack_timeout * 2 ** max(0, entry.publishes - 1))

    def due(self, now: float) -> list[Entry]:
        """The faces that should be published again now, oldest first (before pacing)."""
        with self._lock:
            if not self._bridge_up:
                return []
            since = self._bridge_since
            horizon = self._latest_acked - self.reorder_grace
            stalled = now - max(self._last_ack, since) >= self.ack_timeout
        return [
            entry
            for entry in self.outbox.entries()
            if entry.publishes == 0  # never published (a leftover, or the client's queue was full)
            or entry.published_at < horizon
            or (stalled and now - max(entry.published_at, since) >= self._backoff(entry))
        ]

    def _republish(self, now: float) -> int:
        if not self.publisher.session.connected.is_set():
            return 0
        waiting = sum(
            1
            for entry in self.outbox.entries()
            if entry.publishes > 1 and now - entry.published_at < self._backoff(entry)
        )
        budget = min(self.window - waiting, int(self._tokens))
        sent = 0
        for entry in self.due(now):
            if sent >= budget:
                break
            payload = self.outbox.read(entry)
            if payload is None:  # acknowledged meanwhile
                continue
            if not self.publisher.publish(payload, count=False):
                break  # the client's queue is full: later
            self.counters.inc("published" if entry.publishes == 0 else "republished")
            entry.published_at = now
            entry.publishes += 1
            sent += 1
        self._tokens -= sent
        return sent


# --- wiring for a publishing program (face-detector, facepipe-publish) ----------------------

OUTBOX_OPTIONS: Final = (
    Option(
        "outbox_dir",
        non_empty,
        None,
        "directory of the durable outbox: faces wait there until the cloud acknowledges them "
        "(unset: no outbox, faces are only as safe as the broker's persistence)",
    ),
    Option("outbox_max_faces", int_range(1, 10_000_000), 4000, "faces the outbox holds at most"),
    Option(
        "outbox_max_bytes",
        int_range(1024 * 1024, 1 << 40),
        128 * 1024 * 1024,
        "bytes the outbox holds at most (the oldest faces are dropped first)",
    ),
    Option(
        "outbox_max_age",
        float_range(60),
        7 * 86400.0,
        "seconds a face waits at most (match the writer's --max-age)",
    ),
    Option(
        "ack_timeout",
        float_range(1),
        60.0,
        "seconds without an acknowledgement (while the bridge is up) before a face goes again",
    ),
    Option("republish_rate", float_range(0.1), 20.0, "faces republished per second at most"),
    Option(
        "republish_window",
        int_range(1, 100_000),
        100,
        "republished faces waiting for their acknowledgement at most",
    ),
    Option(
        "bridge_state_topic",
        non_empty,
        None,
        "the bridge's retained 1/0 state topic on this broker: republish only while it is 1 "
        "(unset: always)",
    ),
)


@config_of(OUTBOX_OPTIONS)
@dataclass(frozen=True)
class OutboxConfig:
    """The outbox and republishing (face-detector, facepipe-publish, other publishers)."""

    outbox_dir: str | None
    outbox_max_faces: int
    outbox_max_bytes: int
    outbox_max_age: float
    ack_timeout: float
    republish_rate: float
    republish_window: int
    bridge_state_topic: str | None


# What a publishing program of its own needs (a third party's, the lab's load generator).
PUBLISHER_OPTIONS: Final = (*OUTBOX_OPTIONS, *MQTT_OPTIONS, *LOGGING_OPTIONS)


@config_of(PUBLISHER_OPTIONS)
@dataclass(frozen=True)
class PublisherConfig:
    outbox: OutboxConfig
    mqtt: MqttConfig
    logging: LoggingConfig


@dataclass
class Publishing:
    """A publishing program's MQTT side: the session, the broker publisher, and the
    end-to-end :class:`Delivery` when an outbox is configured."""

    session: MqttSession
    publisher: BrokerPublisher
    delivery: Delivery | None

    def submit(self, face_id: str, payload: bytes) -> bool:
        if self.delivery is not None:
            return self.delivery.submit(face_id, payload)
        return self.publisher.publish(payload)

    def tick(self, force: bool = False) -> None:
        if self.delivery is not None:
            self.delivery.tick(force)

    def unfinished(self) -> int:
        """Faces accepted but not yet acknowledged by the cloud (0 without an outbox)."""
        return self.delivery.outbox.depth if self.delivery else 0

    def outbox_full(self) -> bool:
        outbox = self.delivery.outbox if self.delivery else None
        return outbox is not None and outbox.depth >= outbox.max_faces

    def close(self) -> None:
        if self.delivery is not None:
            self.delivery.outbox.close()


def start_publishing(
    outbox_cfg: OutboxConfig,
    mqtt_cfg: MqttConfig,
    settings: MqttSettings,
    *,
    device: str,
    counters: Counters,
    will: Will | None = None,
    max_queued: int = 0,
    max_pending: int = 1000,
    resend_leftovers: bool = False,
    durable: bool | None = None,
) -> Publishing:
    """Open the outbox (if ``--outbox-dir``), build the session and the publishers.

    The session is not started; with an outbox it is subscribed to the ack and bridge-state
    topics and, unless ``durable`` says otherwise, durable (acknowledgements wait for us while
    we restart).
    """
    outbox = None
    if outbox_cfg.outbox_dir:
        try:
            outbox = Outbox(
                Path(outbox_cfg.outbox_dir),
                max_faces=outbox_cfg.outbox_max_faces,
                max_bytes=outbox_cfg.outbox_max_bytes,
                max_age=outbox_cfg.outbox_max_age,
            )
        except OutboxError as exc:
            raise ConfigError(f"--outbox-dir / FACEPIPE_OUTBOX_DIR: {exc}") from None
    holder: list[Delivery] = []

    def on_message(msg: paho.MQTTMessage) -> None:
        if holder:
            holder[0].handle(msg)

    ack = contract.ack_topic(mqtt_cfg.topic_prefix, device)
    state_topic = outbox_cfg.bridge_state_topic
    subscriptions = [(ack, 1)] + ([(state_topic, 1)] if state_topic else [])
    session = MqttSession(
        settings,
        durable=outbox is not None if durable is None else durable,
        will=will,
        subscriptions=subscriptions if outbox is not None else [],
        on_message=on_message,
        max_queued=max_queued,
    )
    publisher = BrokerPublisher(
        session,
        contract.face_topic(mqtt_cfg.topic_prefix, device),
        mqtt_cfg.qos,
        max_pending,
        counters,
    )
    delivery = None
    if outbox is not None:
        delivery = Delivery(
            publisher,
            outbox,
            ack_topic=ack,
            bridge_state_topic=state_topic,
            counters=counters,
            ack_timeout=outbox_cfg.ack_timeout,
            window=outbox_cfg.republish_window,
            rate=outbox_cfg.republish_rate,
            resend_leftovers=resend_leftovers,
        )
        holder.append(delivery)
    return Publishing(session, publisher, delivery)
