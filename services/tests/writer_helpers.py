"""Shared helpers for the face-writer tests and bench: real contract messages, a publisher."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from facepipe import contract


def jpeg_bytes(seed: int = 0, size: int = 96, noise: bool = False) -> bytes:
    """A real JPEG (a smooth gradient with a disc, so it compresses like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = (xx * 255 // size).astype(np.uint8)
    img[..., 1] = (yy * 255 // size).astype(np.uint8)
    img[..., 2] = int(rng.integers(0, 255))
    cv2.circle(img, (size // 2, size // 2), size // 4, (255, 255, 255), -1)
    if noise:  # incompressible: for payloads over a size limit
        img = rng.integers(0, 256, img.shape, dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


# Test faces are captured "an hour ago" (inside the writer's accepted window), on a whole hour
# so the keys of a test run are predictable.
FACE_TIME_BASE = (datetime.now(UTC) - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)


def make_face(
    device: str = "cam-1", index: int = 0, jpeg: bytes | None = None
) -> tuple[contract.FaceMeta, bytes]:
    base = FACE_TIME_BASE
    meta = contract.FaceMeta.new(
        device_id=device,
        captured_at=base + timedelta(milliseconds=37 * index),
        frame=index,
        bbox=(10 + index % 50, 20, 64, 64),
        detector="test",
        track_id=f"t{index}",
    )
    return meta, contract.encode_face(jpeg or jpeg_bytes(index % 7), meta)


class Publisher:
    """A plain paho client publishing QoS 1 and waiting for the broker's acks."""

    def __init__(self, host: str, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def publish_all(self, items: list[tuple[str, bytes]], timeout: float = 30) -> None:
        infos = [self.publish(topic, payload) for topic, payload in items]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a publish"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def final_counter(path: Path, name: str) -> int:
    """A counter from the writer's last 'stopped:' line."""
    lines = [line for line in log_text(path).splitlines() if "stopped:" in line]
    assert lines, f"no 'stopped:' line in {path}"
    found = re.search(rf"\b{name}=(\d+)", lines[-1])
    return int(found.group(1)) if found else 0
