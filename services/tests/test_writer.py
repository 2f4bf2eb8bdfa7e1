"""face-writer against a real mosquitto and a real (moto) S3 endpoint."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import Broker, free_port, program_env, start_program, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from writer_helpers import FACE_TIME_BASE, Publisher, final_counter, jpeg_bytes, log_text, make_face

from facepipe import contract


def writer_env(mosquitto, s3, **extra: str) -> dict[str, str]:
    return program_env(
        mosquitto.env,
        s3.env,
        {"FACEPIPE_MQTT_CLIENT_ID": f"w-{uuid.uuid4().hex[:8]}", "FACEPIPE_WORKERS": "4"},
        extra,
    )


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leaked_writers():
    """A failed assertion must not leave a writer running (it holds a durable session)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start_writer(env: dict[str, str], log: Path) -> subprocess.Popen:
    before = log_text(log).count("subscribed to")
    proc = start_program("writer", env, log=log)
    _started.append(proc)
    wait_for(
        lambda: log_text(log).count("subscribed to") > before or proc.poll() is not None,
        15,
        "the writer to subscribe",
    )
    assert proc.poll() is None, log_text(log)
    return proc


def stop_writer(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def face_keys(s3) -> list[str]:
    return [k for k in s3.keys("faces/") if k.endswith(".jpg")]


def face_ids(keys: list[str]) -> list[str]:
    return [k.rsplit("_", 1)[1].removesuffix(".jpg") for k in keys]


@pytest.fixture
def publisher(mosquitto):
    pub = Publisher(mosquitto.host, mosquitto.port)
    yield pub
    pub.close()


def test_stores_faces_with_keys_content_type_and_metadata(mosquitto, s3, publisher, tmp_path):
    log = tmp_path / "writer.log"
    proc = start_writer(writer_env(mosquitto, s3), log)
    faces = [make_face("cam-1", i) for i in range(5)] + [make_face("cam.2", 100)]
    publisher.publish_all([(contract.face_topic("faces", m.device_id), p) for m, p in faces])
    wait_for(lambda: len(face_keys(s3)) == 6, 20, "6 stored faces")
    for meta, payload in faces:
        key = contract.face_key("faces", meta)
        obj = s3.client.get_object(Bucket=s3.bucket, Key=key)
        assert obj["ContentType"] == "image/jpeg"
        assert obj["Metadata"] == contract.s3_metadata(meta)
        assert obj["Body"].read() == payload
    stamp = FACE_TIME_BASE.strftime("%Y/%m/%d/%H0003.700_")  # frame 100 = 3.7 s later
    assert key.startswith(f"faces/cam.2/{stamp}")
    assert stop_writer(proc) == 0
    assert final_counter(log, "stored") == 6
    assert "Traceback" not in log_text(log)


def test_sigkill_mid_stream_then_restart_loses_nothing(mosquitto, s3, publisher, tmp_path):
    log = tmp_path / "writer.log"
    env = writer_env(mosquitto, s3)
    proc = start_writer(env, log)
    faces = [make_face("cam-1", i) for i in range(200)]
    infos = [publisher.publish("faces/cam-1", p) for _, p in faces]
    wait_for(lambda: len(face_keys(s3)) >= 50, 30, "50 stored faces")
    proc.kill()
    proc.wait(10)
    stored_at_kill = len(face_keys(s3))
    for info in infos:  # everything reached the broker (some while the writer was dead)
        info.wait_for_publish(10)
    proc = start_writer(env, log)
    wait_for(lambda: len(face_keys(s3)) >= 200, 40, "all 200 faces after the restart")
    keys = face_keys(s3)
    ids = face_ids(keys)
    assert len(keys) == 200 and len(set(ids)) == 200, (stored_at_kill, len(keys))
    assert set(ids) == {m.face_id for m, _ in faces}
    assert stop_writer(proc) == 0


def test_s3_down_then_back_loses_nothing_and_writer_stays_up(mosquitto, s3, publisher, tmp_path):
    """An outage is retried forever: past --max-attempts too, nothing is set aside."""
    log = tmp_path / "writer.log"
    proc = start_writer(writer_env(mosquitto, s3, FACEPIPE_MAX_ATTEMPTS="2"), log)
    first = make_face("cam-1", 0)
    publisher.publish_all([("faces/cam-1", first[1])])
    wait_for(lambda: len(face_keys(s3)) == 1, 15, "first face")
    s3.stop()
    try:
        faces = [make_face("cam-1", i) for i in range(1, 41)]
        publisher.publish_all([("faces/cam-1", p) for _, p in faces])
        wait_for(lambda: "retrying with backoff" in log_text(log), 20, "the S3 outage logged")
        time.sleep(2)
        assert proc.poll() is None, "writer exited while S3 was down"
    finally:
        s3.start()
    wait_for(lambda: len(face_keys(s3)) == 41, 60, "all 41 faces after S3 came back")
    assert s3.keys("rejected/") == []
    assert "storing again" in log_text(log)
    assert log_text(log).count("retrying with backoff") <= 3, "S3 outage logged per retry"
    assert stop_writer(proc) == 0
    assert final_counter(log, "retries") > 0


def _bad_messages(big: bytes) -> list[tuple[str, bytes, str]]:
    jpeg = jpeg_bytes(1)
    _, good = make_face("cam-1", 1)
    com_not_json = jpeg[:2] + b"\xff\xfe\x00\x07hello" + jpeg[2:]
    missing = jpeg[:2] + b'\xff\xfe\x00\x12{"face_id":"x1"}' + jpeg[2:]
    return [
        ("faces/cam-1", b"", contract.Reason.EMPTY),
        ("faces/cam-1", b"GIF89a not a jpeg at all", contract.Reason.NOT_JPEG),
        ("faces/cam-1", jpeg, contract.Reason.NO_METADATA),
        ("faces/cam-1", com_not_json, contract.Reason.BAD_METADATA),
        ("faces/cam-1", missing, contract.Reason.BAD_METADATA),
        ("faces/cam-1", big, contract.Reason.TOO_LARGE),
        ("faces/bad id", good, contract.Reason.BAD_TOPIC),
        ("faces/cam-2", good, contract.Reason.DEVICE_MISMATCH),
    ]


def test_bad_messages_are_set_aside_and_good_ones_still_stored(mosquitto, s3, publisher, tmp_path):
    log = tmp_path / "writer.log"
    proc = start_writer(writer_env(mosquitto, s3, FACEPIPE_MAX_BYTES="50000"), log)
    big = make_face("cam-1", 3, jpeg=jpeg_bytes(3, size=300, noise=True))[1]
    assert len(big) > 50000
    bad = _bad_messages(big)
    publisher.publish_all([(topic, payload) for topic, payload, _ in bad])
    meta, good = make_face("cam-1", 42)
    publisher.publish_all([("faces/cam-1", good)])
    wait_for(lambda: len(face_keys(s3)) == 1, 20, "the good face after the bad ones")
    rejected = wait_for(
        lambda: (keys := s3.keys("rejected/")) and len(keys) == len(bad) and keys,
        20,
        f"{len(bad)} rejected objects",
    )
    seen = []
    for key in rejected:
        assert key.endswith(".bin")
        assert key.startswith(("rejected/cam-1/", "rejected/cam-2/", "rejected/_unknown/"))
        head = s3.client.head_object(Bucket=s3.bucket, Key=key)
        seen.append((head["Metadata"]["topic"], head["Metadata"]["reason"]))
    assert sorted(seen) == sorted((topic, reason) for topic, _, reason in bad)
    assert face_keys(s3) == [contract.face_key("faces", meta)]
    assert proc.poll() is None
    assert stop_writer(proc) == 0
    assert final_counter(log, "rejected") == len(bad)
    assert final_counter(log, "rejected_bad_metadata") == 2
    assert "Traceback" not in log_text(log)


def test_two_writers_share_the_load_and_store_everything_once(mosquitto, s3, publisher, tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_writer(writer_env(mosquitto, s3), log) for log in logs]
    faces = [make_face(f"cam-{i % 3}", i) for i in range(200)]
    publisher.publish_all([(f"faces/{m.device_id}", p) for m, p in faces])
    wait_for(lambda: len(face_keys(s3)) >= 200, 40, "200 faces")
    assert sorted(face_ids(face_keys(s3))) == sorted(m.face_id for m, _ in faces)
    assert [stop_writer(p) for p in procs] == [0, 0]
    stored = [final_counter(log, "stored") for log in logs]
    assert sum(stored) == 200 and min(stored) > 0, stored


def test_sigterm_finishes_in_flight_uploads_and_exits_0(mosquitto, s3, publisher, tmp_path):
    log = tmp_path / "writer.log"
    env = writer_env(mosquitto, s3)
    proc = start_writer(env, log)
    faces = [make_face("cam-1", i) for i in range(300)]
    for _, payload in faces:
        publisher.publish("faces/cam-1", payload)
    wait_for(lambda: "received=" in log_text(log) or face_keys(s3), 20, "first faces")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    text = log_text(log)
    assert "finishing" in text and "left unacknowledged" not in text
    assert final_counter(log, "stored") == final_counter(log, "acked")
    assert final_counter(log, "in_flight") == 0
    # Whatever was not taken before the stop is still queued for this durable session.
    proc = start_writer(env, log)
    wait_for(lambda: len(face_keys(s3)) == 300, 40, "all 300 faces after the restart")
    assert stop_writer(proc) == 0


class PasswordBroker(Broker):
    def config(self):
        passwd = self.workdir / "passwd"
        subprocess.run(
            ["mosquitto_passwd", "-b", "-c", str(passwd), "face-writer", "s3cret pass"],
            check=True,
        )
        passwd.chmod(0o600)
        conf = super().config()
        text = conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
        conf.write_text(text + f"password_file {passwd}\n")  # the base config sets `user`
        return conf


def test_password_from_credentials_directory(s3, tmp_path):
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = PasswordBroker(workdir)
    broker.start()
    try:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "mqtt-password").write_text("s3cret pass\n")
        log = tmp_path / "writer.log"
        env = writer_env(
            broker, s3, FACEPIPE_MQTT_USERNAME="face-writer", CREDENTIALS_DIRECTORY=str(creds)
        )
        proc = start_writer(env, log)
        # the publisher needs credentials too: it reuses the writer's account
        client = paho.Client(CallbackAPIVersion.VERSION2)
        client.username_pw_set("face-writer", "s3cret pass")
        client.connect(broker.host, broker.port)
        client.loop_start()
        meta, payload = make_face("cam-1", 7)
        client.publish("faces/cam-1", payload, qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        wait_for(lambda: face_keys(s3) == [contract.face_key("faces", meta)], 15, "stored face")
        assert stop_writer(proc) == 0
        assert "s3cret" not in log_text(log)
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FACEPIPE_S3_BUCKET": ""}, "FACEPIPE_S3_BUCKET is required"),
        ({"FACEPIPE_QOS": "0"}, "FACEPIPE_QOS"),
        ({"FACEPIPE_MQTT_PORT": "99999"}, "FACEPIPE_MQTT_PORT"),
        ({"FACEPIPE_MQTT_PASSWORD_FILE": "/nonexistent/pw"}, "FACEPIPE_MQTT_PASSWORD_FILE"),
        ({"FACEPIPE_WORKERS": "zero"}, "FACEPIPE_WORKERS"),
        ({"AWS_ENDPOINT_URL": "not a url"}, "AWS_"),
    ],
    ids=["missing-bucket", "qos0", "bad-port", "unreadable-password", "bad-workers", "bad-s3-url"],
)
def test_config_errors_exit_2_with_one_line(env, needle):
    full = program_env({"FACEPIPE_S3_BUCKET": "b"}, env)
    if env.get("FACEPIPE_S3_BUCKET") == "":
        del full["FACEPIPE_S3_BUCKET"]
    done = subprocess.run(
        [sys.executable, "-m", "facepipe.writer"],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("face-writer: error:") and needle in lines[0]


def test_systemd_ready_watchdog_status_and_stopping(mosquitto, s3, tmp_path):
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        sock.settimeout(0.2)
        env = writer_env(mosquitto, s3, NOTIFY_SOCKET=str(address), WATCHDOG_USEC="1000000")
        proc = start_writer(env, tmp_path / "writer.log")
        seen: list[str] = []

        def got(text: str) -> bool:
            with contextlib.suppress(TimeoutError):
                seen.extend(sock.recv(4096).decode().splitlines())
            return any(line.startswith(text) for line in seen)

        wait_for(lambda: got("READY=1"), 10, "READY=1")
        wait_for(lambda: got("WATCHDOG=1"), 10, "WATCHDOG=1")
        wait_for(lambda: got("STATUS=") and any("stored=" in x for x in seen), 10, "STATUS=")
        assert stop_writer(proc) == 0
        wait_for(lambda: got("STOPPING=1"), 5, "STOPPING=1")


def test_mqtt_311_durable_session_stores_everything(mosquitto, s3, publisher, tmp_path):
    log = tmp_path / "writer.log"
    env = writer_env(mosquitto, s3, FACEPIPE_MQTT_PROTOCOL="3.1.1")
    proc = start_writer(env, log)
    faces = [make_face("cam-1", i) for i in range(100)]
    publisher.publish_all([("faces/cam-1", p) for _, p in faces[:50]])
    wait_for(lambda: len(face_keys(s3)) == 50, 20, "50 faces")
    assert stop_writer(proc) == 0
    publisher.publish_all([("faces/cam-1", p) for _, p in faces[50:]])  # while it is away
    proc = start_writer(env, log)
    wait_for(lambda: len(face_keys(s3)) == 100, 20, "the 50 queued while away")
    assert stop_writer(proc) == 0


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def test_a_full_broker_queue_shows_in_the_writers_metrics_and_stats_line(s3, tmp_path):
    """The cloud broker drops what does not fit a client's queue, and logs it once; the
    writer reports the broker's own count, so the loss is seen where the faces were going."""
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Broker(workdir, max_queued=5, sys_interval=1)
    broker.start()
    try:
        log = tmp_path / "writer.log"
        env = writer_env(broker, s3)
        assert stop_writer(start_writer(env, log)) == 0  # its durable session now waits
        faces = [make_face("cam-1", i) for i in range(12)]
        publisher = Publisher(broker.host, broker.port)
        try:
            publisher.publish_all([("faces/cam-1", p) for _, p in faces])
        finally:
            publisher.close()
        port = free_port()
        proc = start_writer({**env, "FACEPIPE_METRICS_PORT": str(port)}, log)

        def dropped() -> float | None:
            with contextlib.suppress(OSError):
                for line in scrape_text(port).splitlines():
                    if line.startswith("facepipe_writer_broker_dropped_total "):
                        return float(line.split()[1])
            return None

        assert wait_for(lambda: dropped() == 7, 20, "7 dropped in the metrics")
        wait_for(lambda: len(face_keys(s3)) == 5, 20, "the 5 queued faces stored")
        wait_for(lambda: "broker_dropped=7" in log_text(log), 10, "the stats line")
        assert stop_writer(proc) == 0
        assert final_counter(log, "broker_dropped") == 7
        assert final_counter(log, "stored") == 5
    finally:
        broker.stop()
