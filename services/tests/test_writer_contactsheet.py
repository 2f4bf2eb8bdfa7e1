"""facepipe-contact-sheet: a self-contained HTML page, checked in a real headless browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import program_env
from writer_helpers import jpeg_bytes, make_face

from facepipe import contract

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL_KEY = 'faces/evil/<img src=x onerror="alert(1)">.jpg'


def fill_bucket(s3) -> list[contract.FaceMeta]:
    metas = []
    for i in range(5):
        meta, payload = make_face("cam-1" if i % 2 else "cam.2", i, jpeg=jpeg_bytes(i, size=400))
        s3.client.put_object(
            Bucket=s3.bucket,
            Key=contract.face_key("faces", meta),
            Body=payload,
            ContentType="image/jpeg",
            Metadata=contract.s3_metadata(meta),
        )
        metas.append(meta)  # same second: ordered by capture stamp (later index, later)
    time.sleep(1.05)  # S3 LastModified has one-second resolution: the next one is newest
    s3.client.put_object(Bucket=s3.bucket, Key=EVIL_KEY, Body=b"not an image")
    s3.client.put_object(Bucket=s3.bucket, Key="rejected/2026/x.bin", Body=b"outside the prefix")
    return metas


def sheet_env(s3) -> dict[str, str]:
    env = program_env(s3.env)
    del env["FACEPIPE_STATS_INTERVAL"]  # not an option of the contact sheet: it would be refused
    return env


def make_sheet(s3, out: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "facepipe.contactsheet", "--output", str(out), *args],
        env=sheet_env(s3),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return out.read_text()


@pytest.fixture
def sheet(s3, tmp_path):
    metas = fill_bucket(s3)
    page = make_sheet(s3, tmp_path / "sheet.html", "--limit", "4", "--thumb-size", "120")
    return metas, page, tmp_path / "sheet.html"


def test_contact_sheet_html_is_bounded_escaped_and_self_contained(sheet):
    metas, page, _ = sheet
    assert page.count("<figure") == 4  # --limit: the newest four of six objects
    assert "not a decodable image" in page  # the evil object is the newest
    assert 'onerror="alert(1)"' not in page and "&lt;img src=x onerror=" in page
    counts = dict(re.findall(r'data-device="([^"]+)">[^<]*<b>(\d+)</b>', page))
    assert counts == {"cam-1": "2", "cam.2": "3", "evil": "1"}
    newest = metas[-3:]
    for meta in newest:
        assert contract.face_key("faces", meta) in page
        assert contract.format_time(meta.captured_at) in page
    assert contract.face_key("faces", metas[0]) not in page
    assert "rejected/" not in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_contact_sheet_renders_in_headless_chromium(sheet, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); not CI")
    metas, page, path = sheet
    probe = path.with_name("probe.html")
    script = (
        "<script>window.addEventListener('load', () => {"
        " for (const img of document.images) {"
        "  img.setAttribute('data-decoded', img.complete + ':' + img.naturalWidth + 'x'"
        "   + img.naturalHeight); }"
        " const done = document.createElement('div'); done.id = 'probe-done';"
        " document.body.appendChild(done); });</script>"
    )
    probe.write_text(page.replace("</body>", script + "</body>"))
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    dom = done.stdout
    assert 'id="probe-done"' in dom, done.stderr[-2000:]
    decoded = re.findall(r'data-decoded="([^"]+)"', dom)
    assert len(decoded) == 3, decoded  # three real faces among the newest four
    for value in decoded:
        complete, size = value.split(":")
        width, height = (int(v) for v in size.split("x"))
        assert complete == "true" and 0 < width <= 120 and 0 < height <= 120, value
    for meta in metas[-3:]:
        assert contract.face_key("faces", meta) in dom
        assert f'<span class="device">{meta.device_id}</span>' in dom
    assert "<figcaption>" in dom
