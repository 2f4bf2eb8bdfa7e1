"""End-to-end delivery: outbox -> broker -> writer -> S3 -> ack -> the outbox forgets.

Rules of republishing with a fake clock, then the real thing: a real mosquitto that is
SIGKILLed (its queue since the last snapshot is gone), the real writer, moto; and the
facepipe-publish command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
from conftest import Broker, free_port, program_env, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from test_writer import (
    _no_leaked_writers,  # noqa: F401 (autouse: no leaked writers)
    start_writer,
    stop_writer,
    writer_env,
)
from writer_helpers import jpeg_bytes, make_face

from facepipe import contract
from facepipe.config import parse_config
from facepipe.delivery import (
    DELIVERY_COUNTERS,
    DELIVERY_GAUGES,
    Delivery,
    PublisherConfig,
    start_publishing,
)
from facepipe.mqtt import MqttSettings
from facepipe.outbox import Outbox
from facepipe.stats import Counters

MIB = 1024 * 1024
DEVICE = "cam-1"
ACK = contract.ack_topic("faces", DEVICE)
STATE = f"bridges/{DEVICE}/state"


# --- the rules, with a fake clock and a fake broker client ---------------------------------


@dataclass
class FakePublisher:
    sent: list[bytes] = field(default_factory=list)
    session: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(connected=threading.Event())
    )

    def __post_init__(self) -> None:
        self.session.connected.set()

    def publish(self, payload: bytes, count: bool = True) -> bool:
        self.sent.append(payload)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(topic: str, payload: bytes) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    return msg


def delivery(tmp_path: Path, clock: Clock, **kw) -> tuple[Delivery, FakePublisher, Outbox]:
    pub = FakePublisher()
    box = Outbox(tmp_path / "o", max_faces=1000, max_bytes=64 * MIB)
    counters = Counters([*DELIVERY_COUNTERS, "published"], DELIVERY_GAUGES)
    d = Delivery(
        pub,  # type: ignore[arg-type]
        box,
        ack_topic=ACK,
        bridge_state_topic=STATE,
        counters=counters,
        clock=clock,
        **kw,
    )
    return d, pub, box


def submit(d: Delivery, clock: Clock, n: int, start: int = 0, step: float = 1.0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        meta, payload = make_face(DEVICE, i)
        d.submit(meta.face_id, payload)
        ids.append(meta.face_id)
        clock.now += step
    return ids


def test_nothing_is_republished_while_the_bridge_is_down(tmp_path):
    clock = Clock()
    d, pub, _ = delivery(tmp_path, clock, ack_timeout=60)
    submit(d, clock, 5)
    d.handle(message(STATE, b"0"))
    clock.now += 3600
    d.tick()
    assert len(pub.sent) == 5  # the first publishes only
    d.handle(message(STATE, b"1"))  # the timeout runs from the moment the bridge came up
    clock.now += 59
    d.tick()
    assert len(pub.sent) == 5
    clock.now += 2
    d.tick()
    assert len(pub.sent) == 10


def test_a_later_face_acknowledged_means_the_older_ones_were_lost(tmp_path):
    clock = Clock()
    d, pub, box = delivery(tmp_path, clock, ack_timeout=600, reorder_grace=20)
    d.handle(message(STATE, b"1"))
    early = submit(d, clock, 3)  # published at 1000, 1001, 1002
    clock.now += 30
    late = submit(d, clock, 1)  # published at 1033
    d.handle(message(ACK, contract.encode_ack(late)))
    assert late[0] not in box and all(f in box for f in early)
    d.tick()  # horizon 1013: the three early faces were lost on the way
    assert len(pub.sent) == 4 + 3
    assert d.counters.get("republished") == 3 and d.counters.get("e2e_acked") == 1
    d.handle(message(ACK, contract.encode_ack(early)))
    assert box.depth == 0


def test_republishing_is_paced_by_a_window_and_a_rate(tmp_path):
    clock = Clock()
    d, pub, box = delivery(tmp_path, clock, ack_timeout=10, window=30, rate=20)
    d.handle(message(STATE, b"1"))
    submit(d, clock, 200, step=0.0)
    clock.now += 11
    d.tick()
    assert len(pub.sent) == 200 + 20  # the rate: 20 a second
    clock.now += 1
    d.tick()
    assert len(pub.sent) == 200 + 30  # the window: 30 republished faces wait at most
    clock.now += 1
    d.tick()
    assert len(pub.sent) == 200 + 30
    d.handle(message(ACK, contract.encode_ack([e.face_id for e in box.entries()[:100]])))
    clock.now += 1
    d.tick()
    assert len(pub.sent) == 200 + 30  # acknowledgements flow again: no reason to resend
    clock.now += 10
    d.tick()
    assert len(pub.sent) == 200 + 30 + 20  # stalled again: room in the window, the rate


def drain(tmp_path: Path, outage: float, rate: float, writer_outage: bool) -> dict[str, float]:
    """1 face/s accepted; the bridge (or the writer) is away for ``outage`` s, then the backlog
    drains in order at ``rate`` faces/s, each acknowledged a second after delivery."""
    clock = Clock()
    queue: list[str] = []
    copies: dict[str, int] = {}
    pub = FakePublisher()
    pub.publish = lambda payload, count=True: queue.append(payload.decode()) or True  # type: ignore[method-assign]
    box = Outbox(tmp_path / "d", max_faces=100_000, max_bytes=1 << 34)
    counters = Counters([*DELIVERY_COUNTERS, "published"], DELIVERY_GAUGES)
    d = Delivery(pub, box, ack_topic=ACK, bridge_state_topic=STATE, counters=counters, clock=clock)  # type: ignore[arg-type]
    d.handle(message(STATE, b"1" if writer_outage else b"0"))
    acks: list[tuple[float, str]] = []
    t, credit, up, peak = 0.0, 0.0, False, 0
    while t < outage + 4 * 3600:
        if round(t * 10) % 10 == 0:
            fid = str(uuid.uuid4())
            d.submit(fid, fid.encode())
        if not up and t >= outage:
            up = True
            if not writer_outage:
                d.handle(message(STATE, b"1"))
        if up:
            credit += rate * 0.1
            while credit >= 1 and queue:
                credit -= 1
                fid = queue.pop(0)
                copies[fid] = copies.get(fid, 0) + 1
                acks.append((t + 1.0, fid))
            while acks and acks[0][0] <= t:
                d.handle(message(ACK, contract.encode_ack([acks.pop(0)[1]])))
        d.tick()
        peak = max(peak, len(queue))
        if up and not queue and box.depth <= 2 and t > outage + 60:
            break
        t += 0.1
        clock.now += 0.1
    return {
        "drained_s": t - outage,
        "ideal_s": outage / (rate - 1),
        "republished": counters.get("republished"),
        "max_copies": max(copies.values()),
        "peak_queue": peak,
    }


@pytest.mark.parametrize(
    ("outage", "rate"), [(600, 3), (3600, 10)], ids=["10min-3per_s", "1h-10per_s"]
)
def test_a_backlog_that_drains_in_order_is_not_republished(tmp_path, outage, rate):
    """After a long link outage the queued faces arrive in order, slowly: acknowledgements keep
    coming, so nothing is sent twice and the queue never grows past the backlog."""
    result = drain(tmp_path, outage, rate, writer_outage=False)
    assert result["republished"] == 0, result
    assert result["max_copies"] == 1, result
    assert result["drained_s"] <= result["ideal_s"] * 1.1 + 30, result
    assert result["peak_queue"] <= outage + 5, result


def test_a_writer_outage_costs_few_republished_faces(tmp_path):
    """With the bridge up and the writer away, nothing is acknowledged: a stall, which the
    edge cannot tell from lost faces. The backoff and the window bound what it sends again."""
    result = drain(tmp_path, 1800, 10, writer_outage=True)
    print(result)
    assert result["republished"] <= 0.25 * 1800, result
    assert result["max_copies"] <= 6, result
    assert result["drained_s"] <= result["ideal_s"] * 1.3 + 60, result


def test_bad_acks_are_counted_and_ignored(tmp_path):
    clock = Clock()
    d, _, box = delivery(tmp_path, clock)
    ids = submit(d, clock, 2)
    for bad in [b"", b"not json", b'{"v":1,"face_ids":["x"]}', b"[" * 5000, b'{"v":2}']:
        d.handle(message(ACK, bad))
    assert d.counters.get("bad_acks") == 5 and box.depth == 2
    d.handle(message(ACK, contract.encode_ack([*ids, str(uuid.uuid4())])))  # one unknown id
    assert box.depth == 0 and d.counters.get("e2e_acked") == 2


def test_leftovers_of_a_crash_go_out_again(tmp_path):
    clock = Clock()
    box = Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB)
    for i in range(3):
        meta, payload = make_face(DEVICE, i)
        box.put(meta.face_id, payload)
    box.close()
    d, pub, _ = delivery(tmp_path, clock, ack_timeout=60)
    d.handle(message(STATE, b"1"))
    d.tick()
    assert pub.sent == []  # they may still sit in a broker queue: wait for the timeout
    clock.now += 61
    d.tick()
    assert len(pub.sent) == 3


# --- the real thing: mosquitto, the writer, moto -------------------------------------------


def stop(proc: subprocess.Popen) -> None:
    assert stop_writer(proc, timeout=30) == 0


def face_ids_in(s3) -> list[str]:
    return [k.rsplit("_", 1)[1].removesuffix(".jpg") for k in s3.keys("faces/")]


def publishing_for(broker: Broker, outbox: Path | None, **extra: str):
    argv = [f"--mqtt-port={broker.port}", f"--mqtt-host={broker.host}"]
    argv += [f"--mqtt-client-id=pub-{uuid.uuid4().hex[:6]}"]
    if outbox is not None:
        argv.append(f"--outbox-dir={outbox}")
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    cfg = parse_config(PublisherConfig, "test", "", argv, {})
    counters = Counters(
        ["published", "publish_dropped", "acked", *DELIVERY_COUNTERS], DELIVERY_GAUGES
    )
    settings = MqttSettings.from_config(cfg.mqtt, default_client_id="unused")
    pub = start_publishing(cfg.outbox, cfg.mqtt, settings, device=DEVICE, counters=counters)
    pub.session.start()
    assert pub.session.wait_connected(10)
    return pub, counters


@pytest.fixture
def crashy_broker(tmp_path):
    """A broker that snapshots its state only on a clean stop (autosave an hour away)."""
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Broker(workdir, autosave=3600)
    broker.start()
    yield broker
    broker.stop()


def test_faces_a_killed_broker_lost_are_published_again(crashy_broker, s3, tmp_path):
    """The broker queues faces for the (stopped) writer, then dies by SIGKILL before its next
    snapshot. Without an outbox those faces are gone; with one, every face reaches S3 once."""
    log = tmp_path / "writer.log"
    env = writer_env(crashy_broker, s3)
    stop(start_writer(env, log))  # its durable session now waits in the broker
    plain, _ = publishing_for(crashy_broker, None)
    durable, counters = publishing_for(crashy_broker, tmp_path / "outbox", ack_timeout="3")
    lost_ids, kept_ids = [], []
    for i in range(30):
        meta, payload = make_face(DEVICE, i)
        assert plain.submit(meta.face_id, payload)
        lost_ids.append(meta.face_id)
        meta, payload = make_face(DEVICE, 100 + i)
        assert durable.submit(meta.face_id, payload)
        kept_ids.append(meta.face_id)
    wait_for(lambda: plain.publisher.pending() == 0, 10, "the broker to take the plain faces")
    wait_for(lambda: durable.publisher.pending() == 0, 10, "the broker to take the others")
    crashy_broker.kill()
    crashy_broker.start()
    writer = start_writer(env, log)
    try:
        wait_for(
            lambda: (durable.tick(), durable.delivery.outbox.depth == 0)[1],
            60,
            "the outbox to empty",
        )
        stored = face_ids_in(s3)
        assert sorted(stored) == sorted(kept_ids), "every face of the outbox, once"
        assert not set(lost_ids) & set(stored), "the broker kept faces it had not saved?"
        assert counters.get("republished") >= 30 and counters.get("e2e_acked") == 30
    finally:
        stop(writer)
        for p in (plain, durable):
            p.session.stop()
            p.close()


def test_writer_acknowledges_every_face_it_is_done_with(mosquitto, s3, tmp_path):
    """Stored faces, and a readable face set aside for its contract (here captured long ago,
    as from an edge whose clock is wrong): kept whole under rejected/ and acknowledged, so the
    edge stops sending it."""
    acks: list[str] = []
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: acks.extend(contract.decode_ack(m.payload))
    client.connect(mosquitto.host, mosquitto.port)
    client.subscribe("faces-ack/+", qos=1)
    client.loop_start()
    log = tmp_path / "writer.log"
    writer = start_writer(writer_env(mosquitto, s3), log)
    try:
        good = [make_face(DEVICE, i) for i in range(300)]  # more than one ack message holds
        old = contract.validate_metadata(
            {**make_face(DEVICE, 1)[0].to_json_dict(), "captured_at": "2000-01-01T00:00:00Z"}
        )
        client.publish(
            contract.face_topic("faces", DEVICE), contract.encode_face(jpeg_bytes(1), old), qos=1
        )
        for _, payload in good:
            client.publish(contract.face_topic("faces", DEVICE), payload, qos=1)
        want = {m.face_id for m, _ in good}
        wait_for(lambda: set(acks) >= want | {old.face_id}, 30, "acknowledgements of every face")
        rejected = s3.keys("rejected/")
        assert len(rejected) == 1 and len(face_ids_in(s3)) == 300
        copy = s3.client.get_object(Bucket=s3.bucket, Key=rejected[0])
        assert copy["Metadata"]["reason"] == "too_old" and copy["Metadata"]["truncated"] == "false"
        assert contract.decode_face(copy["Body"].read())[0] == old  # whole
    finally:
        stop(writer)
        client.loop_stop()


def run_publish(broker, outbox: Path, *args: str, wait: str = "20") -> subprocess.CompletedProcess:
    env = program_env(
        broker.env,
        {
            "FACEPIPE_OUTBOX_DIR": str(outbox),
            "FACEPIPE_DEVICE_ID": DEVICE,
            "FACEPIPE_WAIT": wait,
            "FACEPIPE_ACK_TIMEOUT": "2",
        },
    )
    return subprocess.run(
        [sys.executable, "-m", "facepipe.publish", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_facepipe_publish_keeps_faces_until_the_cloud_has_them(mosquitto, s3, tmp_path):
    files = []
    for i in range(3):  # plain JPEGs: the command adds the metadata
        path = tmp_path / f"plain-{i}.jpg"
        path.write_bytes(jpeg_bytes(i))
        files.append(str(path))
    for i in range(2):  # already face messages
        path = tmp_path / f"face-{i}.jpg"
        path.write_bytes(make_face(DEVICE, i)[1])
        files.append(str(path))
    outbox = tmp_path / "outbox"
    # No writer yet: nothing is acknowledged, the faces stay in the outbox.
    first = run_publish(mosquitto, outbox, *files, wait="2")
    assert first.returncode == 3, first.stderr
    assert len(list(outbox.glob("*.face"))) == 5
    env = writer_env(mosquitto, s3)  # one client id: a second one would be dealt a share too
    writer = start_writer(env, tmp_path / "writer.log")
    try:
        second = run_publish(mosquitto, outbox)  # no files: what waits goes out again
        assert second.returncode == 0, second.stderr
        assert not list(outbox.glob("*.face"))
        stored = s3.keys("faces/")
        assert len(stored) == 5
        heads = [s3.client.head_object(Bucket=s3.bucket, Key=k)["Metadata"] for k in stored]
        assert sorted(h["detector"] for h in heads) == ["external"] * 3 + ["test"] * 2
    finally:
        stop(writer)
    # The same plain JPEG again is the same face: one object, not two.
    writer = start_writer(env, tmp_path / "writer.log")
    try:
        again = run_publish(mosquitto, outbox, files[0])
        assert again.returncode == 0, again.stderr
        assert len(s3.keys("faces/")) == 5
    finally:
        stop(writer)
    full = run_publish(mosquitto, outbox, *files, "--outbox-max-faces=2")
    assert full.returncode == 2 and "do not fit" in full.stderr, full.stderr
    old = (
        tmp_path / "old.jpg"
    )  # copied with its time kept, ten days ago: the writer would refuse it
    old.write_bytes(jpeg_bytes(9))
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    refused_old = run_publish(mosquitto, outbox, str(old))
    assert refused_old.returncode == 2 and "older than" in refused_old.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    refused = run_publish(mosquitto, outbox, str(bad))
    assert refused.returncode == 2 and "bad.jpg" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_test_face_reports_where_it_is_stored_once_the_cloud_has_it(mosquitto, s3, tmp_path):
    """What the deploy check (playbooks/check.yml) relies on: --test-face sends one marked face,
    --report says on stdout whether the cloud acknowledged it and under which key it is stored."""
    outbox = tmp_path / "outbox"
    # No writer: the face waits, and the report says so.
    args = ("--test-face", "--report", "--detector=deploy-check")
    alone = run_publish(mosquitto, outbox, *args, wait="2")
    assert alone.returncode == 3, alone.stderr
    waited = json.loads(alone.stdout)
    assert waited["device_id"] == DEVICE and waited["waiting"] == 1
    assert [f["acknowledged"] for f in waited["faces"]] == [False]
    assert waited["broker_connected"] is True and waited["bridge_up"] is None  # no state topic
    # No broker at all: the report says the face never left this host.
    nobody = SimpleNamespace(env={**mosquitto.env, "FACEPIPE_MQTT_PORT": str(free_port())})
    unreachable = run_publish(nobody, tmp_path / "outbox-2", *args, wait="2")
    assert unreachable.returncode == 3, unreachable.stderr
    assert json.loads(unreachable.stdout)["broker_connected"] is False
    writer = start_writer(writer_env(mosquitto, s3), tmp_path / "writer.log")
    try:
        sent = run_publish(mosquitto, outbox, *args)
        assert sent.returncode == 0, sent.stderr
        body = json.loads(sent.stdout)  # stdout is the report alone
        assert body["waiting"] == 0 and body["broker_connected"] and body["seconds"] > 0
        (face,) = body["faces"]
        assert face["acknowledged"] and face["face_id"] != waited["faces"][0]["face_id"]
        assert face["key"].startswith(f"{DEVICE}/")
        assert face["key"].endswith(f"_{face['face_id']}.jpg")
        stored = s3.client.get_object(Bucket=s3.bucket, Key=f"faces/{face['key']}")
        assert stored["Metadata"]["detector"] == "deploy-check"
        assert stored["Metadata"]["captured-at"] == face["captured_at"]
        image = cv2.imdecode(np.frombuffer(stored["Body"].read(), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[:2] == (120, 360)
        # The face the first run left in the outbox went out too: two test faces, two objects.
        assert len(s3.keys(f"faces/{DEVICE}/")) == 2
    finally:
        stop(writer)
