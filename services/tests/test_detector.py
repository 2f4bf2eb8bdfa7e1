"""face-detector against a real mosquitto, with the sample clip as its camera."""

from __future__ import annotations

import functools
import http.server
import itertools
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
from conftest import Broker, free_port, program_env, start_program, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from facepipe import contract
from facepipe.delivery import BrokerPublisher
from facepipe.detector import COUNTERS, RateGate, encode_within
from facepipe.mqtt import MqttSession, MqttSettings
from facepipe.stats import Counters

DEVICE = "cam-test.1"


@dataclass
class Collector:
    """Subscribes to <prefix>/# and keeps every message (topic, payload, retain)."""

    host: str
    port: int
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(self.host, self.port)
        self.client.subscribe("faces/#", qos=1)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def faces(self) -> list[tuple[contract.FaceMeta, bytes]]:
        with self.lock:
            return [contract.decode_face(p) for t, p, _ in self.messages if t == f"faces/{DEVICE}"]

    def statuses(self) -> list[tuple[bytes, bool]]:
        with self.lock:
            return [(p, r) for t, p, r in self.messages if t == f"faces/{DEVICE}/status"]

    def words(self) -> list[bytes]:
        """The statuses in order, without the retain flag."""
        return [p for p, _ in self.statuses()]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def detector_env(broker: Broker, source: str | Path, **extra: str) -> dict[str, str]:
    return program_env(
        broker.env,
        {"FACEPIPE_SOURCE": str(source), "FACEPIPE_DEVICE_ID": DEVICE},
        {f"FACEPIPE_{k.upper()}": v for k, v in extra.items()},
    )


@dataclass
class Run:
    returncode: int
    log: str
    faces: list[tuple[contract.FaceMeta, bytes]]
    statuses: list[tuple[bytes, bool]]
    retained_after: list[tuple[bytes, bool]]
    seconds: float


@pytest.fixture(scope="module")
def clip_run(sample_clip, tmp_path_factory) -> Run:
    """One run of the detector over the whole sample clip (as fast as possible)."""
    clip, _ = sample_clip
    workdir = tmp_path_factory.mktemp("detector-run")
    broker = Broker(workdir)
    broker.start()
    try:
        collector = Collector(broker.host, broker.port)
        log = workdir / "detector.log"
        env = detector_env(broker, clip, realtime="false")
        started = time.monotonic()
        proc = start_program("detector", env, log=log)
        code = proc.wait(120)
        seconds = time.monotonic() - started
        time.sleep(0.3)  # let the last messages reach the collector
        collector.close()
        late = Collector(broker.host, broker.port)  # a new subscriber: what is retained now
        time.sleep(0.5)
        late.close()
        return Run(
            code,
            log.read_text(errors="replace"),
            collector.faces(),
            collector.statuses(),
            late.statuses(),
            seconds,
        )
    finally:
        broker.stop()


def in_face_segment(truth: dict, frame: int) -> bool:
    return any(s["start"] <= frame < s["end"] and s["faces"] > 0 for s in truth["segments"])


def test_file_source_exits_0_after_all_publishes_are_acknowledged(clip_run):
    assert clip_run.returncode == 0, clip_run.log
    stopped = [line for line in clip_run.log.splitlines() if "stopped:" in line][-1]
    published = int(stopped.split("published=")[1].split()[0])
    acked = int(stopped.split("acked=")[1].split()[0])
    assert published == acked == len(clip_run.faces) > 0
    assert "publish_dropped=0" in stopped


def test_publishes_faces_only_in_face_segments_and_not_one_per_frame(clip_run, sample_clip):
    _, truth = sample_clip
    frames = [meta.frame for meta, _ in clip_run.faces]
    assert frames, clip_run.log
    outside = [f for f in frames if not in_face_segment(truth, f)]
    assert outside == [], f"faces published outside the face segments: {outside}"
    face_frames = sum(s["end"] - s["start"] for s in truth["segments"] if s["faces"])
    assert len(frames) <= face_frames / 10, "the tracker should not publish one face per frame"
    # Every face segment produced faces, and the two-face segment at least two tracks.
    for seg in (s for s in truth["segments"] if s["faces"]):
        tracks = {m.track_id for m, _ in clip_run.faces if seg["start"] <= m.frame < seg["end"]}
        assert len(tracks) >= seg["faces"], (seg, tracks)


def test_published_metadata_and_crops_are_valid(clip_run, sample_clip):
    _, truth = sample_clip
    face_ids = set()
    for meta, payload in clip_run.faces:
        assert meta.device_id == DEVICE
        assert meta.detector == "haar:frontalface_default"
        assert meta.track_id
        face_ids.add(meta.face_id)
        x, y, w, h = meta.bbox
        assert x >= 0 and y >= 0 and x + w <= truth["width"] and y + h <= truth["height"]
        # The bbox overlaps a ground-truth face of that frame.
        best = max((_iou(meta.bbox, gt) for gt in truth["boxes"][meta.frame]), default=0.0)
        assert best >= 0.3, (meta.frame, meta.bbox, truth["boxes"][meta.frame])
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] >= h and image.shape[1] >= w
    assert len(face_ids) == len(clip_run.faces), "face_id must be unique per published crop"


def test_status_goes_online_then_offline_and_stays_retained(clip_run):
    assert [p for p, _ in clip_run.statuses] == [b"online", b"offline"], clip_run.statuses
    assert all(p.decode() in contract.STATUSES for p, _ in clip_run.statuses)
    assert clip_run.retained_after == [(b"offline", True)]


def test_realtime_file_plays_at_its_own_frame_rate(mosquitto, sample_clip, tmp_path):
    """2 s of a 20 fps clip take about 2 s in realtime mode (folder of the first 40 frames)."""
    clip, truth = sample_clip
    folder = tmp_path / "frames"
    folder.mkdir()
    cap = cv2.VideoCapture(str(clip))
    for i in range(40):
        ok, image = cap.read()
        assert ok
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), image)
    cap.release()
    log = tmp_path / "detector.log"
    started = time.monotonic()
    env = detector_env(mosquitto, folder, fps=str(truth["fps"]))
    proc = start_program("detector", env, log=log)
    assert proc.wait(60) == 0, log.read_text()
    assert time.monotonic() - started >= 40 / truth["fps"]


def test_missing_camera_keeps_retrying_and_sigterm_exits_0(mosquitto, tmp_path):
    log = tmp_path / "detector.log"
    collector = Collector(mosquitto.host, mosquitto.port)
    proc = start_program("detector", detector_env(mosquitto, "/dev/video97"), log=log)
    try:
        # Connected, but the camera is missing: the retained status says so (not "online").
        wait_for(lambda: b"camera-down" in collector.words(), 15, "status camera-down")
        assert b"online" not in collector.words(), collector.statuses()
        time.sleep(2.5)  # several reopen attempts
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert text.count("cannot be opened; retrying") == 1, text  # logged once per state change
    assert "Traceback" not in text
    wait_for(lambda: collector.statuses()[-1][0] == b"offline", 10, "status offline")
    collector.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve_folder(folder: Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP camera: ``folder``'s files on 127.0.0.1:``port`` (0: any free port), served from a
    thread until ``shutdown()``."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_camera_that_comes_back_turns_the_status_online_again(mosquitto, sample_clip, tmp_path):
    """An HTTP camera that refuses connections, then serves: camera-down, then online."""
    cut_clip(sample_clip[0], tmp_path / "clip.avi", 0, 120)
    port = free_port()
    collector = Collector(mosquitto.host, mosquitto.port)
    log = tmp_path / "detector.log"
    env = detector_env(mosquitto, f"http://127.0.0.1:{port}/clip.avi")
    proc = start_program("detector", env, log=log)
    server: http.server.ThreadingHTTPServer | None = None
    try:
        wait_for(lambda: b"camera-down" in collector.words(), 20, "status camera-down")
        server = serve_folder(tmp_path, port)
        wait_for(lambda: b"online" in collector.words(), 60, "status online once it serves")
        words = collector.words()
        assert words.index(b"online") > words.index(b"camera-down"), words
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None:
            server.shutdown()
        collector.close()


def test_the_rate_gate_lets_through_at_most_fps_frames_per_second():
    gate = RateGate(5.0)
    times = [i / 30 for i in range(300)]  # 10 s of a 30 fps camera
    passed = [t for t in times if gate.due(t)]
    assert 49 <= len(passed) <= 51, len(passed)
    # Never two within a frame of each other: the average holds, the gaps vary by one frame.
    assert all(b - a > 0.2 - 1 / 30 - 1e-9 for a, b in itertools.pairwise(passed))
    # After a pause, one frame goes through, not a burst that catches up.
    assert gate.due(100.0) and not gate.due(100.05) and gate.due(100.2)


def test_the_rate_gate_at_0_and_on_slower_sources_lets_every_frame_through():
    assert all(RateGate(0.0).due(i / 30) for i in range(100))
    gate = RateGate(5.0)
    assert all(gate.due(i * 0.5) for i in range(20))  # 2 fps under a cap of 5


def test_a_stream_is_detected_at_detect_fps_and_the_rest_skipped(mosquitto, sample_clip, tmp_path):
    """A 20 fps HTTP stream with FACEPIPE_DETECT_FPS=2: about 2 detections a second."""
    cut_clip(sample_clip[0], tmp_path / "clip.avi", 0, 200)
    server = serve_folder(tmp_path)
    log = tmp_path / "detector.log"
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.avi"
    env = detector_env(mosquitto, url, detect_fps="2", stats_interval="1")
    proc = start_program("detector", env, log=log)
    try:
        wait_for(
            lambda: "skipped=" in log.read_text() and " frames=" in log.read_text(), 20, "stats"
        )
        time.sleep(4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.shutdown()
    stopped = [line for line in log.read_text().splitlines() if "stopped:" in line][-1]
    counts = {k: float(v) for k, v in (f.split("=") for f in stopped.split() if "=" in f)}
    detected = counts["frames"] - counts["skipped"]
    assert counts["skipped"] > 0, stopped
    # A clip read as fast as FFmpeg goes: at most 2 detections per second of its source time.
    assert detected <= counts["frames"] / 2, stopped


def cut_clip(clip: Path, out: Path, start: int, end: int) -> Path:
    """Frames [start, end) of ``clip`` as a new MJPG clip (keeps the tests short)."""
    cap = cv2.VideoCapture(str(clip))
    fps = cap.get(cv2.CAP_PROP_FPS)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), fps, (640, 480))
    for i in range(end):
        ok, image = cap.read()
        assert ok
        if i >= start:
            writer.write(image)
    writer.release()
    cap.release()
    return out


def test_broker_down_at_start_file_source_still_delivers_everything(sample_clip, tmp_path):
    """The broker comes up late: faces wait in paho's queue and are all acknowledged."""
    clip = cut_clip(sample_clip[0], tmp_path / "short.avi", 30, 130)  # one face segment
    broker = Broker(tmp_path / "late")
    (tmp_path / "late").mkdir()
    log = tmp_path / "detector.log"
    env = detector_env(broker, clip, realtime="false")
    proc = start_program("detector", env, log=log)
    try:
        time.sleep(3)
        assert proc.poll() is None, "must wait for the broker, not exit"
        broker.start()
        collector = Collector(broker.host, broker.port)
        assert proc.wait(120) == 0, log.read_text()
        time.sleep(0.3)
        stopped = [line for line in log.read_text().splitlines() if "stopped:" in line][-1]
        published = int(stopped.split("published=")[1].split()[0])
        assert published > 0 and f"acked={published}" in stopped, stopped
        collector.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "--source / FACEPIPE_SOURCE is required"),
        ({"FACEPIPE_SOURCE": "/nonexistent/clip.avi"}, "--source / FACEPIPE_SOURCE"),
        (
            {"FACEPIPE_SOURCE": "x", "FACEPIPE_DEVICE_ID": "bad/id"},
            "--device-id / FACEPIPE_DEVICE_ID",
        ),
        ({"FACEPIPE_SOURCE": "x", "FACEPIPE_QOS": "2"}, "--qos / FACEPIPE_QOS"),
        ({"FACEPIPE_SOURCE": "x", "FACEPIPE_JPEG_QUALITY": "0"}, "--jpeg-quality"),
        (
            {"FACEPIPE_SOURCE": "x", "FACEPIPE_MODEL": "/nonexistent.onnx"},
            "--model / FACEPIPE_MODEL",
        ),
        ({"FACEPIPE_SOURCE": "ftp://host/x"}, "--source / FACEPIPE_SOURCE"),
    ],
)
def test_config_errors_exit_2_with_one_line(env, needle, tmp_path):
    env = program_env({"FACEPIPE_DEVICE_ID": DEVICE}, env)
    proc = subprocess.run(
        [sys.executable, "-m", "facepipe.detector"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("face-detector: error:") and needle in lines[0], lines[0]


def test_flags_win_over_environment(tmp_path):
    env = program_env({"FACEPIPE_SOURCE": "/nonexistent/env.avi", "FACEPIPE_DEVICE_ID": DEVICE})
    proc = subprocess.run(
        [sys.executable, "-m", "facepipe.detector", "--source", "/nonexistent/flag.avi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "/nonexistent/flag.avi" in proc.stderr, proc.stderr


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def test_systemd_notify_ready_watchdog_status_stopping(mosquitto, sample_clip, tmp_path):
    clip = cut_clip(sample_clip[0], tmp_path / "short.avi", 0, 60)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    env = detector_env(mosquitto, clip, stats_interval="1")
    env |= {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    proc = start_program("detector", env, log=tmp_path / "detector.log")
    received: list[str] = []
    while proc.poll() is None or not received:
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            if proc.poll() is not None:
                break
    sock.close()
    assert proc.wait(30) == 0
    text = "\n".join(received)
    assert received[0].startswith("READY=1"), received
    assert "WATCHDOG=1" in text
    assert "STATUS=" in text and "frames=" in text
    assert "STOPPING=1" in text


def test_live_publisher_bounds_its_queue_and_counts_drops():
    """Broker unreachable: paho holds max_queued faces, the rest are dropped and counted."""
    settings = MqttSettings("127.0.0.1", free_port(), None, None, None, "t", "5", 30)
    session = MqttSession(settings, max_queued=3)
    counters = Counters(COUNTERS)
    publisher = BrokerPublisher(session, f"faces/{DEVICE}", 1, 3, counters)
    results = [publisher.publish(b"\xff\xd8face\xff\xd9") for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert counters.get("published") == 3 and counters.get("publish_dropped") == 2
    assert publisher.pending() == 3


def test_a_crop_over_max_bytes_is_shrunk_to_fit_or_dropped():
    """The detector never publishes what its broker would refuse (message_size_limit)."""
    rng = np.random.default_rng(3)
    noisy = rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)  # incompressible
    meta = contract.FaceMeta.new(
        device_id="cam-1",
        captured_at=datetime.now(UTC),
        frame=1,
        bbox=(0, 0, 800, 800),
        detector="test",
    )
    full = encode_within(noisy, meta, 90, 10 * 1024 * 1024)
    assert full is not None and len(full) > 200_000
    small = encode_within(noisy, meta, 90, 100_000)
    assert small is not None and len(small) <= 100_000
    decoded, _ = contract.decode_face(small)
    assert decoded == meta  # same face, same metadata, only a smaller image
    assert encode_within(noisy, meta, 90, 800) is None  # nothing fits: dropped
