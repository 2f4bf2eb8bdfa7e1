"""Real components for the tests: a mosquitto broker and a moto S3 server on loopback."""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

# moto's web server logs every request at INFO: thousands of lines in a failed test's report.
logging.getLogger("werkzeug").setLevel(logging.WARNING)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    """A real mosquitto with persistence, on a free loopback port; restartable."""

    workdir: Path
    port: int = field(default_factory=free_port)
    autosave: int = 1  # seconds between persistence snapshots (mosquitto's autosave_interval)
    max_queued: int = 100000  # messages queued per client (mosquitto's max_queued_messages)
    sys_interval: int = 10  # seconds between $SYS figures (mosquitto's default)
    host: str = LOOPBACK
    process: subprocess.Popen[bytes] | None = None

    def config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            # as root mosquitto drops to user mosquitto, which cannot write pytest's 0700
            # folders: stay the test's user so persistence really saves and restores
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            f"autosave_interval {self.autosave}\n"
            f"max_queued_messages {self.max_queued}\n"
            f"sys_interval {self.sys_interval}\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        return conf

    def start(self) -> None:
        if shutil.which(MOSQUITTO) is None and not Path(MOSQUITTO).exists():
            pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config())])
        wait_for(lambda: port_open(self.port), 10, f"mosquitto on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves the persistence db on exit
            self.process.wait(10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a power cut: whatever the last snapshot missed is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def env(self) -> dict[str, str]:
        return {"FACEPIPE_MQTT_HOST": self.host, "FACEPIPE_MQTT_PORT": str(self.port)}


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Broker(workdir)
    broker.start()
    yield broker
    broker.stop()


@dataclass
class S3:
    """A moto S3 server in this process: its data survives ``stop()``/``start()``."""

    port: int
    bucket: str
    server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FACEPIPE_S3_BUCKET": self.bucket,
        }

    @property
    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self.server.start()
        wait_for(lambda: port_open(self.port), 10, f"moto on port {self.port}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="session")
def _moto() -> Iterator[S3]:
    s3 = S3(port=free_port(), bucket="unused")
    s3.start()
    yield s3
    s3.stop()


@pytest.fixture
def s3(_moto: S3) -> Iterator[S3]:
    """A fresh bucket on the session's moto server (restarted if a test stopped it)."""
    if _moto.server is None:
        _moto.start()
    _moto.bucket = f"faces-{uuid.uuid4().hex[:12]}"
    _moto.client.create_bucket(Bucket=_moto.bucket)
    yield _moto
    if _moto.server is None:
        _moto.start()


@pytest.fixture(scope="session")
def sample_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The sample clip (real faces from scikit-image) and its ground truth."""
    out = tmp_path_factory.mktemp("clip") / "sample.avi"
    subprocess.run([sys.executable, "-m", "facepipe.sampleclip", str(out)], check=True, timeout=120)
    truth = json.loads(out.with_suffix(".json").read_text())
    return out, truth


def program_env(*parts: dict[str, str]) -> dict[str, str]:
    """The environment for a program under test: ours, minus FACEPIPE_*/AWS_* leaks."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FACEPIPE_", "AWS_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env["FACEPIPE_STATS_INTERVAL"] = "1"
    for part in parts:
        env.update(part)
    return env


def start_program(module: str, env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    """Start ``python -m facepipe.<module>`` with its output in ``log``."""
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", f"facepipe.{module}", *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
