"""The message contract: every bad message is a ContractError with a reason, never anything else.

Fuzzed with hypothesis over payload bytes, over JPEG structure and over the metadata JSON: the
only outcomes are a valid face or a rejection.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from poison import DEVICE, TOPIC, good_fields, message, poison_classes, with_com
from writer_helpers import FACE_TIME_BASE, jpeg_bytes, make_face

from facepipe import contract
from facepipe.contract import ContractError, Reason

MAX_BYTES = 200_000
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(payload: bytes, topic: str = TOPIC) -> str:
    """'ok' or the reason; any other exception fails the test that calls it."""
    try:
        meta, _ = contract.decode_face(payload, MAX_BYTES, window=contract.TimeWindow())
        contract.check_topic("faces", topic, meta)
    except ContractError as exc:
        assert exc.reason in Reason.ALL
        assert len(str(exc)) <= 300 and str(exc).isprintable() and str(exc).isascii()
        return exc.reason
    return "ok"


def test_round_trip_keeps_every_field():
    meta, payload = make_face("cam.2", 42)
    decoded, body = contract.decode_face(payload, window=contract.TimeWindow())
    assert decoded == meta and body == payload
    assert decoded.to_json_dict()["v"] == contract.SCHEMA_VERSION


def test_unknown_fields_are_kept_but_never_reach_s3_metadata():
    payload = message(note="hello", zone={"a": 1})
    meta, _ = contract.decode_face(payload)
    assert meta.extra == {"note": "hello", "zone": {"a": 1}}
    assert set(contract.s3_metadata(meta)) == {
        "face-id",
        "device-id",
        "captured-at",
        "frame",
        "bbox",
        "detector",
        "track-id",
    }


@pytest.mark.parametrize("poison", poison_classes(MAX_BYTES), ids=lambda p: p.name)
def test_each_poison_class_is_rejected_with_its_reason(poison):
    assert outcome(poison.payload, poison.topic) == poison.reason


def test_there_are_at_least_25_classes_covering_every_contract_reason():
    classes = poison_classes(MAX_BYTES)
    assert len(classes) >= 25
    writer_only = {Reason.S3_REFUSED, Reason.S3_GAVE_UP, Reason.INTERNAL_ERROR}
    assert {p.reason for p in classes} == set(Reason.ALL) - writer_only


def test_largest_valid_metadata_fits_s3_limit_by_construction():
    meta = contract.validate_metadata(
        good_fields(
            device_id="d" * 64,
            frame=contract.MAX_FRAME,
            bbox=[contract.MAX_BBOX] * 4,
            detector="~" * contract.MAX_DETECTOR_LEN,
            track_id="~" * contract.MAX_TRACK_ID_LEN,
        )
    )
    size = contract.metadata_bytes(contract.s3_metadata(meta))
    assert size <= contract.MAX_S3_METADATA_BYTES < contract.S3_METADATA_LIMIT
    rejected = contract.rejected_metadata(
        Reason.INTERNAL_ERROR, "t\x00" * 40000, "d\r\n" * 40000, 2**40, 65536
    )
    assert contract.metadata_bytes(rejected) < contract.S3_METADATA_LIMIT
    assert all(v.isascii() and v.isprintable() for v in rejected.values())


def test_time_window_is_relative_to_the_receiver_clock():
    window = contract.TimeWindow(max_age=timedelta(hours=1), max_future=timedelta(seconds=30))
    now = datetime(2030, 1, 1, tzinfo=UTC)
    window.check(now - timedelta(minutes=59), now)
    window.check(now + timedelta(seconds=29), now)
    with pytest.raises(ContractError) as old:
        window.check(now - timedelta(minutes=61), now)
    assert old.value.reason == Reason.TOO_OLD
    with pytest.raises(ContractError) as future:
        window.check(now + timedelta(seconds=31), now)
    assert future.value.reason == Reason.IN_FUTURE


def test_rejected_keys_name_the_device_or_unknown():
    at = datetime(2026, 11, 25, 22, 7, 29, 123000, tzinfo=UTC)
    assert contract.rejected_device("faces", "faces/cam-1") == "cam-1"
    assert contract.rejected_device("faces", "faces/bad id") == contract.UNKNOWN_DEVICE
    assert contract.rejected_device("faces", "other/cam-1") == contract.UNKNOWN_DEVICE
    key = contract.rejected_key("cam-1", at, "u")
    assert key == "rejected/cam-1/2026/11/25/220729.123_u.bin"
    assert not contract.is_valid_device_id(contract.UNKNOWN_DEVICE)


def test_printable_escapes_and_bounds_anything():
    assert contract.printable("a\r\nb\x1b\x00é") == "a\\x0d\\x0ab\\x1b\\x00\\xe9"
    long = contract.printable("y" * 5000, 100)
    assert len(long) == 100 and long.endswith("...(5000 chars)")
    assert contract.printable(b"\xff" * 10**6, 50).endswith("(1000000 chars)")


@given(st.text(), st.integers(min_value=20, max_value=400))
def test_printable_is_one_short_line_of_ascii(text, limit):
    out = contract.printable(text, limit)
    assert len(out) <= limit and out.isascii() and out.isprintable()


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_any_bytes_are_a_face_or_a_rejection(data):
    assert outcome(data) in {"ok", *Reason.ALL}
    assert outcome(b"\xff\xd8" + data) in {"ok", *Reason.ALL}
    assert outcome(jpeg_bytes(1)[:40] + data + b"\xff\xd9") in {"ok", *Reason.ALL}


@FUZZ
@given(st.binary(max_size=contract.MAX_METADATA_BYTES + 100))
def test_fuzz_any_comment_bytes_are_a_face_or_a_rejection(body):
    assert outcome(with_com(body)) in {"ok", *Reason.ALL}
    assert outcome(with_com(b'{"face_id":' + body)) in {"ok", *Reason.ALL}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
FIELDS = ["v", "face_id", "device_id", "captured_at", "frame", "bbox", "detector", "track_id"]


@FUZZ
@given(st.sampled_from(FIELDS), JSON_VALUES)
def test_fuzz_any_value_in_any_field_is_a_face_or_a_rejection(name, value):
    body = json.dumps(good_fields(**{name: value})).encode("utf-8", "surrogatepass")
    result = outcome(with_com(body))
    assert result in {"ok", *Reason.ALL}
    if result == "ok":  # then it really is within every documented bound
        meta, _ = contract.decode_face(with_com(body))
        assert contract.metadata_bytes(contract.s3_metadata(meta)) <= contract.S3_METADATA_LIMIT
        assert all(v.isascii() and v.isprintable() for v in contract.s3_metadata(meta).values())


@FUZZ
@given(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=10))
def test_fuzz_any_json_object_is_a_face_or_a_rejection(obj):
    obj.setdefault("face_id", str(uuid.uuid4()))
    body = json.dumps(obj).encode("utf-8", "surrogatepass")
    assert outcome(with_com(body)) in {"ok", *Reason.ALL}


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_messages_are_a_face_or_a_rejection(data):
    _, payload = make_face(DEVICE, data.draw(st.integers(0, 50)))
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    assert outcome(bytes(mutated)) in {"ok", *Reason.ALL}


@FUZZ
@given(
    st.from_regex(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,12})?(Z|[+-]\d\d:\d\d)", fullmatch=True)
)
def test_fuzz_timestamps_parse_or_raise_value_error(text):
    try:
        parsed = contract.parse_time(text)
    except ValueError:
        return
    assert parsed.tzinfo is UTC


def test_detector_side_new_faces_validate_and_stay_in_the_window():
    meta = contract.FaceMeta.new(
        device_id=DEVICE,
        captured_at=FACE_TIME_BASE,
        frame=1,
        bbox=(1, 2, 3, 4),
        detector="haar:frontalface_default",
    )
    assert contract.is_valid_face_id(meta.face_id) and uuid.UUID(meta.face_id).version == 4
    with pytest.raises(ContractError):
        contract.FaceMeta.new(
            device_id=DEVICE, captured_at=FACE_TIME_BASE, frame=-1, bbox=(1, 2, 3, 4), detector="x"
        )
