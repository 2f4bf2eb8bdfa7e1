"""The message contract shared by face-detector, face-writer, the tests and third parties.

A face message is one MQTT payload on ``<prefix>/<device_id>``: a complete JPEG image whose
COM (comment, 0xFFFE) segment holds a UTF-8 JSON object with the face's metadata. The payload
is authoritative: MQTT v3.1.1 bridges drop MQTT v5 properties, so nothing that must reach the
cloud travels anywhere else. See services/README.md for the prose version of this module.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

SCHEMA_VERSION: Final = 1
CONTENT_TYPE: Final = "image/jpeg"
DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REJECTED_PREFIX: Final = "rejected"
MAX_DETECTOR_LEN: Final = 128
MAX_TRACK_ID_LEN: Final = 64
MAX_COM_BYTES: Final = 65533  # a JPEG segment length field is 16 bits and counts itself

_SOI: Final = b"\xff\xd8"
_EOI: Final = b"\xff\xd9"
_COM: Final = 0xFE
_SOS: Final = 0xDA
_REQUIRED: Final = ("face_id", "device_id", "captured_at", "frame", "bbox", "detector")


class Reason:
    """Why a message was set aside. The values appear in logs, metrics and S3 metadata."""

    EMPTY: Final = "empty"
    TOO_LARGE: Final = "too_large"
    NOT_JPEG: Final = "not_jpeg"
    NO_METADATA: Final = "no_metadata"
    BAD_METADATA: Final = "bad_metadata"
    BAD_TOPIC: Final = "bad_topic"
    DEVICE_MISMATCH: Final = "device_mismatch"

    ALL: Final = (EMPTY, TOO_LARGE, NOT_JPEG, NO_METADATA, BAD_METADATA, BAD_TOPIC, DEVICE_MISMATCH)


class ContractError(ValueError):
    """A payload or topic that breaks the contract; ``reason`` is one of :class:`Reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_valid_device_id(value: str) -> bool:
    return DEVICE_ID_RE.fullmatch(value) is not None


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T22:07:29.123Z``."""
    if moment.tzinfo is None:
        raise ValueError("captured_at must be timezone-aware")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset; returns an aware UTC datetime."""
    if not isinstance(text, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", text
    ):
        raise ValueError(f"not an RFC 3339 timestamp with offset: {text!r}")
    head, _, rest = text.partition(".")
    if rest:  # fromisoformat wants at most 6 fractional digits
        digits = re.match(r"\d+", rest)
        assert digits is not None
        frac = digits.group(0)
        text = f"{head}.{frac[:6].ljust(6, '0')}{rest[len(frac) :]}"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True)
class FaceMeta:
    """Metadata of one published face crop."""

    face_id: str
    device_id: str
    captured_at: datetime
    frame: int
    bbox: tuple[int, int, int, int]
    detector: str
    track_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def new(
        cls,
        *,
        device_id: str,
        captured_at: datetime,
        frame: int,
        bbox: tuple[int, int, int, int],
        detector: str,
        track_id: str | None = None,
    ) -> FaceMeta:
        """A fresh face with a new UUID4 ``face_id``; validates like :func:`decode_face`."""
        return _validated(
            {
                "face_id": str(uuid.uuid4()),
                "device_id": device_id,
                "captured_at": format_time(captured_at),
                "frame": frame,
                "bbox": list(bbox),
                "detector": detector,
                **({"track_id": track_id} if track_id is not None else {}),
            }
        )

    def to_json_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extra,
            "v": SCHEMA_VERSION,
            "face_id": self.face_id,
            "device_id": self.device_id,
            "captured_at": format_time(self.captured_at),
            "frame": self.frame,
            "bbox": list(self.bbox),
            "detector": self.detector,
        }
        if self.track_id is not None:
            body["track_id"] = self.track_id
        return body


def _validated(body: Any) -> FaceMeta:
    def bad(detail: str) -> ContractError:
        return ContractError(Reason.BAD_METADATA, detail)

    if not isinstance(body, dict):
        raise bad("metadata is not a JSON object")
    missing = [name for name in _REQUIRED if name not in body]
    if missing:
        raise bad("missing " + ", ".join(missing))
    face_id = body["face_id"]
    try:
        parsed = uuid.UUID(face_id) if isinstance(face_id, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.version != 4 or str(parsed) != face_id.lower():
        raise bad("face_id is not a UUID4 string")
    device_id = body["device_id"]
    if not isinstance(device_id, str) or not is_valid_device_id(device_id):
        raise bad("device_id does not match " + DEVICE_ID_RE.pattern)
    try:
        captured_at = parse_time(body["captured_at"])
    except ValueError as exc:
        raise bad(f"captured_at: {exc}") from None
    frame = body["frame"]
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise bad("frame is not a non-negative integer")
    bbox = body["bbox"]
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in bbox)
        or bbox[0] < 0
        or bbox[1] < 0
        or bbox[2] <= 0
        or bbox[3] <= 0
    ):
        raise bad("bbox is not [x, y, w, h] with x, y >= 0 and w, h > 0")
    detector = body["detector"]
    if not isinstance(detector, str) or not 0 < len(detector) <= MAX_DETECTOR_LEN:
        raise bad(f"detector is not a string of 1..{MAX_DETECTOR_LEN} characters")
    track_id = body.get("track_id")
    if track_id is not None and (
        not isinstance(track_id, str) or not 0 < len(track_id) <= MAX_TRACK_ID_LEN
    ):
        raise bad(f"track_id is not a string of 1..{MAX_TRACK_ID_LEN} characters")
    known = {*_REQUIRED, "track_id", "v"}
    return FaceMeta(
        face_id=face_id.lower(),
        device_id=device_id,
        captured_at=captured_at,
        frame=frame,
        bbox=(bbox[0], bbox[1], bbox[2], bbox[3]),
        detector=detector,
        track_id=track_id,
        extra={k: v for k, v in body.items() if k not in known},
    )


def encode_face(jpeg: bytes, meta: FaceMeta) -> bytes:
    """Return ``jpeg`` with ``meta`` as a COM segment right after the SOI marker."""
    if not jpeg.startswith(_SOI):
        raise ValueError("not a JPEG image (no SOI marker)")
    text = json.dumps(meta.to_json_dict(), separators=(",", ":"), ensure_ascii=False)
    data = text.encode("utf-8")
    if len(data) > MAX_COM_BYTES:
        raise ValueError("metadata does not fit in one JPEG COM segment")
    return _SOI + struct.pack(">BBH", 0xFF, _COM, len(data) + 2) + data + jpeg[2:]


def _segments(payload: bytes) -> list[tuple[int, bytes]]:
    """Marker segments between SOI and SOS (headers only; entropy-coded data is not parsed)."""
    found: list[tuple[int, bytes]] = []
    pos = 2
    size = len(payload)
    while pos + 4 <= size:
        if payload[pos] != 0xFF:
            raise ContractError(Reason.NOT_JPEG, f"no marker at byte {pos}")
        marker = payload[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", payload, pos + 2)
        if length < 2 or pos + 2 + length > size:
            raise ContractError(Reason.NOT_JPEG, "truncated segment")
        found.append((marker, payload[pos + 4 : pos + 2 + length]))
        if marker == _SOS:
            return found
        pos += 2 + length
    raise ContractError(Reason.NOT_JPEG, "no image data (SOS) found")


def decode_face(payload: bytes, max_bytes: int | None = None) -> tuple[FaceMeta, bytes]:
    """Validate a face message; return its metadata and the payload itself (the JPEG).

    Raises :class:`ContractError` naming the reason for anything that breaks the contract.
    """
    if not payload:
        raise ContractError(Reason.EMPTY)
    if max_bytes is not None and len(payload) > max_bytes:
        raise ContractError(Reason.TOO_LARGE, f"{len(payload)} bytes > {max_bytes}")
    if not payload.startswith(_SOI) or not payload.rstrip(b"\x00").endswith(_EOI):
        raise ContractError(Reason.NOT_JPEG, "missing SOI/EOI markers")
    comments = [body for marker, body in _segments(payload) if marker == _COM]
    for body in comments:
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict) and "face_id" in obj:
            return _validated(obj), payload
    if comments:
        raise ContractError(Reason.BAD_METADATA, "no COM segment holds a JSON object with face_id")
    raise ContractError(Reason.NO_METADATA, "no COM segment")


def face_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}"


def status_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/status"


def share_subscription(group: str, prefix: str) -> str:
    """The writers' shared subscription: one topic level below the prefix, face messages only."""
    return f"$share/{group}/{prefix}/+"


def device_from_topic(prefix: str, topic: str) -> str:
    """The device id a face topic names; raises ContractError(BAD_TOPIC) otherwise."""
    head, sep, device_id = topic.rpartition("/")
    if not sep or head != prefix or not is_valid_device_id(device_id):
        raise ContractError(Reason.BAD_TOPIC, f"unexpected topic {topic!r}")
    return device_id


def check_topic(prefix: str, topic: str, meta: FaceMeta) -> None:
    """The device id in the topic and in the metadata must agree."""
    device_id = device_from_topic(prefix, topic)
    if device_id != meta.device_id:
        raise ContractError(
            Reason.DEVICE_MISMATCH,
            f"topic says {device_id!r}, metadata says {meta.device_id!r}",
        )


def _stamp(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y/%m/%d/%H%M%S.") + f"{utc.microsecond // 1000:03d}"


def face_key(s3_prefix: str, meta: FaceMeta) -> str:
    """``<prefix>/<device_id>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>_<face_id>.jpg`` (UTC).

    Derived from the metadata only, so a redelivered message overwrites the same key.
    """
    key = f"{meta.device_id}/{_stamp(meta.captured_at)}_{meta.face_id}.jpg"
    prefix = s3_prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def rejected_key(received_at: datetime, rejected_id: str) -> str:
    """``rejected/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>_<uuid>.bin`` at the bucket root."""
    return f"{REJECTED_PREFIX}/{_stamp(received_at)}_{rejected_id}.bin"


def _ascii(value: str, limit: int) -> str:
    """S3 user metadata must be ASCII: escape anything else, cap the length."""
    return value.encode("ascii", "backslashreplace").decode("ascii")[:limit]


def s3_metadata(meta: FaceMeta) -> dict[str, str]:
    """The contract's fields as S3 user metadata (ASCII, well within S3's 2 KB limit)."""
    fields = {
        "face-id": meta.face_id,
        "device-id": meta.device_id,
        "captured-at": format_time(meta.captured_at),
        "frame": str(meta.frame),
        "bbox": ",".join(str(v) for v in meta.bbox),
        "detector": _ascii(meta.detector, 4 * MAX_DETECTOR_LEN),
    }
    if meta.track_id is not None:
        fields["track-id"] = _ascii(meta.track_id, 4 * MAX_TRACK_ID_LEN)
    return fields


def rejected_metadata(reason: str, topic: str, detail: str) -> dict[str, str]:
    """S3 user metadata for a set-aside message: the reason and the topic it came on."""
    return {
        "reason": reason,
        "topic": _ascii(topic, 512),
        "detail": _ascii(detail, 512),
    }
