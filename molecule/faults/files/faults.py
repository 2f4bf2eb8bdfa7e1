#!/usr/bin/env python3
"""The fault scenario's driver (controller side): faults while faces flow, then the ledger.

A load generator on the edge (faultkit.py loadgen) publishes contract-valid faces at a fixed
rate through facepipe's end-to-end path (outbox, acknowledgements, republish), face-detector
plays its clip, and one fault after another hits the pipeline. After each fault the driver
waits (bounded) until every face accepted during it is in S3. At the end it drains and checks
the whole ledger: every accepted face id in the bucket exactly once, nothing extra, no unit
failed. Prints one table row per fault; exit 1 on any loss, duplicate or failed unit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import boto3

NAMESPACE = uuid.UUID("5f1d0c1e-6f2a-4b7e-9a55-0c4e2d6b1a10")  # as faultkit.py
PYTHON = "/opt/facepipe/venv/bin/python"
KIT = "/root/faultkit.py"


def face_id(run: str, n: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{run}-{n}"))


@dataclass
class Row:
    fault: str
    first: int
    last: int = 0
    seconds: float = 0.0
    recover_s: float | None = None
    stored: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.last - self.first


class Lab:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.s3 = boto3.client(
            "s3",
            endpoint_url=args.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        self.run_id = uuid.uuid4().hex[:8]

    # --- hosts -----------------------------------------------------------------------
    def lab(self, *argv: str, check: bool = True) -> str:
        cmd = [sys.executable, self.args.lab_py, argv[0], "--lab", self.args.lab, *argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def sh(self, host: str, command: str, check: bool = True) -> str:
        return self.lab("exec", "--host", host, "--", command, check=check)

    def kill(self, host: str, unit: str) -> None:
        self.sh(host, f"systemctl kill -s KILL {unit}")

    def wait_active(self, host: str, unit: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sh(host, f"systemctl is-active {unit}", check=False).strip() == "active":
                return
            time.sleep(0.5)
        raise RuntimeError(f"{host}: {unit} not active after {timeout:.0f}s")

    # --- the load generator and the audit ------------------------------------------------
    def start_kit(self) -> None:
        edge, a = self.args.edge, self.args
        self.sh(
            edge,
            f"systemd-run --unit=fp-loadgen --property=Restart=always {PYTHON} {KIT} loadgen "
            f"--device {edge} --run {self.run_id} --rate {a.rate} --total {a.total} "
            f"--bridge-state-topic bridges/{edge}/state",
        )
        self.sh(edge, f"systemd-run --unit=fp-audit --property=Restart=always {PYTHON} {KIT} audit --device {edge}")

    def accepted(self) -> int:
        text = self.sh(self.args.edge, "cat /var/lib/fp-loadgen/state.json", check=False)
        return json.loads(text)["next"] if text.strip() else 0

    # --- the bucket ----------------------------------------------------------------------
    def stored(self) -> Counter[str]:
        ids: Counter[str] = Counter()
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.args.bucket, Prefix=f"faces/{self.args.edge}/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                ids[obj["Key"].rsplit("_", 1)[1].removesuffix(".jpg")] += 1
        return ids

    def wait_stored(self, ids: set[str], timeout: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if ids <= set(self.stored()):
                return time.monotonic() - start
            time.sleep(2)
        return None


def run_fault(lab: Lab, rows: list[Row], name: str, action: Callable[[], None]) -> None:
    row = Row(name, first=lab.accepted())
    started = time.monotonic()
    print(f"--- {name}", flush=True)
    action()
    row.seconds = time.monotonic() - started
    row.last = lab.accepted()
    ids = {face_id(lab.run_id, n) for n in range(row.first, row.last)}
    row.recover_s = lab.wait_stored(ids, lab.args.recover_timeout)
    stored = lab.stored()
    row.stored = len(ids & set(stored))
    row.extra["dup"] = sum(1 for f in ids if stored[f] > 1)
    print(f"    accepted {row.accepted}, stored {row.stored}, recovered in {row.recover_s}", flush=True)
    rows.append(row)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lab", required=True)
    p.add_argument("--lab-py", required=True)
    p.add_argument("--edge", required=True)
    p.add_argument("--cloud", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--s3-port", required=True)
    p.add_argument("--rate", type=float, default=25)
    p.add_argument("--total", type=int, default=10_000)
    p.add_argument("--recover-timeout", type=float, default=180)
    p.add_argument("--drain-timeout", type=float, default=300)
    args = p.parse_args()
    lab = Lab(args)
    edge, cloud, port = args.edge, args.cloud, args.s3_port
    t_start = time.monotonic()
    lab.start_kit()
    time.sleep(10)
    rows: list[Row] = []

    def pause(seconds: float) -> Callable[[], None]:
        return lambda: time.sleep(seconds)

    def cut(seconds: float) -> Callable[[], None]:
        def act() -> None:
            lab.lab("cut", "--host", edge)
            time.sleep(seconds)
            lab.lab("heal", "--host", edge)

        return act

    def cloud_broker_kill_s3_away() -> None:
        lab.lab("block", "--host", cloud, "--port", port)
        time.sleep(10)  # faces pile up in the cloud broker for the writer
        lab.kill(cloud, "mosquitto")
        lab.wait_active(cloud, "mosquitto")
        time.sleep(5)
        lab.lab("unblock", "--host", cloud, "--port", port)

    def edge_broker_kill_in_outage() -> None:
        lab.lab("cut", "--host", edge)
        time.sleep(10)  # faces queue in the edge broker for the bridge
        lab.kill(edge, "mosquitto")
        lab.wait_active(edge, "mosquitto")
        time.sleep(5)
        lab.lab("heal", "--host", edge)

    def power_cut() -> None:
        time.sleep(5)
        lab.lab("poweroff", "--host", edge)
        time.sleep(5)
        lab.lab("poweron", "--host", edge)
        lab.wait_active(edge, "face-detector")
        lab.start_kit()  # transient units do not survive a boot; their state files do

    def writer_kills() -> None:
        for _ in range(3):
            time.sleep(5)
            lab.kill(cloud, "face-writer")
            lab.wait_active(cloud, "face-writer")

    def s3_away() -> None:
        lab.lab("block", "--host", cloud, "--port", port)
        time.sleep(30)
        lab.lab("unblock", "--host", cloud, "--port", port)

    def clean_restarts() -> None:
        for host, unit in ((edge, "mosquitto"), (edge, "face-detector"), (edge, "fp-loadgen")):
            lab.sh(host, f"systemctl restart {unit}")
        for unit in ("mosquitto", "face-writer"):
            lab.sh(cloud, f"systemctl restart {unit}")
        time.sleep(5)

    for i in range(3):
        run_fault(lab, rows, f"link cut 10 s (#{i + 1})", cut(10))
    run_fault(lab, rows, "cloud broker SIGKILL while S3 is unreachable", cloud_broker_kill_s3_away)
    run_fault(lab, rows, "edge broker SIGKILL during an outage", edge_broker_kill_in_outage)
    run_fault(lab, rows, "edge host powered off hard", power_cut)
    run_fault(lab, rows, "writer SIGKILL x3", writer_kills)
    run_fault(lab, rows, "S3 unreachable for 30 s", s3_away)
    run_fault(lab, rows, "clean restart of every service", clean_restarts)
    while lab.accepted() < args.total:  # no fault: the stream runs on to its total
        left = (args.total - lab.accepted()) / args.rate + 1
        run_fault(lab, rows, "no fault (the stream runs on to its total)", pause(min(60.0, left)))

    # Drain: every accepted face in S3, the outboxes empty.
    total = lab.accepted()
    every = {face_id(lab.run_id, n) for n in range(total)}
    drained = lab.wait_stored(every, args.drain_timeout)
    stored = lab.stored()
    loadgen_ids = {face_id(lab.run_id, n) for n in range(total)}
    audit = set(lab.sh(edge, "cat /var/lib/fp-audit.txt", check=False).split())
    lab.sh(edge, "systemctl stop fp-loadgen fp-audit", check=False)
    failed = {h: lab.sh(h, "systemctl --failed --no-legend --plain", check=False).strip() for h in (edge, cloud)}
    outboxes = "/var/lib/face-detector/outbox /var/lib/fp-loadgen/outbox"
    outbox = lab.sh(edge, f"find {outboxes} -name '*.face' | wc -l", check=False).strip()

    lost = every - set(stored)
    duplicated = [f for f, c in stored.items() if c > 1]
    # Load generator faces carry version 5 ids, the detector's version 4: any v5 id that was
    # never accepted is an object nobody asked for.
    extra = [f for f in stored if uuid.UUID(f).version == 5 and f not in loadgen_ids]
    detector_stored = audit & set(stored)
    head = f"{'fault':<46} {'accepted':>8} {'stored':>7} {'lost':>5} {'dup':>4} {'fault s':>7} {'recover s':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        rec = f"{r.recover_s:.0f}" if r.recover_s is not None else "never"
        dup = r.extra["dup"]
        print(
            f"{r.fault:<46} {r.accepted:>8} {r.stored:>7} {r.accepted - r.stored:>5} {dup:>4} "
            f"{r.seconds:>7.0f} {rec:>9}"
        )
    print("-" * len(head))
    whole = "load generator, whole run (outbox API)"
    print(f"{whole:<46} {total:>8} {len(every & set(stored)):>7} {len(lost):>5} {len(duplicated):>4}")
    seen = "face-detector, seen at its broker"
    print(f"{seen:<46} {len(audit):>8} {len(detector_stored):>7} {len(audit - set(stored)):>5}")
    print(
        f"\ntotal {total + len(audit)} faces in {time.monotonic() - t_start:.0f}s; drained in "
        f"{drained if drained is None else round(drained)}s; extra objects {len(extra)}; "
        f"faces left in outboxes {outbox}; failed units {failed}"
    )
    problems = []
    if total < args.total:
        problems.append(f"only {total} faces accepted (< {args.total})")
    if lost:
        problems.append(f"{len(lost)} accepted faces never stored, e.g. {sorted(lost)[:3]}")
    if audit - set(stored):
        problems.append(f"{len(audit - set(stored))} detector faces never stored")
    if duplicated or extra:
        problems.append(f"{len(duplicated)} duplicated, {len(extra)} extra")
    if any(failed.values()):
        problems.append(f"failed units: {failed}")
    if outbox != "0":
        problems.append(f"{outbox} faces still in an outbox")
    for p_ in problems:
        print("FAIL:", p_)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
