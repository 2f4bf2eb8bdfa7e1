"""Prometheus metrics: who may scrape them, and that what the shipped alert rules read exists.

files/prometheus/facepipe-rules.yml names metrics; a rule naming a metric the programs do not
expose never fires, silently. These tests scrape the real programs and check every name."""

from __future__ import annotations

import http.client
import re
import socket
import socketserver
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import Broker, free_port, program_env, start_program, wait_for

from facepipe import stats
from facepipe.config import (
    LOGGING_OPTIONS,
    ConfigError,
    LoggingConfig,
    parse_config,
    parse_networks,
)
from facepipe.stats import MAX_SCRAPES, Counters, is_allowed, serve_metrics

RULES = Path(__file__).resolve().parents[2] / "files" / "prometheus" / "facepipe-rules.yml"


def scrape(port: int, host: str = "127.0.0.1") -> tuple[int, str]:
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def exposed(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        found = re.fullmatch(r"(facepipe_\w+) (\S+)", line)
        if found:
            values[found.group(1)] = float(found.group(2))
    return values


@contextmanager
def endpoint(address: str, allowed: str, counters: Counters | None = None, port: int = 0):
    served = serve_metrics(
        "facepipe_test", counters or Counters(["frames"]), address, port, parse_networks(allowed)
    )
    try:
        yield served
    finally:
        served.close()


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """The connection is closed without an answer (nothing read, no thread started)."""
    try:
        scrape(port, host)
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        return True
    return False


def test_loopback_scrapes_by_default_and_other_peers_are_closed_on():
    counters = Counters(["frames"], ["source_up"])
    counters.inc("frames", 3)
    default = next(o for o in LOGGING_OPTIONS if o.name == "metrics_allow").default
    with endpoint("127.0.0.1", default, counters) as served:
        assert served.bound.wait(5)
        status, text = scrape(served.port)
        assert status == 200
        assert exposed(text)["facepipe_test_frames_total"] == 3
        assert exposed(text)["facepipe_test_source_up"] == 0
    with endpoint("127.0.0.1", "192.0.2.0/24", counters) as served:
        assert served.bound.wait(5)
        assert refused(served.port)


def test_idle_connections_from_outside_cannot_tie_the_metrics_up():
    """Connections from outside the allow-list are closed on arrival, and even allowed ones
    beyond MAX_SCRAPES: a flood of idle sockets leaves the scraper served."""
    with endpoint("127.0.0.1", "192.0.2.0/24") as outside:
        assert outside.bound.wait(5)
        flood = [socket.create_connection(("127.0.0.1", outside.port)) for _ in range(50)]
        try:
            for sock in flood:  # each was closed by the server: reading gives EOF at once
                sock.settimeout(5)
                assert sock.recv(1) == b""
        finally:
            for sock in flood:
                sock.close()
    with endpoint("127.0.0.1", "127.0.0.0/8") as served:
        assert served.bound.wait(5)
        idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(MAX_SCRAPES)]
        try:
            time.sleep(0.3)
            assert refused(served.port)  # every slot is taken by an idle connection
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: not refused(served.port) or None, 10, "a free slot")


def test_a_port_that_cannot_be_opened_is_retried_and_the_program_runs_on(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = serve_metrics("facepipe_test", Counters([]), "127.0.0.1", port, (), retry=0.2)
        try:
            wait_for(lambda: "cannot listen on 127.0.0.1" in caplog.text, 5, "the error")
            assert not served.bound.is_set()
            taken.close()
            assert served.bound.wait(5), "not opened once the port was free"
            assert caplog.text.count("cannot listen") == 1  # once per reason, not per attempt
        finally:
            served.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_a_dual_stack_listener_matches_ipv4_peers_against_ipv4_prefixes():
    with endpoint("::", "127.0.0.1") as served:
        if not served.bound.wait(5):
            pytest.skip("cannot listen on [::] here")
        assert scrape(served.port, "127.0.0.1")[0] == 200  # seen as ::ffff:127.0.0.1
        assert refused(served.port, "::1")


@pytest.mark.parametrize(
    ("peer", "allowed", "expected"),
    [
        ("10.1.2.3", "10.0.0.0/8", True),
        ("10.1.2.3", "10.1.2.4", False),
        ("::ffff:10.1.2.3", "10.0.0.0/8", True),
        ("fe80::1%eth0", "fe80::/10", True),
        ("", "0.0.0.0/0", False),
        ("not-an-address", "0.0.0.0/0", False),
        ("192.0.2.1", "", False),
    ],
)
def test_is_allowed(peer, allowed, expected):
    assert is_allowed(peer, parse_networks(allowed)) is expected


@pytest.mark.parametrize("value", ["prometheus.example", "10.0.0.0/33", "10.0.0.1,,nope"])
def test_a_metrics_allow_list_with_a_name_or_a_bad_prefix_is_refused_by_name(value):
    with pytest.raises(ConfigError, match="FACEPIPE_METRICS_ALLOW") as error:
        parse_config(LoggingConfig, "t", "t", argv=[], environ={"FACEPIPE_METRICS_ALLOW": value})
    assert "not host names" in str(error.value)


def rule_metrics(program: str) -> set[str]:
    """The metrics of ``program`` that the rules' expressions read."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = " ".join(rule["expr"] for group in groups for rule in group["rules"])
    return set(re.findall(rf"\bfacepipe_{program}_[a-z0-9_]+", exprs))


def scrape_program(program: str, env: dict[str, str], tmp_path: Path) -> dict[str, float]:
    """Start ``facepipe.<program>`` with metrics on a free port, scrape it once it answers, stop
    it; check that every metric of it the rules read is among what it exposes."""
    port = free_port()
    log = tmp_path / f"{program}.log"
    proc = start_program(program, {**env, "FACEPIPE_METRICS_PORT": str(port)}, log=log)

    names = rule_metrics(program)

    def ready() -> dict[str, float] | None:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {log.read_text()}")
        try:
            status, text = scrape(port)
        except OSError:
            return None
        # The broker's figures appear once they arrive, a moment after the port opens.
        return exposed(text) if status == 200 and names <= set(exposed(text)) else None

    try:
        values = wait_for(ready, 30, "the metrics port to expose every metric the rules read")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert names, f"{RULES} names no {program} metric"
    return values


def test_a_dead_camera_shows_in_the_metrics_the_alert_rules_read(mosquitto: Broker, tmp_path):
    camera = {
        "FACEPIPE_SOURCE": "/dev/video97",
        "FACEPIPE_DEVICE_ID": "cam-metrics.1",
        "FACEPIPE_OUTBOX_DIR": str(tmp_path / "outbox"),  # as the roles run it
    }
    values = scrape_program("detector", program_env(mosquitto.env, camera), tmp_path)
    assert values["facepipe_detector_source_up"] == 0


def test_every_writer_metric_the_alert_rules_read_is_exposed(mosquitto: Broker, s3, tmp_path):
    client = {"FACEPIPE_MQTT_CLIENT_ID": f"w-{uuid.uuid4().hex[:8]}"}
    scrape_program("writer", program_env(mosquitto.env, s3.env, client), tmp_path)


def test_a_thread_that_cannot_start_gives_its_slot_back(monkeypatch):
    """A passing shortage (no thread could start) must not use up the scrape slots for good."""
    original = socketserver.ThreadingMixIn.process_request
    failures = {"left": MAX_SCRAPES + 2}

    def flaky(self, request, client_address):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("can't start new thread")
        return original(self, request, client_address)

    monkeypatch.setattr(socketserver.ThreadingMixIn, "process_request", flaky)
    monkeypatch.setattr(socketserver.BaseServer, "handle_error", lambda *args: None)
    with endpoint("127.0.0.1", "127.0.0.0/8") as served:
        assert served.bound.wait(5)
        for _ in range(MAX_SCRAPES + 2):
            assert refused(served.port)
        assert scrape(served.port)[0] == 200


def test_a_client_that_trickles_bytes_is_cut_at_the_deadline(monkeypatch):
    monkeypatch.setattr(stats, "SCRAPE_TIMEOUT", 1.0)
    with endpoint("127.0.0.1", "127.0.0.0/8") as served:
        assert served.bound.wait(5)
        with socket.create_connection(("127.0.0.1", served.port)) as slow:
            slow.settimeout(0.3)
            started = time.monotonic()
            closed = False
            while time.monotonic() - started < 5 and not closed:
                try:
                    slow.send(b"G")  # a byte at a time, never a whole request line
                    closed = slow.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
            assert closed, "still open after 5 s"
            assert time.monotonic() - started < 3
