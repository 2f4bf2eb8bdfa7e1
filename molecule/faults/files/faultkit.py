#!/usr/bin/env python3
"""Edge-side helpers of the fault scenario, run with facepipe's venv on the edge host.

loadgen  publishes contract-valid faces through the same end-to-end path as face-detector
         (facepipe.delivery: outbox, publish, acknowledgements, republish) at a fixed rate.
         With --direct: without an outbox, as any MQTT client would (QoS 1; a face counts as
         accepted once the edge broker acknowledged it), for comparison.
         Face n has a deterministic face id and capture time, so the controller knows every
         accepted face from the number of faces accepted; ``state.json`` (fsync'd after every
         face) holds that number across kills and power cuts. A face put again after a crash
         is the identical message: at most the same object once more.
audit    records the face ids face-detector publishes on the local broker (a lower bound of
         what it accepted: every such face must end up in S3).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
from facepipe import contract
from facepipe.config import parse_config
from facepipe.delivery import DELIVERY_COUNTERS, DELIVERY_GAUGES, PublisherConfig, start_publishing
from facepipe.logsetup import setup_logging
from facepipe.mqtt import MqttSettings
from facepipe.stats import Counters, format_counters
from paho.mqtt.enums import CallbackAPIVersion

NAMESPACE = uuid.UUID("5f1d0c1e-6f2a-4b7e-9a55-0c4e2d6b1a10")


def face_id(run: str, n: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{run}-{n}"))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def jpeg(n: int) -> bytes:
    img = np.full((64, 64, 3), n % 251, np.uint8)
    cv2.circle(img, (32, 32), 16, (255, 255, 255), -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


def loadgen(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if not state:
        state = {"run": args.run, "t0": time.time() - 1, "next": 0}
        write_json(state_file, state)
    name = "direct" if args.direct else "loadgen"
    argv = [f"--mqtt-client-id=fp-{name}-{args.device}", "--stats-interval=10"]
    if not args.direct:
        argv += [f"--outbox-dir={state_dir / 'outbox'}", f"--bridge-state-topic={args.bridge_state_topic}"]
    cfg = parse_config(PublisherConfig, "loadgen", "", argv, {})
    setup_logging("info")
    counters = Counters(["published", "publish_dropped", "acked", *DELIVERY_COUNTERS], DELIVERY_GAUGES)
    settings = MqttSettings.from_config(cfg.mqtt, default_client_id="unused")
    publishing = start_publishing(cfg.outbox, cfg.mqtt, settings, device=args.device, counters=counters)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    publishing.session.start()
    publishing.session.wait_connected(10)
    started, first = time.monotonic(), state["next"]
    last_log = 0.0
    while not stop.is_set():
        n = state["next"]
        if n < args.total:
            due = started + (n - first) / args.rate
            if time.monotonic() < due:
                time.sleep(min(0.01, due - time.monotonic()))
                publishing.tick()
                continue
            meta = contract.validate_metadata(
                {
                    "v": 1,
                    "face_id": face_id(state["run"], n),
                    "device_id": args.device,
                    "captured_at": contract.format_time(
                        datetime.fromtimestamp(state["t0"], UTC) + timedelta(seconds=n / args.rate)
                    ),
                    "frame": n,
                    "bbox": [0, 0, 64, 64],
                    "detector": name,
                }
            )
            publishing.submit(meta.face_id, contract.encode_face(jpeg(n), meta))
            while args.direct and publishing.publisher.pending() and not stop.is_set():
                time.sleep(0.005)  # accepted once the broker acknowledged it
            if stop.is_set():
                break
            state["next"] = n + 1
            write_json(state_file, state)  # the faces accepted so far, across crashes
        else:
            time.sleep(0.05)
        publishing.tick()
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            values = {**counters.snapshot(), **counters.gauges()}
            print(f"{name} next={state['next']} {format_counters(values)}", flush=True)
    publishing.session.stop()
    publishing.close()
    return 0


def audit(args: argparse.Namespace) -> int:
    out = open(args.out, "a")  # noqa: SIM115 - appended until killed
    lock = threading.Lock()

    def on_message(client, userdata, msg) -> None:  # noqa: ANN001
        try:
            meta, _ = contract.decode_face(msg.payload)
        except contract.ContractError:
            return
        if meta.detector not in ("loadgen", "direct"):
            with lock:
                out.write(meta.face_id + "\n")
                out.flush()
                os.fsync(out.fileno())

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fp-audit-{args.device}", clean_session=False)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(contract.face_topic("faces", args.device), qos=1)
    client.connect_async("127.0.0.1", 1883)
    client.loop_forever(retry_first_connection=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("loadgen")
    s.add_argument("--device", required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--rate", type=float, default=25.0)
    s.add_argument("--total", type=int, default=1_000_000)
    s.add_argument("--state-dir", default="/var/lib/fp-loadgen")
    s.add_argument("--bridge-state-topic", default="")
    s.add_argument("--direct", action="store_true", help="no outbox: a plain MQTT publisher")
    s = sub.add_parser("audit")
    s.add_argument("--device", required=True)
    s.add_argument("--out", default="/var/lib/fp-audit.txt")
    s.add_argument("--client-id", required=True, help="durable session, one per run")
    args = p.parse_args()
    return loadgen(args) if args.cmd == "loadgen" else audit(args)


if __name__ == "__main__":
    sys.exit(main())
