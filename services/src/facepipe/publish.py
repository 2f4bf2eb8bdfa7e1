"""facepipe-publish: hand faces to the edge's end-to-end delivery from any program.

    facepipe-publish --outbox-dir DIR [--device-id ID] [--wait 60] FILE...

Each FILE is a face message (a JPEG carrying the contract's metadata, its device id this one's)
or a plain JPEG, which gets metadata here: ``captured_at`` = the file's modification time, a
face id derived from the device, the image and that time (publishing the same file again is the
same face, never a second object), ``bbox`` = the whole image, ``detector`` = ``--detector``.
A face captured outside the writer's default window (older than ``--outbox-max-age``, or more
than 5 minutes ahead) is refused: the writer would set it aside. ``--device-id`` must be this
edge's device id: the edge broker lets local clients publish that device's faces only. Every face is
accepted into the outbox (fsync'd) before anything is published; then everything in the outbox
(what an earlier run left included) goes to the local broker, and the command waits up to
``--wait`` seconds for the cloud's acknowledgements.

``--test-face`` adds one synthesized face that says what it is (an image reading "facepipe
test face", a new face id each time; name it with ``--detector``, e.g. ``deploy-check``): the
deploy check (playbooks/check.yml) sends one through every edge. ``--report`` prints one JSON
object on stdout at the end: the device, each face (id, capture time, its S3 key below the
writer's prefix, whether the cloud acknowledged it), whether the local broker took the
connection, whether the edge's bridge was up (null without a bridge state topic), the seconds
taken and the faces still waiting.

Exit status: 0 the writer is done with every face (stored; or set aside, which its log and the
bucket's rejected/ show); 3 some still wait in the outbox (a later run publishes them again);
2 a bad option or file, or more faces than the outbox holds (nothing accepted), or the broker
refused a face (not authorised: a wrong --device-id); 1 the outbox could not be written (what
was written before stays accepted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from facepipe import contract
from facepipe.config import (
    EXIT_CONFIG,
    LOGGING_OPTIONS,
    MQTT_OPTIONS,
    ConfigError,
    LoggingConfig,
    MqttConfig,
    Option,
    config_of,
    device_id,
    float_range,
    int_range,
    non_empty,
    parse_bool,
    parse_config_and_arguments,
    resolve_device_id,
    run_main,
)
from facepipe.delivery import (
    DELIVERY_COUNTERS,
    DELIVERY_GAUGES,
    OUTBOX_OPTIONS,
    OutboxConfig,
    start_publishing,
)
from facepipe.logsetup import setup_logging
from facepipe.mqtt import MqttSettings
from facepipe.stats import Counters, format_counters

PROG: Final = "facepipe-publish"
EXIT_FAILED: Final = 1
EXIT_WAITING: Final = 3
FACE_ID_NAMESPACE: Final = uuid.UUID("2b8f1d35-6c1e-4f43-9d2e-6a4c8a0f7e51")
log = logging.getLogger(__name__)

OPTIONS: Final = (
    Option("device_id", device_id, None, "device id in topics and metadata (default: hostname)"),
    Option(
        "detector",
        non_empty,
        "external",
        "detector named in the metadata of plain JPEGs and of the test face",
    ),
    Option("wait", float_range(0), 60.0, "seconds to wait for the cloud's acknowledgements"),
    Option("max_bytes", int_range(1024, 256 * 1024 * 1024), 1024 * 1024, "largest message"),
    Option(
        "test_face",
        parse_bool,
        False,
        "also publish one synthesized, marked test face",
        flag_only_value="true",
    ),
    Option("report", parse_bool, False, "print a JSON summary on stdout", flag_only_value="true"),
    *OUTBOX_OPTIONS,
    *MQTT_OPTIONS,
    *LOGGING_OPTIONS,
)


@config_of(OPTIONS)
@dataclass(frozen=True)
class PublishConfig:
    device_id: str | None
    detector: str
    wait: float
    max_bytes: int
    test_face: bool
    report: bool
    outbox: OutboxConfig
    mqtt: MqttConfig
    logging: LoggingConfig


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header; ValueError if it has none."""
    pos = 2
    while pos + 9 < len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        pos += 2 + length
    raise ValueError("no JPEG frame header")


def load_face(
    path: Path, device: str, detector: str, max_bytes: int, window: contract.TimeWindow
) -> tuple[str, bytes]:
    """A face message from a file: (face_id, message). ConfigError names the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        meta, _ = contract.decode_face(data, max_bytes)
    except contract.ContractError as exc:
        if exc.reason != contract.Reason.NO_METADATA:
            raise ConfigError(f"{path}: not a face message: {exc}") from None
        try:
            width, height = _jpeg_size(data)
            captured = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            digest = hashlib.sha256(data).hexdigest()
            name = f"{device}/{digest}/{contract.format_time(captured)}"
            meta = contract.validate_metadata(
                {
                    "v": contract.SCHEMA_VERSION,
                    "face_id": str(uuid.uuid5(FACE_ID_NAMESPACE, name)),
                    "device_id": device,
                    "captured_at": contract.format_time(captured),
                    "frame": 0,
                    "bbox": [0, 0, width, height],
                    "detector": detector,
                }
            )
            data = contract.encode_face(data, meta)
        except (ValueError, contract.ContractError) as err:
            raise ConfigError(f"{path}: not a JPEG face image: {err}") from None
        if len(data) > max_bytes:
            raise ConfigError(f"{path}: {len(data)} bytes, over --max-bytes {max_bytes}") from None
    if meta.device_id != device:
        raise ConfigError(f"{path}: its metadata names device {meta.device_id!r}, not {device!r}")
    try:
        window.check(meta.captured_at, datetime.now(UTC))
    except contract.ContractError as exc:
        raise ConfigError(f"{path}: {exc.detail} (the writer would set it aside)") from None
    return meta.face_id, data


TEST_FACE_SIZE: Final = (360, 120)  # width, height


def make_test_face(device: str, detector: str, now: datetime) -> tuple[str, bytes]:
    """(face_id, message): an image that reads "facepipe test face", the device and the time,
    with a new face id. It is a valid face to the writer, stored like any other; its
    ``detector`` field says where it came from."""
    import cv2
    import numpy as np

    width, height = TEST_FACE_SIZE
    image = np.full((height, width, 3), (150, 90, 40), np.uint8)  # BGR: a dark blue
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(image, "facepipe test face", (12, 48), font, 0.9, (255, 255, 255), 2)
    cv2.putText(image, device[:40], (12, 80), font, 0.5, (255, 255, 255), 1)
    cv2.putText(image, contract.format_time(now), (12, 104), font, 0.5, (255, 255, 255), 1)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ConfigError("--test-face: OpenCV cannot encode a JPEG")
    meta = contract.validate_metadata(
        {
            "v": contract.SCHEMA_VERSION,
            "face_id": str(uuid.uuid4()),
            "device_id": device,
            "captured_at": contract.format_time(now),
            "frame": 0,
            "bbox": [0, 0, width, height],
            "detector": detector,
        }
    )
    return meta.face_id, contract.encode_face(jpeg.tobytes(), meta)


def report(
    device: str,
    faces: list[tuple[str, bytes]],
    waiting: set[str],
    *,
    broker_connected: bool,
    bridge_up: bool | None,
    seconds: float,
) -> str:
    """The ``--report`` line: what a script needs to find each face (its key below the writer's
    S3 prefix), whether the cloud has acknowledged it, and where a face that waits is stuck:
    the local broker (``broker_connected``) or the bridge (``bridge_up``: None without a
    bridge state topic)."""
    entries = []
    for face_id, payload in faces:
        meta, _ = contract.decode_face(payload, None)
        entries.append(
            {
                "face_id": face_id,
                "captured_at": contract.format_time(meta.captured_at),
                "key": contract.face_key("", meta),
                "acknowledged": face_id not in waiting,
            }
        )
    body = {
        "device_id": device,
        "faces": entries,
        "broker_connected": broker_connected,
        "bridge_up": bridge_up,
        "seconds": round(seconds, 3),
        "waiting": len(waiting),
    }
    return json.dumps(body, separators=(",", ":"))


def run(argv: list[str] | None = None) -> int:
    cfg, files = parse_config_and_arguments(
        PublishConfig, PROG, "Publish faces with end-to-end delivery.", "files", argv
    )
    if not cfg.outbox.outbox_dir:
        raise ConfigError("--outbox-dir / FACEPIPE_OUTBOX_DIR is required")
    device = resolve_device_id(cfg.device_id)
    window = contract.TimeWindow(max_age=timedelta(seconds=cfg.outbox.outbox_max_age))
    faces = [load_face(Path(f), device, cfg.detector, cfg.max_bytes, window) for f in files]
    if cfg.test_face:
        faces.append(make_test_face(device, cfg.detector, datetime.now(UTC)))
    if len({face_id for face_id, _ in faces}) != len(faces):
        raise ConfigError("two files hold the same face (the same face id)")
    settings = MqttSettings.from_config(cfg.mqtt, default_client_id=f"{PROG}-{device}")
    setup_logging(cfg.logging.log_level)
    counters = Counters(
        ["published", "publish_dropped", "publish_refused", "acked", *DELIVERY_COUNTERS],
        DELIVERY_GAUGES,
    )
    # Not durable: acknowledgements would pile up for us in the broker between runs; a run
    # sends again whatever still waits instead.
    publishing = start_publishing(
        cfg.outbox,
        cfg.mqtt,
        settings,
        device=device,
        counters=counters,
        resend_leftovers=True,
        durable=False,
    )
    delivery = publishing.delivery
    assert delivery is not None
    outbox = delivery.outbox
    new = [(f, p) for f, p in faces if f not in outbox]
    if (
        outbox.depth + len(new) > outbox.max_faces
        or outbox.size + sum(len(p) for _, p in new) > outbox.max_bytes
    ):
        publishing.close()
        raise ConfigError(
            f"--outbox-dir {cfg.outbox.outbox_dir}: {len(new)} more faces do not fit "
            f"({outbox.depth} wait; at most {outbox.max_faces} faces, {outbox.max_bytes} bytes)"
        )
    try:
        for face_id, payload in new:
            outbox.put(face_id, payload)  # accepted before anything goes out
            counters.inc("accepted")
    except (OSError, ValueError) as exc:
        publishing.close()
        log.error("cannot write the outbox %s: %s", cfg.outbox.outbox_dir, exc)
        return EXIT_FAILED
    publishing.session.start()
    started = time.monotonic()
    deadline = started + cfg.wait
    try:
        while delivery.outbox.depth and time.monotonic() < deadline:
            publishing.tick()
            time.sleep(0.05)
    finally:
        publishing.session.stop()
        publishing.tick(force=True)
        left = delivery.outbox.depth
        waiting = {face_id for face_id, _ in faces if face_id in delivery.outbox}
        bridge_up = delivery.bridge_up if delivery.bridge_state_topic else None
        broker_connected = publishing.session.ever_connected
        publishing.close()
    log.info("done: %s", format_counters({**counters.snapshot(), **counters.gauges()}))
    if cfg.report:
        seconds = time.monotonic() - started
        print(
            report(
                device,
                faces,
                waiting,
                broker_connected=broker_connected,
                bridge_up=bridge_up,
                seconds=seconds,
            ),
            flush=True,
        )
    if counters.get("publish_refused"):
        log.error(
            "the broker refused %d face(s); is --device-id %s this edge's device id?",
            counters.get("publish_refused"),
            device,
        )
        return EXIT_CONFIG
    if left:
        log.warning(
            "%d face(s) wait in %s for the cloud's acknowledgement", left, cfg.outbox.outbox_dir
        )
        return EXIT_WAITING
    return 0


def main() -> None:
    run_main(PROG, run)


if __name__ == "__main__":
    main()
