"""What the broker says about its own queue, as a program's counters and gauges.

Mosquitto publishes figures under ``$SYS`` every ``sys_interval`` seconds (10 by default).
Two of them tell a user what no client can see by itself:

- ``broker_dropped``: messages the broker threw away because a client's queue was full
  (``max_queued_messages`` / ``max_queued_bytes``), since the broker started. On the cloud
  broker that is faces lost for the writer; on an edge broker, faces its bridge could not
  queue (the outbox sends them again). Mosquitto logs it only once per client per episode.
- ``broker_queued``: messages the broker holds besides retained ones: faces waiting for a
  writer or for the bridge, acknowledgements waiting for an edge. A growing figure is a
  backlog; near the queue limit, drops follow.

Both are left out of the stats line and the metrics until the broker's first figures arrive
(logged once: "the broker's figures arrive"). A Mosquitto whose ACL does not let the program
read ``$SYS`` accepts the subscription and sends nothing: no such line, no figures. (A broker
that refuses the subscription outright gets a WARNING once per connection.)
"""

from __future__ import annotations

import logging
from typing import Final

import paho.mqtt.client as paho

from facepipe.mqtt import MqttSession
from facepipe.stats import Counters

log = logging.getLogger(__name__)

DROPPED: Final = "$SYS/broker/publish/messages/dropped"
STORED: Final = "$SYS/broker/store/messages/count"
RETAINED: Final = "$SYS/broker/retained messages/count"

COUNTERS: Final = ("broker_dropped",)
GAUGES: Final = ("broker_queued",)
# Unknown until the broker's first figures arrive: absent from the stats line and the metrics
# until then (Counters(unknown=...)), so a restarted service never reports a false 0.
FIGURES: Final = (*COUNTERS, *GAUGES)
MAX_DIGITS: Final = 20  # a 64-bit count; anything longer is not a figure


def _figure(payload: bytes | bytearray) -> int | None:
    text = payload[: MAX_DIGITS + 1].strip()
    if not text.isdigit() or len(text) > MAX_DIGITS:
        return None
    return int(text)


class BrokerStats:
    """Keeps ``broker_dropped`` and ``broker_queued`` in ``counters`` from the broker's ``$SYS``."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._stored: int | None = None
        self._retained: int | None = None
        self._announced = False

    def attach(self, session: MqttSession) -> None:
        """Subscribe ``session`` to the figures (before it starts)."""
        for topic in (DROPPED, STORED, RETAINED):
            session.watch(topic, self.on_message)

    def on_message(self, msg: paho.MQTTMessage) -> None:
        value = _figure(msg.payload)
        if value is None:
            log.debug("ignored %s: not a count", msg.topic)
            return
        if msg.topic == DROPPED:
            # The broker's own total: it goes back to 0 when the broker restarts, which
            # Prometheus reads as a counter reset.
            self.counters.set_total("broker_dropped", value)
            return
        if msg.topic == STORED:
            self._stored = value
        elif msg.topic == RETAINED:
            self._retained = value
        if self._stored is not None and self._retained is not None:
            queued = max(0, self._stored - self._retained)
            self.counters.set_gauge("broker_queued", queued)
            if not self._announced:  # once: the figures flow (the broker lets us read $SYS)
                log.info("the broker's figures arrive: %d message(s) queued", queued)
                self._announced = True
