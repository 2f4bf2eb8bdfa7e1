"""The message contract shared by face-detector, face-writer, the tests and third parties.

A face message is one MQTT payload on ``<prefix>/<device_id>``: a complete JPEG image whose
COM (comment, 0xFFFE) segment holds a UTF-8 JSON object with the face's metadata. The payload
is authoritative: MQTT v3.1.1 bridges drop MQTT v5 properties, so nothing that must reach the
cloud travels anywhere else. See services/README.md for the prose version of this module.

Validation is total: :func:`decode_face` either returns a valid face or raises
:class:`ContractError` with one of :class:`Reason`; no other exception escapes it, whatever the
bytes are. Every field is bounded, so the S3 user metadata of a valid face stays far below S3's
2 KB limit by construction (see :data:`MAX_S3_METADATA_BYTES` and the tests).
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})
CONTENT_TYPE: Final = "image/jpeg"
DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FACE_ID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PRINTABLE_RE: Final = re.compile(r"[\x20-\x7e]+")  # printable ASCII
REJECTED_PREFIX: Final = "rejected"
UNKNOWN_DEVICE: Final = "_unknown"  # rejected/<device>/... when the topic names no valid device

# Limits a valid face message stays within (third parties: services/README.md lists them).
MAX_METADATA_BYTES: Final = 4096  # the JSON object in the COM segment, UTF-8
MAX_DETECTOR_LEN: Final = 128
MAX_TRACK_ID_LEN: Final = 64
MAX_FRAME: Final = 2**53 - 1  # exact in every JSON implementation
MAX_BBOX: Final = 65535  # a JPEG's largest side
MAX_COM_SEGMENTS: Final = 16  # COM segments looked at for the metadata
MAX_SEGMENTS: Final = 256  # marker segments before the image data

# What S3 allows (AWS; MinIO and the others follow it) and what the set-aside copy keeps.
S3_METADATA_LIMIT: Final = 2048  # user metadata: names + values, UTF-8 bytes
SET_ASIDE_MAX_BYTES: Final = 64 * 1024  # a set-aside object holds at most this much payload

# Acknowledgements (writer -> edge): face ids per message, and the largest such message.
MAX_ACK_IDS: Final = 256
MAX_ACK_BYTES: Final = 64 + MAX_ACK_IDS * 39

_SOI: Final = b"\xff\xd8"
_EOI: Final = b"\xff\xd9"
_COM: Final = 0xFE
_SOS: Final = 0xDA
# Start-of-frame markers (baseline, progressive, lossless, arithmetic ...): not C4/C8/CC.
_SOF: Final = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_REQUIRED: Final = ("v", "face_id", "device_id", "captured_at", "frame", "bbox", "detector")
_TIME_RE: Final = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)",
    re.ASCII,  # \d: 0-9 only, not every Unicode digit
)
_FILL_RE: Final = re.compile(rb"\xff+")
_MAX_JSON_INT_DIGITS: Final = 20
_DETAIL_LIMIT: Final = 200
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


class Reason:
    """Why a message was set aside. The values appear in logs, metrics and S3 metadata."""

    EMPTY: Final = "empty"
    TOO_LARGE: Final = "too_large"
    NOT_JPEG: Final = "not_jpeg"
    NO_METADATA: Final = "no_metadata"
    BAD_METADATA: Final = "bad_metadata"
    UNSUPPORTED_VERSION: Final = "unsupported_version"
    TOO_OLD: Final = "too_old"
    IN_FUTURE: Final = "in_future"
    BAD_TOPIC: Final = "bad_topic"
    DEVICE_MISMATCH: Final = "device_mismatch"
    # Set by the writer, not by the contract: S3 itself would not take a valid face.
    S3_REFUSED: Final = "s3_refused"  # a permanent answer for this object (4xx)
    S3_GAVE_UP: Final = "s3_gave_up"  # failed --max-attempts times while S3 took other objects
    INTERNAL_ERROR: Final = "internal_error"  # a bug in the writer; the message is kept aside
    # Not a face message: an acknowledgement the edge could not read (logged, ignored).
    BAD_ACK: Final = "bad_ack"

    ALL: Final = (
        EMPTY,
        TOO_LARGE,
        NOT_JPEG,
        NO_METADATA,
        BAD_METADATA,
        UNSUPPORTED_VERSION,
        TOO_OLD,
        IN_FUTURE,
        BAD_TOPIC,
        DEVICE_MISMATCH,
        S3_REFUSED,
        S3_GAVE_UP,
        INTERNAL_ERROR,
    )  # every reason a message is set aside for (BAD_ACK is not one)


def printable(value: object, limit: int = _DETAIL_LIMIT) -> str:
    """``value`` as one line of printable ASCII for logs and S3 metadata, at most ``limit`` chars.

    Control characters and non-ASCII are escaped (``\\x1b``, ``\\u00e9``); a longer text is cut
    and says how long it was. Message content only reaches a log line or S3 metadata through
    this function (or after validation as printable ASCII).
    """
    if isinstance(value, bytes | bytearray):
        total = len(value)
        text = bytes(value[: limit + 1]).decode("latin-1")
    else:
        text = str(value)
        total = len(text)
        text = text[: limit + 1]
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group(0)):02x}", escaped)
    if total <= limit and len(escaped) <= limit:
        return escaped
    suffix = f"...({total} chars)"
    return escaped[: max(0, limit - len(suffix))] + suffix


class ContractError(ValueError):
    """A payload or topic that breaks the contract; ``reason`` is one of :class:`Reason`.

    ``detail`` is already safe to log (printable ASCII, bounded), whatever the message held.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        safe = printable(detail) if detail else ""
        super().__init__(f"{reason}: {safe}" if safe else reason)
        self.reason = reason
        self.detail = safe


@dataclass(frozen=True)
class TimeWindow:
    """Accepted ``captured_at`` relative to the receiver's clock: not older than ``max_age``,
    not more than ``max_future`` ahead (clock skew)."""

    max_age: timedelta = timedelta(days=7)
    max_future: timedelta = timedelta(minutes=5)

    def check(self, captured_at: datetime, now: datetime) -> None:
        if captured_at < now - self.max_age:
            raise ContractError(
                Reason.TOO_OLD,
                f"captured_at {format_time(captured_at)} is older than "
                f"{self.max_age.total_seconds():.0f}s",
            )
        if captured_at > now + self.max_future:
            raise ContractError(
                Reason.IN_FUTURE,
                f"captured_at {format_time(captured_at)} is more than "
                f"{self.max_future.total_seconds():.0f}s ahead of this clock",
            )


def is_valid_device_id(value: object) -> bool:
    return isinstance(value, str) and DEVICE_ID_RE.fullmatch(value) is not None


def is_valid_face_id(value: object) -> bool:
    return isinstance(value, str) and FACE_ID_RE.fullmatch(value) is not None


def _is_printable(value: object, limit: int) -> bool:
    return (
        isinstance(value, str) and len(value) <= limit and PRINTABLE_RE.fullmatch(value) is not None
    )


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T22:07:29.123Z``."""
    if moment.tzinfo is None:
        raise ValueError("captured_at must be timezone-aware")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_time(text: object) -> datetime:
    """An RFC 3339 timestamp with an explicit offset as an aware UTC datetime.

    Raises ValueError for anything else, out-of-range dates included (year 0001 with a
    positive offset, 9999 with a negative one).
    """
    found = _TIME_RE.fullmatch(text) if isinstance(text, str) else None
    if found is None:
        raise ValueError("not an RFC 3339 timestamp with offset")
    year, month, day, hour, minute, second, frac, zone = found.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    offset = timedelta(0)
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=UTC
        )
        return local - offset
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"out of range: {exc}") from None


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
        return validate_metadata(
            {
                "v": SCHEMA_VERSION,
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


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def validate_metadata(body: object) -> FaceMeta:
    """The metadata object as a :class:`FaceMeta`; ContractError for anything else."""

    def bad(detail: str) -> ContractError:
        return ContractError(Reason.BAD_METADATA, detail)

    if not isinstance(body, dict):
        raise bad("metadata is not a JSON object")
    missing = [name for name in _REQUIRED if name not in body]
    if missing and missing != ["v"]:
        raise bad("missing " + ", ".join(missing))
    version = body.get("v")
    if not _is_int(version, 0, 2**31) or version not in SUPPORTED_VERSIONS:
        raise ContractError(
            Reason.UNSUPPORTED_VERSION,
            f"v is {printable(json.dumps(version), 40)}; supported: "
            + ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS)),
        )
    face_id = body["face_id"]
    if not is_valid_face_id(face_id):
        raise bad("face_id is not a canonical lowercase UUID")
    device_id = body["device_id"]
    if not is_valid_device_id(device_id):
        raise bad("device_id does not match " + DEVICE_ID_RE.pattern)
    try:
        captured_at = parse_time(body["captured_at"])
    except ValueError as exc:
        raise bad(f"captured_at: {exc}") from None
    frame = body["frame"]
    if not _is_int(frame, 0, MAX_FRAME):
        raise bad(f"frame is not an integer in 0..{MAX_FRAME}")
    bbox = body["bbox"]
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(_is_int(v, 0, MAX_BBOX) for v in bbox)
        or bbox[2] == 0
        or bbox[3] == 0
    ):
        raise bad(f"bbox is not [x, y, w, h] of integers in 0..{MAX_BBOX} with w, h > 0")
    detector = body["detector"]
    if not _is_printable(detector, MAX_DETECTOR_LEN):
        raise bad(f"detector is not 1..{MAX_DETECTOR_LEN} printable ASCII characters")
    track_id = body.get("track_id")
    if track_id is not None and not _is_printable(track_id, MAX_TRACK_ID_LEN):
        raise bad(f"track_id is not 1..{MAX_TRACK_ID_LEN} printable ASCII characters")
    known = {*_REQUIRED, "track_id"}
    return FaceMeta(
        face_id=face_id,
        device_id=device_id,
        captured_at=captured_at,
        frame=frame,
        bbox=(bbox[0], bbox[1], bbox[2], bbox[3]),
        detector=detector,
        track_id=track_id,
        extra={k: v for k, v in body.items() if k not in known},
    )


def _metadata_json(meta: FaceMeta) -> bytes:
    text = json.dumps(meta.to_json_dict(), separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def encode_face(jpeg: bytes, meta: FaceMeta) -> bytes:
    """Return ``jpeg`` with ``meta`` as a COM segment right after the SOI marker."""
    if not jpeg.startswith(_SOI):
        raise ValueError("not a JPEG image (no SOI marker)")
    data = _metadata_json(meta)
    if len(data) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {len(data)} bytes, over {MAX_METADATA_BYTES}")
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
        if marker == 0xFF:  # fill bytes: skip the whole run at once (one byte at a time is slow)
            fill = _FILL_RE.match(payload, pos)
            assert fill is not None
            pos = fill.end() - 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8, 0xD9):  # markers without length
            raise ContractError(Reason.NOT_JPEG, f"marker 0x{marker:02x} before the image data")
        (length,) = struct.unpack_from(">H", payload, pos + 2)
        if length < 2 or pos + 2 + length > size:
            raise ContractError(Reason.NOT_JPEG, "truncated segment")
        found.append((marker, payload[pos + 4 : pos + 2 + length]))
        if marker == _SOS:
            return found
        if len(found) > MAX_SEGMENTS:
            raise ContractError(Reason.NOT_JPEG, f"more than {MAX_SEGMENTS} marker segments")
        pos += 2 + length
    raise ContractError(Reason.NOT_JPEG, "no image data (SOS) found")


def _check_frame_header(segments: list[tuple[int, bytes]]) -> None:
    headers = [body for marker, body in segments if marker in _SOF]
    if len(headers) != 1 or len(headers[0]) < 6:
        raise ContractError(Reason.NOT_JPEG, "no single frame header (SOF) before the image data")
    height, width = struct.unpack_from(">HH", headers[0], 1)
    if height == 0 or width == 0:
        raise ContractError(Reason.NOT_JPEG, f"image of {width}x{height} pixels")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_metadata(body: bytes) -> object:
    """One COM segment's JSON; ValueError (or RecursionError) for anything that is not JSON."""
    return json.loads(
        body.decode("utf-8"),
        object_pairs_hook=_reject_duplicates,
        parse_int=_bounded_int,
        parse_constant=_no_constant,
    )


def _looks_like_metadata(body: bytes) -> bool:
    return body.lstrip(b" \t\r\n").startswith(b"{") and b'"face_id"' in body


def decode_face(
    payload: bytes,
    max_bytes: int | None = None,
    *,
    window: TimeWindow | None = None,
    now: datetime | None = None,
) -> tuple[FaceMeta, bytes]:
    """Validate a face message; return its metadata and the payload itself (the JPEG).

    With ``window``, ``captured_at`` must lie in it relative to ``now`` (default: this clock).
    Raises :class:`ContractError` naming the reason for anything that breaks the contract and
    never any other exception.
    """
    try:
        meta = _decode(payload, max_bytes)
    except ContractError:
        raise
    except Exception as exc:  # total: nothing a message holds may escape as another error
        raise ContractError(Reason.BAD_METADATA, f"{type(exc).__name__}: {exc}") from None
    if window is not None:
        window.check(meta.captured_at, now or datetime.now(UTC))
    return meta, payload


def _decode(payload: bytes, max_bytes: int | None) -> FaceMeta:
    if not payload:
        raise ContractError(Reason.EMPTY)
    if max_bytes is not None and len(payload) > max_bytes:
        raise ContractError(Reason.TOO_LARGE, f"{len(payload)} bytes > {max_bytes}")
    if not payload.startswith(_SOI) or not payload.rstrip(b"\x00").endswith(_EOI):
        raise ContractError(Reason.NOT_JPEG, "missing SOI/EOI markers")
    segments = _segments(payload)
    _check_frame_header(segments)
    comments = [body for marker, body in segments if marker == _COM][:MAX_COM_SEGMENTS]
    candidates = [body for body in comments if _looks_like_metadata(body)]
    if not comments:
        raise ContractError(Reason.NO_METADATA, "no COM segment")
    if not candidates:
        raise ContractError(Reason.BAD_METADATA, "no COM segment holds a JSON object with face_id")
    if len(candidates) > 1:
        raise ContractError(Reason.BAD_METADATA, f"{len(candidates)} COM segments name a face_id")
    body = candidates[0]
    if len(body) > MAX_METADATA_BYTES:
        raise ContractError(
            Reason.BAD_METADATA, f"metadata is {len(body)} bytes, over {MAX_METADATA_BYTES}"
        )
    try:
        obj = _parse_metadata(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ContractError(Reason.BAD_METADATA, f"not JSON: {exc}") from None
    return validate_metadata(obj)


def face_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}"


def status_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/status"


# The detector's retained status (``status_topic``), one of these UTF-8 words:
# running and connected, the camera delivering frames (or a file playing);
STATUS_ONLINE: Final = "online"
# running and connected, but the camera cannot be opened or stopped delivering frames;
STATUS_CAMERA_DOWN: Final = "camera-down"
# not running: a clean exit, or the Last Will when its connection died.
STATUS_OFFLINE: Final = "offline"
STATUSES: Final = (STATUS_ONLINE, STATUS_CAMERA_DOWN, STATUS_OFFLINE)


ACK_SUFFIX: Final = "-ack"


def ack_topic(prefix: str, device_id: str) -> str:
    """``<prefix>-ack/<device_id>``: where the writer acknowledges a device's faces (carried
    back by its bridge). A tree of its own, outside ``<prefix>/<device>/#``, which each edge may
    write: only the writer may write here, so an edge cannot forge acknowledgements."""
    return f"{prefix}{ACK_SUFFIX}/{device_id}"


def encode_ack(face_ids: Sequence[str]) -> bytes:
    """An acknowledgement: ``{"v": 1, "face_ids": [...]}`` for at most MAX_ACK_IDS faces."""
    if not 0 < len(face_ids) <= MAX_ACK_IDS or not all(map(is_valid_face_id, face_ids)):
        raise ValueError(f"an ack names 1..{MAX_ACK_IDS} canonical face ids")
    body = {"v": SCHEMA_VERSION, "face_ids": list(face_ids)}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_ack(payload: bytes) -> list[str]:
    """The face ids an acknowledgement names; ContractError(BAD_ACK) for anything else."""
    try:
        if len(payload) > MAX_ACK_BYTES:
            raise ValueError(f"{len(payload)} bytes")
        body = _parse_metadata(payload)
        if not isinstance(body, dict) or body.get("v") not in SUPPORTED_VERSIONS:
            raise ValueError("not a version 1 ack object")
        ids = body.get("face_ids")
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_ACK_IDS:
            raise ValueError(f"face_ids is not a list of 1..{MAX_ACK_IDS}")
        if not all(map(is_valid_face_id, ids)):
            raise ValueError("face_ids holds something that is not a canonical face id")
        return list(ids)
    except (ValueError, RecursionError) as exc:
        raise ContractError(Reason.BAD_ACK, str(exc)) from None


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


def rejected_device(prefix: str, topic: str) -> str:
    """The device a set-aside message is filed under: the topic's, or :data:`UNKNOWN_DEVICE`."""
    try:
        return device_from_topic(prefix, topic)
    except ContractError:
        return UNKNOWN_DEVICE


def rejected_key(device: str, received_at: datetime, rejected_id: str) -> str:
    """``rejected/<device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>_<uuid>.bin`` at the bucket root."""
    return f"{REJECTED_PREFIX}/{device}/{_stamp(received_at)}_{rejected_id}.bin"


def s3_metadata(meta: FaceMeta) -> dict[str, str]:
    """The contract's fields as S3 user metadata (printable ASCII, bounded: under 2 KB)."""
    fields = {
        "face-id": meta.face_id,
        "device-id": meta.device_id,
        "captured-at": format_time(meta.captured_at),
        "frame": str(meta.frame),
        "bbox": ",".join(str(v) for v in meta.bbox),
        "detector": meta.detector,
    }
    if meta.track_id is not None:
        fields["track-id"] = meta.track_id
    return fields


def rejected_metadata(reason: str, topic: str, detail: str, size: int, kept: int) -> dict[str, str]:
    """S3 user metadata for a set-aside message: why, the topic it came on, its real size and
    whether the copy holds less than that (``kept`` bytes)."""
    return {
        "reason": reason,
        "topic": printable(topic, 256),
        "detail": printable(detail, 256),
        "size": str(size),
        "truncated": "true" if kept < size else "false",
    }


def metadata_bytes(metadata: Mapping[str, str]) -> int:
    """Size of user metadata as S3 counts it against its 2 KB limit (names with their
    ``x-amz-meta-`` prefix, to be safe, plus values, UTF-8)."""
    return sum(len(f"x-amz-meta-{k}".encode()) + len(v.encode()) for k, v in metadata.items())


MAX_S3_METADATA_BYTES: Final = metadata_bytes(
    {
        "face-id": "0" * 36,
        "device-id": "d" * 64,
        "captured-at": "2026-11-25T22:07:29.123Z",
        "frame": str(MAX_FRAME),
        "bbox": ",".join([str(MAX_BBOX)] * 4),
        "detector": "x" * MAX_DETECTOR_LEN,
        "track-id": "t" * MAX_TRACK_ID_LEN,
    }
)
assert MAX_S3_METADATA_BYTES < S3_METADATA_LIMIT // 2
