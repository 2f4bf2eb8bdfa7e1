"""A camera URL with credentials is a secret: read from a systemd credential, never logged.

The face_detector role passes a URL source as the ``camera-source`` credential (a root-only file,
``LoadCredential=``), not in the environment file; the detector reads it before the environment,
and shows a URL in logs as ``scheme://***@host/path?***``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from facepipe.config import ConfigError, parse_config
from facepipe.detector import DetectorConfig
from facepipe.frames import LiveSource, open_source, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:s3cret@10.0.0.5:554/stream1", "rtsp://***@10.0.0.5:554/stream1"),
        # A password with @, / or : (cameras and NVRs accept them unescaped): nothing of it shows.
        ("rtsp://admin:p@ss@cam.local/live", "rtsp://***@cam.local/live"),
        ("rtsp://admin:pa/ss:wd@cam.local/live", "rtsp://***@cam.local/live"),
        ("rtsp://admin@cam.local/live", "rtsp://***@cam.local/live"),
        # Credentials in the query string (snapshot URLs of cheap cameras) are hidden whole.
        ("http://cam.local/snap.cgi?user=admin&pwd=s3cret", "http://cam.local/snap.cgi?***"),
        ("http://cam.local/video#token=abc", "http://cam.local/video#***"),
        # ... and so is a path that holds them (XMEye, Dahua).
        (
            "rtsp://192.0.2.7:554/user=admin&password=s3cret&channel=1&stream=0.sdp",
            "rtsp://192.0.2.7:554/***",
        ),
        ("rtsp://cam.local/live", "rtsp://cam.local/live"),
        ("not a url", "***"),
    ],
)
def test_logs_show_a_url_without_its_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@given(
    password=st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
        min_size=6,
        max_size=40,
    )
)
def test_no_password_shows_whatever_it_holds(password: str) -> None:
    url = f"rtsp://admin:{password}@cam.local:554/Streaming/Channels/101"
    assert password not in redact_url(url)


def test_a_stream_that_cannot_be_opened_is_logged_without_its_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.DEBUG),
        open_source("rtsp://admin:p@ss/w0rd@127.0.0.1:1/none") as source,
    ):
        assert isinstance(source, LiveSource)
        deadline = time.monotonic() + 20
        while "cannot" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "rtsp://***@127.0.0.1:1/none" in caplog.text
    assert "p@ss" not in caplog.text and "w0rd" not in caplog.text


def credentials(tmp_path: Path, content: str) -> dict[str, str]:
    (tmp_path / "camera-source").write_text(content)
    return {"CREDENTIALS_DIRECTORY": str(tmp_path)}


def test_the_camera_source_credential_wins_over_the_environment(tmp_path: Path) -> None:
    env = credentials(tmp_path, "rtsp://admin:s3cret@cam.local/live\n")
    cfg = parse_config(
        DetectorConfig, "face-detector", "", [], {**env, "FACEPIPE_SOURCE": "/dev/video0"}
    )
    assert cfg.source == "rtsp://admin:s3cret@cam.local/live"
    cfg = parse_config(DetectorConfig, "face-detector", "", [], env)  # the env file has no source
    assert cfg.source == "rtsp://admin:s3cret@cam.local/live"


def test_a_flag_still_wins_over_the_credential(tmp_path: Path) -> None:
    env = credentials(tmp_path, "rtsp://admin:s3cret@cam.local/live")
    cfg = parse_config(DetectorConfig, "face-detector", "", ["--source", "/tmp/clip.mp4"], env)
    assert cfg.source == "/tmp/clip.mp4"


def test_an_empty_credential_is_an_error_that_shows_no_value(tmp_path: Path) -> None:
    env = credentials(tmp_path, "")
    with pytest.raises(ConfigError, match=r"credential camera-source.*is empty") as caught:
        parse_config(DetectorConfig, "face-detector", "", [], env)
    assert "rtsp" not in str(caught.value)
