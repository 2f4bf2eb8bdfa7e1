#!/usr/bin/env python3
"""A site whose hosts or roles disagree on a shared fact fails at play start, naming the variable.

Runs scripts/check-site-facts.yml (facepipe_site only, on local fake hosts: nothing changes) once
per case against a small inventory of two edges and a cloud, each case breaking one fact the way an
inventory override would. The first case breaks nothing and must pass. Exits 1 on any surprise.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "scripts" / "check-site-facts.yml"

BASE: dict[str, Any] = {
    "all": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "children": {
            "cloud": {
                "hosts": {"cloud1": {"ansible_host": "192.0.2.10"}},
                "vars": {
                    "face_writer_s3_bucket": "bucket",
                    "mosquitto_edge_hosts": "{{ groups['edge'] }}",
                    "face_writer_mqtt_password": "not-a-real-password",
                    "mosquitto_users": [{"name": "face-writer", "password": "not-a-real-password", "acl": "writer"}],
                },
            },
            "edge": {
                "hosts": {"edge1": {}, "edge2": {}},
                "vars": {
                    "mosquitto_bridge_address": "192.0.2.10",
                    "mosquitto_bridge_remote_password": "not-a-real-password",
                },
            },
        },
    }
}

# A case's value that removes the variable from the base inventory (a required one left out).
UNSET = object()

# Values no output may show, whatever the case (the checks name variables, never values).
SECRETS = ("not-a-real-password", "change-me-camera", "Str0ng-pw")

# (what breaks, where: group or host, variables, text the failure must contain)
CASES: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("nothing (control)", "all", {}, None),
    ("renamed facts (control)", "all", {"facepipe_site_topic_prefix": "site-a/cams", "mqtt_pki_name": "a"}, None),
    ("no size limit (control)", "all", {"mosquitto_message_size_limit": 0}, None),
    ("a renamed device id (control)", "edge1", {"facepipe_site_device_id": "kitchen-cam.13"}, None),
    ("a replaced variable", "edge", {"mosquitto_topic_prefix": "cams"}, "facepipe_site_topic_prefix instead"),
    ("a setting moved to the env", "edge", {"face_detector_loop": True}, "face_detector_env: {FACEPIPE_LOOP"),
    ("prefixes differing in case", "edge", {"facepipe_site_topic_prefix": "Faces"}, "disagree on facepipe_site"),
    ("a bridge topic by hand", "edge", {"mosquitto_bridge_topics": ["faces/# out 1"]}, "mosquitto_bridge_topics"),
    (
        "faces bridged inward only",
        "edge",
        {"mosquitto_bridge_topics": ["faces/# in 1", "faces-ack/{{ inventory_hostname }} in 1"]},
        "mosquitto_bridge_topics",
    ),
    ("two edges with one device id", "edge2", {"facepipe_site_device_id": "edge1"}, "share a device id"),
    ("two edges with one client id", "edge", {"mosquitto_bridge_remote_clientid": "bridge-a"}, "share a client id"),
    ("a device id outside the grammar", "edge1", {"facepipe_site_device_id": "cam 1"}, "facepipe_site_device_id"),
    ("a wildcard topic prefix", "all", {"facepipe_site_topic_prefix": "faces/#"}, "facepipe_site_topic_prefix"),
    ("the edges' topic prefix alone", "edge", {"facepipe_site_topic_prefix": "cams"}, "disagree on facepipe_site"),
    ("the cloud's TLS port alone", "cloud", {"mosquitto_tls_listener_port": 8884}, "mosquitto_bridge_port"),
    ("the edges' size limit alone", "edge", {"mosquitto_message_size_limit": 2097152}, "mosquitto_message_size"),
    ("a detector limit above the broker's", "edge", {"face_detector_max_bytes": 2097152}, "face_detector_max_bytes"),
    ("the device id in the env", "edge1", {"face_detector_env": {"FACEPIPE_DEVICE_ID": "x"}}, "facepipe_site"),
    ("the CA in the env", "cloud", {"face_writer_env": {"FACEPIPE_MQTT_TLS_CA": "/x"}}, "mqtt_pki_ca_dest"),
    ("the detect rate in the env", "edge", {"face_detector_env": {"FACEPIPE_DETECT_FPS": 5}}, "detect_fps"),
    ("a line break in an env name", "edge", {"face_detector_env": {"A=1\nB": 1}}, "not names"),
    ("a misspelt env name", "edge", {"face_detector_env": {"facepipe_loop": True}}, "not names"),
    ("an env list", "cloud", {"face_writer_env": ["FACEPIPE_WORKERS=4"]}, "are mappings"),
    ("the writer's MQTT host", "cloud", {"face_writer_mqtt_host": "broker"}, "the writer talks to the broker"),
    ("an S3 secret in the env", "cloud", {"face_writer_env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "never the env file"),
    ("an S3 endpoint in the env", "cloud", {"face_writer_env": {"AWS_ENDPOINT_URL": "http://x"}}, "s3_endpoint_url"),
    ("the old S3 key variable", "cloud", {"s3_credentials_access_key_id": "AKIA"}, "face_writer_s3_access_key_id"),
    ("an internal unit setting", "cloud", {"facepipe_service_video_devices": True}, "facepipe_service is internal"),
    ("the example's writer password", "cloud", {"face_writer_mqtt_password": "change-me-writer"}, "placeholder"),
    ("the example's S3 key id", "cloud", {"face_writer_s3_access_key_id": "AKIAEXAMPLEEXAMPLE00"}, "s3_access_key_id"),
    ("the example's bridge password", "edge2", {"mosquitto_bridge_remote_password": "change-me-till"}, "bridge_remote"),
    (
        "an edge's placeholder, as the cloud sees it",
        "edge1",
        {"mosquitto_bridge_remote_password": "change-me-kitchen"},
        "mosquitto_bridge_remote_password of edge edge1",
    ),
    (
        "the example's camera URL",
        "edge2",
        {"face_detector_source": "rtsp://viewer:change-me-camera@192.0.2.40:554/stream1"},
        "still the example inventory's placeholder (change-me..., ...EXAMPLE...): face_detector_source.",
    ),
    (
        "a real camera URL with 'example' in its name (control)",
        "edge2",
        {"face_detector_source": "rtsp://viewer:Str0ng-pw@cam1.example.net:554/s1"},
        None,
    ),
    (
        "metrics for a Prometheus server (control)",
        "all",
        {
            "face_detector_metrics_port": 9101,
            "face_detector_metrics_address": "::",
            "face_detector_metrics_scrapers": ["192.0.2.9", "2001:db8::/64"],
            "face_writer_metrics_port": 9102,
            "face_writer_metrics_address": "0.0.0.0",
            "face_writer_metrics_scrapers": ["192.0.2.0/28"],
        },
        None,
    ),
    ("metrics on loopback only (control)", "cloud", {"face_writer_metrics_port": 9102}, None),
    (
        "the metrics port in the env",
        "edge",
        {"face_detector_env": {"FACEPIPE_METRICS_PORT": 9101}},
        "face_detector_metrics_port",
    ),
    (
        "a firewall for SSH from the controller and MQTT from anywhere (control)",
        "all",
        {
            "facepipe_firewall_enabled": True,
            "facepipe_firewall_ssh_sources": ["192.0.2.10", "2001:db8::/64"],
        },
        None,
    ),
    (
        "a firewall source by host name",
        "all",
        {"facepipe_firewall_enabled": True, "facepipe_firewall_ssh_sources": ["controller.example.net"]},
        "facepipe_firewall_ssh_sources: 'controller.example.net' is not an IPv4 or IPv6 address",
    ),
    (
        "a firewall switch that is not a boolean",
        "edge",
        {"facepipe_firewall_enabled": "perhaps"},
        "facepipe_firewall_enabled",
    ),
    (
        "an IPv4 controller written as IPv6",
        "all",
        {"facepipe_firewall_enabled": True, "facepipe_firewall_ssh_sources": ["::ffff:192.0.2.10"]},
        "facepipe_firewall_ssh_sources: write ::ffff:192.0.2.10 as its IPv4 address",
    ),
    (
        "a firewall source with a netmask",
        "cloud",
        {"facepipe_firewall_enabled": True, "facepipe_firewall_mqtt_sources": ["198.51.100.0/255.255.255.0"]},
        "facepipe_firewall_mqtt_sources: '198.51.100.0/255.255.255.0' is not an IPv4 or IPv6 address",
    ),
    (
        "a metrics scraper by host name",
        "cloud",
        {
            "face_writer_metrics_port": 9102,
            "face_writer_metrics_address": "0.0.0.0",
            "face_writer_metrics_scrapers": ["prom.example.net"],
        },
        "face_writer_metrics_scrapers: 'prom.example.net' is not an address or prefix",
    ),
    (
        "scrapers of a loopback metrics port",
        "edge1",
        {"face_detector_metrics_port": 9101, "face_detector_metrics_scrapers": ["192.0.2.9"]},
        "face_detector_metrics_address (127.0.0.1) is loopback",
    ),
    (
        "a metrics address no scraper may use",
        "edge",
        {"face_detector_metrics_port": 9101, "face_detector_metrics_address": "0.0.0.0"},
        "only this host may scrape, so keep 127.0.0.1",
    ),
    (
        "a metrics address by host name",
        "cloud",
        {
            "face_writer_metrics_port": 9102,
            "face_writer_metrics_address": "cloud1",
            "face_writer_metrics_scrapers": ["192.0.2.9"],
        },
        "face_writer_metrics_address (cloud1) must be an IP address",
    ),
    (
        "metrics for the whole internet",
        "cloud",
        {
            "face_writer_metrics_port": 9102,
            "face_writer_metrics_address": "0.0.0.0",
            "face_writer_metrics_scrapers": ["0.0.0.0/0"],
        },
        "would let nearly any host scrape",
    ),
    (
        "an IPv6 scraper of an IPv4 address",
        "edge",
        {
            "face_detector_metrics_port": 9101,
            "face_detector_metrics_address": "0.0.0.0",
            "face_detector_metrics_scrapers": ["2001:db8::9"],
        },
        "IPv6 scrapers cannot reach it",
    ),
    (
        "a metrics port out of range",
        "edge",
        {"face_detector_metrics_port": 70000},
        "face_detector_metrics_port (70000)",
    ),
    ("a privileged metrics port", "edge", {"face_detector_metrics_port": 80}, "1024 to 65535"),
    (
        "the broker's port for metrics",
        "cloud",
        {"face_writer_metrics_port": 8883},
        "is taken on this host by mosquitto_tls_listener_port",
    ),
    (
        "a scraper with a netmask",
        "cloud",
        {
            "face_writer_metrics_port": 9102,
            "face_writer_metrics_address": "0.0.0.0",
            "face_writer_metrics_scrapers": ["192.0.2.9/255.255.255.0"],
        },
        "no netmask",
    ),
    ("no writer password", "cloud", {"face_writer_mqtt_password": ""}, "face_writer_mqtt_password is empty"),
    ("a null writer password", "cloud", {"face_writer_mqtt_password": None}, "face_writer_mqtt_password is empty"),
    ("no writer password at all", "cloud", {"face_writer_mqtt_password": UNSET}, "face_writer_mqtt_password is empty"),
    ("no bucket at all", "cloud", {"face_writer_s3_bucket": UNSET}, "face_writer_s3_bucket is not set"),
    ("an empty bucket", "cloud", {"face_writer_s3_bucket": ""}, "face_writer_s3_bucket is not set"),
    (
        "a placeholder in mosquitto_users",
        "cloud",
        {
            "mosquitto_users": [
                {"name": "face-writer", "password": "not-a-real-password", "acl": "writer"},
                {"name": "grafana", "password": "change-me-grafana", "acl": "reader"},
            ]
        },
        "mosquitto_users[grafana].password",
    ),
    (
        "a wildcard user name",
        "cloud",
        {
            "mosquitto_users": [
                {"name": "face-writer", "password": "not-a-real-password", "acl": "writer"},
                {"name": "#", "password": "x", "acl": "reader"},
            ]
        },
        "'#'",
    ),
    ("a wildcard writer name", "cloud", {"face_writer_mqtt_username": "a+b"}, "face_writer_mqtt_username"),
    ("the writer's password not the broker's", "cloud", {"face_writer_mqtt_password": "another"}, "same password"),
    (
        "the writer without the writer ACL",
        "cloud",
        {"mosquitto_users": [{"name": "face-writer", "password": "not-a-real-password", "acl": "reader"}]},
        "acl: writer",
    ),
]


def inventory_for(where: str, variables: dict[str, Any]) -> dict[str, Any]:
    inventory = copy.deepcopy(BASE)
    groups = inventory["all"]["children"]
    if where == "all":
        target = inventory["all"]["vars"]
    elif where in groups:
        target = groups[where]["vars"]
    else:
        group = "edge" if where.startswith("edge") else "cloud"
        target = groups[group]["hosts"][where]
    for name, value in variables.items():
        if value is UNSET:
            target.pop(name, None)
        else:
            target[name] = value
    return inventory


def main() -> int:
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(ROOT / "roles"), ANSIBLE_NOCOLOR="1")
    playbook_bin = str(Path(sys.executable).parent / "ansible-playbook")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        hosts = Path(tmp) / "hosts.yml"
        for what, where, variables, expected in CASES:
            hosts.write_text(json.dumps(inventory_for(where, variables)))
            run = subprocess.run(
                [playbook_bin, "-i", str(hosts), str(PLAYBOOK)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            output = run.stdout + run.stderr
            if expected is None:
                ok = run.returncode == 0
            else:
                ok = run.returncode != 0 and expected in output and "TASK [facepipe_site" in output
            leaked = [secret for secret in SECRETS if secret in output]
            if leaked:
                print(f"     the output shows a secret: {leaked}")
                ok = False
            print(f"{'ok  ' if ok else 'FAIL'} {what}: exit {run.returncode}")
            if not ok:
                failures += 1
                print(output[-3000:])
    print(f"site facts: {len(CASES)} cases, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
