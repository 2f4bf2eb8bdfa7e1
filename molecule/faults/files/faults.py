#!/usr/bin/env python3
"""The fault scenario's driver (controller side): faults while faces flow, then the ledger.

On the edge, a load generator (faultkit.py loadgen) publishes contract-valid faces at a fixed
rate through facepipe's end-to-end path (outbox, acknowledgements, republish), a second one
publishes straight to the edge broker like any MQTT client (for comparison), and face-detector
plays its clip. One fault after another hits the pipeline; after each the driver waits (bounded)
until every outbox face accepted during it is in S3. At the end it drains and checks the whole
ledger: every outbox face in the bucket exactly once, nothing extra, no unit failed; the direct
publisher must lose nothing to the clean faults (cuts, writer kills, S3 away, clean restarts).
Prints one table row per fault; exit 1 on any such loss, a duplicate or a failed unit.
"""

from __future__ import annotations

import argparse
import json
import re
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
class Generator:
    name: str  # "loadgen" (through the outbox) or "direct"
    run: str
    rate: float

    @property
    def state(self) -> str:
        return f"/var/lib/fp-{self.name}/state.json"

    def ids(self, first: int, last: int) -> set[str]:
        return {face_id(self.run, n) for n in range(first, last)}


@dataclass
class Row:
    fault: str
    clean: bool  # a fault no publisher may lose a face to
    first: dict[str, int]
    last: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    recover_s: float | None = None
    stored: dict[str, int] = field(default_factory=dict)
    dup: int = 0

    def accepted(self, name: str) -> int:
        return self.last[name] - self.first[name]

    def lost(self, name: str) -> int:
        return self.accepted(name) - self.stored[name]


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
        run = uuid.uuid4().hex[:8]
        self.gens = [Generator("loadgen", run, args.rate), Generator("direct", run + "d", args.direct_rate)]

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
        """SIGKILL the unit's main process, as the OOM killer or a crash would."""
        self.sh(host, f"kill -KILL $(systemctl show -p MainPID --value {unit})")

    def wait_active(self, host: str, unit: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sh(host, f"systemctl is-active {unit}", check=False).strip() == "active":
                return
            time.sleep(0.5)
        raise RuntimeError(f"{host}: {unit} not active after {timeout:.0f}s")

    # --- the load generator and the audit ------------------------------------------------
    def start_kit(self) -> None:
        edge = self.args.edge
        for g in self.gens:
            extra = (  # the outbox generator stops at the total; the direct one runs until stopped
                "--direct"
                if g.name == "direct"
                else f"--bridge-state-topic bridges/{edge}/state --total {self.args.total}"
            )
            self.sh(
                edge,
                f"systemd-run --unit=fp-{g.name} --property=Restart=always {PYTHON} {KIT} loadgen "
                f"--device {edge} --run {g.run} --rate {g.rate} --state-dir /var/lib/fp-{g.name} {extra}",
            )
        self.sh(
            edge,
            f"systemd-run --unit=fp-audit --property=Restart=always {PYTHON} {KIT} audit --device {edge} "
            f"--client-id fp-audit-{self.gens[0].run}",
        )

    def accepted(self) -> dict[str, int]:
        counts = {}
        for g in self.gens:
            text = self.sh(self.args.edge, f"cat {g.state}", check=False)
            counts[g.name] = json.loads(text)["next"] if text.strip() else 0
        return counts

    def republished(self) -> int:
        """Republished faces over every run of the load generator (counters restart at 0)."""
        text = self.sh(self.args.edge, "journalctl -u fp-loadgen -o cat --no-pager", check=False)
        total = last = 0
        for value in (int(v) for v in re.findall(r"\brepublished=(\d+)", text)):
            if value < last:
                total += last
            last = value
        return total + last

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

    def empty_bucket(self) -> None:
        """Delete this edge's faces left by an earlier run: the ledger starts empty."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.args.bucket, Prefix=f"faces/{self.args.edge}/"
        )
        keys = [{"Key": obj["Key"]} for page in pages for obj in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):  # listed first: deleting shifts the pages
            self.s3.delete_objects(Bucket=self.args.bucket, Delete={"Objects": keys[start : start + 1000]})

    def outbox_files(self, path: str) -> int:
        return int(self.sh(self.args.edge, f"find {path} -name '*.face' | wc -l", check=False).strip() or -1)

    def wait_stored(self, ids: set[str], timeout: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if ids <= set(self.stored()):
                return time.monotonic() - start
            time.sleep(2)
        return None


def run_fault(lab: Lab, rows: list[Row], name: str, action: Callable[[], None], clean: bool) -> None:
    row = Row(name, clean, first=lab.accepted())
    started = time.monotonic()
    print(f"--- {name}", flush=True)
    action()
    row.seconds = time.monotonic() - started
    row.last = lab.accepted()
    outbox_ids = lab.gens[0].ids(row.first["loadgen"], row.last["loadgen"])
    row.recover_s = lab.wait_stored(outbox_ids, lab.args.recover_timeout)
    time.sleep(3)  # the direct publisher's faces too, if they are coming at all
    stored = lab.stored()
    for g in lab.gens:
        ids = g.ids(row.first[g.name], row.last[g.name])
        row.stored[g.name] = len(ids & set(stored))
        row.dup += sum(1 for f in ids if stored[f] > 1)
    print(f"    {row.first} -> {row.last}, stored {row.stored}, recovered in {row.recover_s}", flush=True)
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
    p.add_argument("--rate", type=float, default=18, help="outbox faces per second")
    p.add_argument("--direct-rate", type=float, default=5, help="direct faces per second")
    p.add_argument("--total", type=int, default=10_000)
    p.add_argument("--recover-timeout", type=float, default=180)
    p.add_argument("--drain-timeout", type=float, default=300)
    args = p.parse_args()
    lab = Lab(args)
    edge, cloud, port = args.edge, args.cloud, args.s3_port
    t_start = time.monotonic()
    # A fresh ledger (a re-run of verify on the same hosts starts over).
    lab.sh(edge, "systemctl stop fp-loadgen fp-direct fp-audit; systemctl reset-failed", check=False)
    lab.sh(edge, "rm -rf /var/lib/fp-loadgen /var/lib/fp-direct /var/lib/fp-audit.txt")
    lab.empty_bucket()
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
        lab.lab("cut", "--host", edge)
        time.sleep(10)  # faces pile up in the edge broker's memory and in the outbox
        lab.lab("poweroff", "--host", edge)
        time.sleep(5)
        lab.lab("poweron", "--host", edge)
        lab.lab("heal", "--host", edge)
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
        # The edge broker during an outage, then the cloud broker, then every other service,
        # each given time to come back (restarting everything at once is another fault: see
        # the README).
        lab.lab("cut", "--host", edge)
        time.sleep(5)
        lab.sh(edge, "systemctl restart mosquitto")
        time.sleep(3)
        lab.lab("heal", "--host", edge)
        time.sleep(10)
        lab.sh(cloud, "systemctl restart mosquitto")
        time.sleep(10)
        lab.sh(cloud, "systemctl restart face-writer")
        lab.wait_active(cloud, "face-writer")
        for unit in ("face-detector", "fp-loadgen", "fp-direct"):
            lab.sh(edge, f"systemctl restart {unit}")
        time.sleep(5)

    for i in range(3):
        run_fault(lab, rows, f"link cut 10 s (#{i + 1})", cut(10), clean=True)
    run_fault(lab, rows, "cloud broker SIGKILL while S3 is unreachable", cloud_broker_kill_s3_away, False)
    run_fault(lab, rows, "edge broker SIGKILL during an outage", edge_broker_kill_in_outage, False)
    run_fault(lab, rows, "edge host powered off hard during an outage", power_cut, False)
    run_fault(lab, rows, "writer SIGKILL x3", writer_kills, clean=True)
    run_fault(lab, rows, "S3 unreachable for 30 s", s3_away, clean=True)
    run_fault(lab, rows, "clean restarts: edge broker in an outage, cloud broker, services", clean_restarts, True)
    while (done := lab.accepted()["loadgen"]) < args.total:  # the stream runs on to its total
        left = (args.total - done) / args.rate + 1
        run_fault(lab, rows, "no fault (the stream runs on to its total)", pause(min(60.0, left)), True)
    lab.sh(edge, "systemctl stop fp-direct", check=False)

    # Drain: every outbox face in S3 and acknowledged (the generator's outbox empty), then stop.
    totals = lab.accepted()
    outbox_gen, direct_gen = lab.gens
    every = outbox_gen.ids(0, totals["loadgen"])
    direct = direct_gen.ids(0, totals["direct"])
    drained = lab.wait_stored(every, args.drain_timeout)
    deadline = time.monotonic() + 120
    while lab.outbox_files("/var/lib/fp-loadgen/outbox") and time.monotonic() < deadline:
        time.sleep(2)
    lab.sh(edge, "systemctl stop fp-loadgen", check=False)
    # face-detector keeps detecting: the faces the audit has seen so far must all be stored
    # (within a bound); one published after this snapshot is not in the ledger.
    audit = set(lab.sh(edge, "cat /var/lib/fp-audit.txt", check=False).split())
    lab.wait_stored(audit, 120)
    stored = lab.stored()
    republished = lab.republished()
    lab.sh(edge, "systemctl stop fp-audit", check=False)
    failed = {h: lab.sh(h, "systemctl --failed --no-legend --plain", check=False).strip() for h in (edge, cloud)}
    left_loadgen = lab.outbox_files("/var/lib/fp-loadgen/outbox")
    left_detector = lab.outbox_files("/var/lib/face-detector/outbox")  # it keeps detecting

    lost = every - set(stored)
    duplicated = [f for f, c in stored.items() if c > 1]
    # Generator faces carry version 5 ids (the detector's are version 4): a v5 id that was never
    # accepted is an object nobody asked for.
    # (The direct publisher's face in flight when it was stopped may arrive uncounted.)
    in_flight = direct_gen.ids(totals["direct"], totals["direct"] + 1)
    extra = [f for f in stored if uuid.UUID(f).version == 5 and f not in every | direct | in_flight]
    head = (
        f"{'fault':<46} {'outbox: accepted':>16} {'stored':>7} {'lost':>5} "
        f"{'direct: accepted':>16} {'lost':>5} {'dup':>4} {'fault s':>7} {'recover s':>9}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        rec = f"{r.recover_s:.0f}" if r.recover_s is not None else "never"
        print(
            f"{r.fault:<46} {r.accepted('loadgen'):>16} {r.stored['loadgen']:>7} {r.lost('loadgen'):>5} "
            f"{r.accepted('direct'):>16} {r.lost('direct'):>5} {r.dup:>4} {r.seconds:>7.0f} {rec:>9}"
        )
    print("-" * len(head))
    lost_direct = len(direct - set(stored))
    print(
        f"{'whole run':<46} {len(every):>16} {len(every & set(stored)):>7} {len(lost):>5} "
        f"{len(direct):>16} {lost_direct:>5} {len(duplicated):>4}"
    )
    seen = "face-detector (outbox), seen at its broker"
    print(f"{seen:<46} {len(audit):>16} {len(audit & set(stored)):>7} {len(audit - set(stored)):>5}")
    print(
        f"\n{len(every) + len(direct) + len(audit)} faces in {time.monotonic() - t_start:.0f}s; outbox faces "
        f"republished {republished}; drained in {drained if drained is None else round(drained)}s; "
        f"extra objects {len(extra)}; left in the outboxes: load generator {left_loadgen}, "
        f"face-detector {left_detector} (in flight); failed units {failed}"
    )
    problems = []
    if len(every) < args.total:
        problems.append(f"only {len(every)} outbox faces accepted (< {args.total})")
    if lost:
        problems.append(f"{len(lost)} accepted outbox faces never stored, e.g. {sorted(lost)[:3]}")
    if audit - set(stored):
        missing = sorted(audit - set(stored))
        problems.append(f"{len(missing)} detector faces never stored: {missing[:5]}")
        for f in missing[:5]:  # what each service said about it
            print(f"--- {f}")
            print(lab.sh(edge, f"journalctl -u face-detector -o cat --no-pager | grep -F {f} | tail -5", check=False))
            print(lab.sh(cloud, f"journalctl -u face-writer -o cat --no-pager | grep -F {f} | tail -5", check=False))
    clean_lost = sum(r.lost("direct") for r in rows if r.clean)
    if clean_lost:
        problems.append(f"the direct publisher lost {clean_lost} faces to clean faults")
    if duplicated or extra:
        problems.append(f"{len(duplicated)} duplicated, {len(extra)} extra")
    if any(failed.values()):
        problems.append(f"failed units: {failed}")
    if left_loadgen != 0:
        problems.append(f"{left_loadgen} faces never acknowledged to the load generator's outbox")
    if left_detector > 10:
        problems.append(f"{left_detector} faces wait in face-detector's outbox")
    for p_ in problems:
        print("FAIL:", p_)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
