"""The MQTT session both programs use: paho-mqtt 2.x, reconnecting forever.

paho's network thread (``loop_start``) retries the first connection and every later one with
capped exponential backoff, so a broker that is down or restarting never ends a service. Each
new socket gets TCP_NODELAY: face messages are small and Nagle's delay would stall QoS 1 acks.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from facepipe.config import MqttConfig, read_secret

log = logging.getLogger(__name__)
# paho's packet log: setup_logging keeps it at WARNING unless the level is debug.
PAHO_LOG: Final = log.getChild("paho")

RECONNECT_MIN_DELAY = 1
RECONNECT_MAX_DELAY = 30
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600  # a durable subscriber's queue survives a week away


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    username: str | None
    password: str | None
    tls_ca: str | None
    client_id: str
    protocol: str  # "5" or "3.1.1"
    keepalive: int

    @classmethod
    def from_config(cls, cfg: MqttConfig, default_client_id: str) -> MqttSettings:
        password = read_secret(
            cfg.mqtt_password_file,
            "mqtt-password",
            "--mqtt-password-file / FACEPIPE_MQTT_PASSWORD_FILE",
        )
        return cls(
            host=cfg.mqtt_host,
            port=cfg.mqtt_port,
            username=cfg.mqtt_username,
            password=password,
            tls_ca=str(cfg.mqtt_tls_ca) if cfg.mqtt_tls_ca else None,
            client_id=cfg.mqtt_client_id or default_client_id,
            protocol=cfg.mqtt_protocol,
            keepalive=cfg.mqtt_keepalive,
        )

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    def describe(self) -> str:
        """Where we connect, for logs (never the password)."""
        scheme = "mqtts" if self.tls_ca else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port} as {self.client_id} (v{self.protocol})"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


MessageHandler = Callable[[paho.MQTTMessage], None]


class MqttSession:
    """A paho client with the project's defaults, connected in the background.

    ``durable=True`` asks the broker to keep the session (and queue QoS 1 messages for our
    subscriptions) while we are away: a fixed client id plus ``clean_session=False`` on
    MQTT 3.1.1, or ``clean_start=False`` with a session expiry interval on MQTT 5.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        durable: bool = False,
        will: Will | None = None,
        subscriptions: Iterable[tuple[str, int]] = (),
        on_message: MessageHandler | None = None,
        manual_ack: bool = False,
        max_inflight: int = 20,
        max_queued: int = 0,
        receive_maximum: int | None = None,
        maximum_packet_size: int | None = None,
    ) -> None:
        self.settings = settings
        # MQTT v5 Receive Maximum: the broker sends at most this many unacknowledged QoS 1
        # messages, so with manual_ack a busy consumer gets back-pressure without ever
        # blocking paho's network thread (which would starve keepalive, paho #328).
        self.receive_maximum = receive_maximum
        # MQTT v5 Maximum Packet Size: the broker drops (never sends) anything larger, so a
        # huge message never reaches this process. MQTT 3.1.1 has no such limit.
        self.maximum_packet_size = maximum_packet_size
        self.durable = durable
        self.subscriptions = list(subscriptions)
        self._watched: set[str] = set()  # topics of watch(): a refusal is a warning, not an error
        self._suback: dict[int, str] = {}  # SUBSCRIBE packet id -> topic, for the SUBACK's log line
        self._on_message_handler = on_message
        self.connected = threading.Event()
        self._ever_connected = False
        self._last_failure: str | None = None
        self.connects = 0
        protocol = paho.MQTTv5 if settings.v5 else paho.MQTTv311
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=protocol,
            clean_session=None if settings.v5 else not durable,
            manual_ack=manual_ack,
        )
        self.client.enable_logger(PAHO_LOG)
        self.client.reconnect_delay_set(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(max_queued)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca:
            self.client.tls_set(ca_certs=settings.tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            self.client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def watch(self, topic: str, handler: MessageHandler) -> None:
        """Also subscribe to ``topic`` at QoS 0 and hand its messages to ``handler`` (never to
        ``on_message``). For side information such as the broker's ``$SYS`` figures: a broker
        that refuses it only costs that information (logged once per connection).
        Call before :meth:`start`."""
        self.subscriptions.append((topic, 0))
        self._watched.add(topic)
        self.client.message_callback_add(topic, lambda _c, _u, msg: handler(msg))

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; retries forever with capped backoff."""
        extra: dict[str, object] = {}
        if self.settings.v5:  # paho refuses clean_start/properties on MQTT 3.1.1
            properties = Properties(PacketTypes.CONNECT)
            if self.durable:
                properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
                extra["clean_start"] = False
            if self.receive_maximum is not None:
                properties.ReceiveMaximum = self.receive_maximum
            if self.maximum_packet_size is not None:
                properties.MaximumPacketSize = self.maximum_packet_size
            extra["properties"] = properties
        log.info("connecting to %s", self.settings.describe())
        self.client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive,
            **extra,  # type: ignore[arg-type]
        )
        self.client.loop_start()

    @property
    def ever_connected(self) -> bool:
        """Whether the broker accepted a connection since start()."""
        return self._ever_connected

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self.connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        # paho 2.2 logs "Client is not connected" at ERROR from its loop right after every
        # clean disconnect; nothing useful is logged past this point, so stop its logger first.
        self.client.disable_logger()
        if self.connected.is_set():
            info = self.client.disconnect()
            deadline = time.monotonic() + timeout
            while self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)
            if info not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("disconnect returned %s", info)
        else:
            self.client.disconnect()
        self.client.loop_stop()

    # --- operations -----------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message received with ``manual_ack=True``."""
        self.client.ack(mid, qos)

    @staticmethod
    def wait_published(infos: Iterable[paho.MQTTMessageInfo], timeout: float) -> bool:
        """Wait until every publish is acknowledged (QoS >= 1) or sent (QoS 0)."""
        deadline = time.monotonic() + timeout
        for info in infos:
            while not info.is_published():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
        return True

    # --- callbacks (paho's network thread) -------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._report_failure(f"broker refused the connection: {reason}")
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket included
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # pragma: no cover - exotic sockets only
                log.debug("TCP_NODELAY not set: %s", exc)
        self.connects += 1
        self._last_failure = None
        log.info(
            "connected to %s (session present: %s)",
            self.settings.describe(),
            flags.session_present,
        )
        self._ever_connected = True
        self._suback.clear()  # SUBACKs a lost connection never got (paho does not send those again)
        for topic, qos in self.subscriptions:
            result, mid = client.subscribe(topic, qos=qos)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._suback[mid] = topic
        self.connected.set()

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        self._report_failure("cannot reach the broker; retrying with backoff")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected and reason.is_failure:
            log.warning("connection lost: %s; reconnecting", reason)
        elif was_connected:
            log.info("disconnected")

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        topic = self._suback.pop(mid, "?")
        failed = ", ".join(str(rc) for rc in reason_codes if rc.is_failure)
        if not failed:
            if topic not in self._watched:
                log.info("subscribed to %s", topic)
        elif topic in self._watched:
            log.warning("subscription to %s refused: %s; going on without it", topic, failed)
        else:
            log.error("subscription to %s refused: %s", topic, failed)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if self._on_message_handler is not None:
            self._on_message_handler(msg)

    def _report_failure(self, text: str) -> None:
        if text != self._last_failure:  # once per state change, not once per retry
            log.warning("%s: %s", self.settings.describe(), text)
            self._last_failure = text
