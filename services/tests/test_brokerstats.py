"""The broker's own figures ($SYS) as counters: drops from a full queue, and the backlog."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as paho
from conftest import Broker, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from writer_helpers import Publisher

from facepipe import brokerstats
from facepipe.brokerstats import BrokerStats
from facepipe.mqtt import MqttSession, MqttSettings
from facepipe.stats import Counters


def park_a_durable_subscriber(broker: Broker, client_id: str, topic: str) -> None:
    """Subscribe with a session that outlives the connection, then leave: the broker queues."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        info = client.subscribe(topic, qos=1)
        assert info[0] == paho.MQTT_ERR_SUCCESS
        wait_for(lambda: client.is_connected(), 10, "the subscriber to connect")
        client.publish("probe", b"x", qos=1).wait_for_publish(10)  # after the SUBACK, in order
    finally:
        client.disconnect()
        client.loop_stop()


def watcher(broker: Broker, counters: Counters) -> MqttSession:
    settings = MqttSettings(broker.host, broker.port, None, None, None, "watcher", "5", 30)
    session = MqttSession(settings)
    BrokerStats(counters).attach(session)
    session.start()
    return session


def test_a_full_queue_shows_as_drops_and_the_backlog_as_queued(tmp_path: Path):
    broker = Broker(tmp_path, max_queued=5, sys_interval=1)
    broker.start()
    try:
        park_a_durable_subscriber(broker, "writer-away", "faces/#")
        publisher = Publisher(broker.host, broker.port)
        try:
            publisher.publish_all([("faces/cam-1", b"face %d" % i) for i in range(12)])
        finally:
            publisher.close()
        counters = Counters(brokerstats.COUNTERS, brokerstats.GAUGES)
        session = watcher(broker, counters)
        try:
            wait_for(lambda: counters.get("broker_dropped") == 7, 10, "7 drops")
            wait_for(lambda: counters.gauges()["broker_queued"] == 5, 10, "5 queued")
        finally:
            session.stop()
    finally:
        broker.stop()


def test_figures_that_are_not_counts_are_ignored():
    counters = Counters(brokerstats.COUNTERS, brokerstats.GAUGES)
    stats = BrokerStats(counters)
    for payload in (b"", b"-3", b"1e9", b"9" * 40, b"\xff", b"12 seconds"):
        message = paho.MQTTMessage(topic=brokerstats.DROPPED.encode())
        message.payload = payload
        stats.on_message(message)
    assert counters.get("broker_dropped") == 0
    for topic, value in ((brokerstats.STORED, b"40"), (brokerstats.RETAINED, b"52")):
        message = paho.MQTTMessage(topic=topic.encode())
        message.payload = value
        stats.on_message(message)
    assert counters.gauges()["broker_queued"] == 0  # never below zero (figures of two moments)


def test_the_figures_stay_out_of_the_stats_and_metrics_until_the_broker_sends_them():
    """A restarted service must not report 0 drops and then the broker's total: Prometheus would
    read that jump as new drops."""
    counters = Counters(["stored"], ["in_flight"], unknown=brokerstats.FIGURES)
    assert set(counters.snapshot()) == {"stored"} and set(counters.gauges()) == {"in_flight"}
    stats = BrokerStats(counters)
    for topic, value in (
        (brokerstats.DROPPED, b"7"),
        (brokerstats.STORED, b"60"),
        (brokerstats.RETAINED, b"55"),
    ):
        message = paho.MQTTMessage(topic=topic.encode())
        message.payload = value
        stats.on_message(message)
    assert counters.snapshot()["broker_dropped"] == 7
    assert counters.gauges()["broker_queued"] == 5
