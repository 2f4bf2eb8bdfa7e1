"""End to end: face-detector on the sample clip -> mosquitto -> face-writer -> S3 (moto)."""

from __future__ import annotations

import re

import pytest
from conftest import program_env, start_program, wait_for
from test_writer import (
    _no_leaked_writers,  # noqa: F401 (autouse: no leaked writers)
    face_keys,
    start_writer,
    stop_writer,
    writer_env,
)
from writer_helpers import final_counter, log_text

from facepipe import contract

DEVICE = "edge-e2e"


@pytest.mark.parametrize("outbox", [False, True], ids=["broker-acks", "outbox"])
def test_detector_to_broker_to_writer_to_s3(mosquitto, s3, sample_clip, tmp_path, outbox):
    """With an outbox, the finished clip also waits for the writer's acknowledgement of every
    face, and the outbox is empty at the end."""
    clip, truth = sample_clip
    writer_log = tmp_path / "writer.log"
    writer = start_writer(writer_env(mosquitto, s3), writer_log)
    detector_log = tmp_path / "detector.log"
    detector = start_program(
        "detector",
        program_env(
            mosquitto.env,
            {
                "FACEPIPE_SOURCE": str(clip),
                "FACEPIPE_DEVICE_ID": DEVICE,
                "FACEPIPE_REALTIME": "false",
                **({"FACEPIPE_OUTBOX_DIR": str(tmp_path / "outbox")} if outbox else {}),
            },
        ),
        log=detector_log,
    )
    assert detector.wait(120) == 0, log_text(detector_log)
    stopped = [line for line in log_text(detector_log).splitlines() if "stopped:" in line][-1]
    published = int(re.search(r"\backed=(\d+)", stopped).group(1))
    assert published > 0, stopped
    if outbox:
        assert not list((tmp_path / "outbox").glob("*.face"))
        assert f"e2e_acked={published}" in stopped, stopped
    wait_for(lambda: len(face_keys(s3)) >= published, 30, f"{published} faces in S3")
    keys = face_keys(s3)
    assert len(keys) == published
    face_segments = [s for s in truth["segments"] if s["faces"]]
    for key in keys:
        obj = s3.client.get_object(Bucket=s3.bucket, Key=key)
        meta, _ = contract.decode_face(obj["Body"].read())
        assert key == contract.face_key("faces", meta)
        assert key.startswith(f"faces/{DEVICE}/")
        assert obj["ContentType"] == "image/jpeg"
        assert obj["Metadata"] == contract.s3_metadata(meta)
        assert any(s["start"] <= meta.frame < s["end"] for s in face_segments), meta.frame
    assert s3.keys("rejected/") == []
    assert stop_writer(writer) == 0
    assert final_counter(writer_log, "stored") == published
