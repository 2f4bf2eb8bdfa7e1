"""Crafted bad messages, one per class: the contract tests decode them, the writer tests send
them in bursts. Each class names the reason the writer must set it aside for."""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from writer_helpers import FACE_TIME_BASE, jpeg_bytes

from facepipe import contract
from facepipe.contract import Reason

DEVICE = "cam-1"
TOPIC = contract.face_topic("faces", DEVICE)


@dataclass(frozen=True)
class Poison:
    name: str
    reason: str
    payload: bytes
    topic: str = TOPIC


def com(body: bytes) -> bytes:
    return b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body


def with_com(*bodies: bytes, jpeg: bytes | None = None) -> bytes:
    image = jpeg or jpeg_bytes(1)
    return image[:2] + b"".join(com(b) for b in bodies) + image[2:]


def good_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "face_id": str(uuid.uuid4()),
        "device_id": DEVICE,
        "captured_at": contract.format_time(FACE_TIME_BASE),
        "frame": 7,
        "bbox": [10, 20, 64, 64],
        "detector": "test",
        "track_id": "t7",
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not _DROP}


_DROP = object()


def meta_json(**changes: Any) -> bytes:
    return json.dumps(good_fields(**changes), separators=(",", ":")).encode()


def message(**changes: Any) -> bytes:
    return with_com(meta_json(**changes))


def no_frame_header() -> bytes:
    sos = b"\xff\xda" + struct.pack(">H", 8) + b"\x01\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + com(meta_json()) + sos + b"\x00\x01\x02" + b"\xff\xd9"


def padded(payload: bytes, size: int) -> bytes:
    """``payload`` grown to ``size`` bytes with NULs after its EOI (still a JPEG)."""
    return payload + b"\x00" * (size - len(payload))


def poison_classes(max_bytes: int) -> list[Poison]:
    """Every class of bad message the writer must set aside (S3-side classes excluded)."""
    jpeg = jpeg_bytes(1)
    now = datetime.now(UTC)
    return [
        Poison("empty payload", Reason.EMPTY, b""),
        Poison("not a JPEG (GIF)", Reason.NOT_JPEG, b"GIF89a not a jpeg at all"),
        Poison("SOI marker only", Reason.NOT_JPEG, b"\xff\xd8"),
        Poison("truncated segment", Reason.NOT_JPEG, jpeg[:2] + b"\xff\xe0\xff\xf0abc\xff\xd9"),
        Poison("no frame header", Reason.NOT_JPEG, no_frame_header()),
        Poison("JPEG without metadata", Reason.NO_METADATA, jpeg),
        Poison("COM not JSON", Reason.BAD_METADATA, with_com(b"hello")),
        Poison("COM invalid UTF-8", Reason.BAD_METADATA, with_com(b'{"face_id": "\xff\xfe"}')),
        Poison("60,000 [ in COM", Reason.BAD_METADATA, with_com(b"[" * 60000)),
        Poison(
            "deep nesting in metadata",
            Reason.BAD_METADATA,
            with_com(b'{"face_id":"x","n":' + b"[" * 2000 + b"]" * 2000 + b"}"),
        ),
        Poison(
            "5,000-digit frame",
            Reason.BAD_METADATA,
            with_com(meta_json(frame=0).replace(b'"frame":0', b'"frame":' + b"9" * 5000)),
        ),
        Poison(
            "30-digit frame",
            Reason.BAD_METADATA,
            with_com(meta_json(frame=0).replace(b'"frame":0', b'"frame":' + b"9" * 30)),
        ),
        Poison("frame over 2^53", Reason.BAD_METADATA, message(frame=2**60)),
        Poison(
            "captured_at 9999 with -01:00",
            Reason.BAD_METADATA,
            message(captured_at="9999-12-31T23:30:00-01:00"),
        ),
        Poison(
            "captured_at 0001 with +01:00",
            Reason.BAD_METADATA,
            message(captured_at="0001-01-01T00:10:00+01:00"),
        ),
        Poison(
            "captured_at in Arabic digits",
            Reason.BAD_METADATA,
            message(
                captured_at=contract.format_time(FACE_TIME_BASE).translate(
                    str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
                )
            ),
        ),
        Poison(
            "captured_at in 2100", Reason.IN_FUTURE, message(captured_at="2100-01-01T00:00:00Z")
        ),
        Poison("captured_at in 1970", Reason.TOO_OLD, message(captured_at="1970-01-01T00:00:00Z")),
        Poison(
            "captured_at 8 days ago",
            Reason.TOO_OLD,
            message(captured_at=contract.format_time(now - timedelta(days=8))),
        ),
        Poison("detector with CR LF", Reason.BAD_METADATA, message(detector="haar\r\nX-Evil: 1")),
        Poison("detector with NUL, ESC", Reason.BAD_METADATA, message(detector="a\x00b\x1b[2J")),
        Poison("detector of 3,000 chars", Reason.BAD_METADATA, message(detector="d" * 3000)),
        Poison("detector not ASCII", Reason.BAD_METADATA, message(detector="caméra")),
        Poison("track_id of 65 chars", Reason.BAD_METADATA, message(track_id="t" * 65)),
        Poison(
            "face_id upper case",
            Reason.BAD_METADATA,
            message(face_id=str(uuid.uuid4()).upper()),
        ),
        Poison("face_id not a UUID", Reason.BAD_METADATA, message(face_id="../../etc/passwd")),
        Poison("no version", Reason.UNSUPPORTED_VERSION, message(v=_DROP)),
        Poison("version 2", Reason.UNSUPPORTED_VERSION, message(v=2)),
        Poison("version true", Reason.UNSUPPORTED_VERSION, message(v=True)),
        Poison("bbox negative", Reason.BAD_METADATA, message(bbox=[-1, 0, 10, 10])),
        Poison("bbox of booleans", Reason.BAD_METADATA, message(bbox=[True, 0, 10, 10])),
        Poison("bbox huge", Reason.BAD_METADATA, message(bbox=[0, 0, 10**9, 10])),
        Poison("bbox of 3", Reason.BAD_METADATA, message(bbox=[0, 0, 10])),
        Poison(
            "NaN in metadata",
            Reason.BAD_METADATA,
            with_com(meta_json().replace(b'"frame":7', b'"frame":NaN')),
        ),
        Poison(
            "duplicate face_id key",
            Reason.BAD_METADATA,
            with_com(meta_json()[:-1] + b',"face_id":"' + str(uuid.uuid4()).encode() + b'"}'),
        ),
        Poison("two metadata segments", Reason.BAD_METADATA, with_com(meta_json(), meta_json())),
        Poison(
            "metadata over 4 KiB",
            Reason.BAD_METADATA,
            message(note="n" * contract.MAX_METADATA_BYTES),
        ),
        Poison("200 COM segments", Reason.BAD_METADATA, with_com(*[b"x"] * 200)),
        Poison(
            "metadata in a list",
            Reason.BAD_METADATA,
            with_com(b"[" + meta_json() + b"]"),
        ),
        Poison("device_id mismatch", Reason.DEVICE_MISMATCH, message(device_id="cam-2")),
        Poison("device_id invalid", Reason.BAD_METADATA, message(device_id="bad id")),
        Poison("topic names no device", Reason.BAD_TOPIC, message(), topic="faces/bad id"),
        Poison("over max_bytes", Reason.TOO_LARGE, padded(message(), max_bytes + 1000)),
    ]
