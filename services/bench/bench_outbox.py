"""What the outbox costs an edge: faces/s published with and without it, bytes written per face.

Usage: python bench/bench_outbox.py [--faces 2000] [--size 300] [--dir /var/tmp]

A real mosquitto on loopback; the detector's publishing path (``facepipe.delivery``) submits
FACES face messages as fast as the broker takes them (a file source: at most 1000
unacknowledged), once without an outbox and once with one on the disk under --dir (fsync per
face, as on an edge). Timed until the broker acknowledged every face. Bytes written: the
process's own ``write_bytes`` (/proc/self/io) and the whole block device's sectors written
(/sys/block/<dev>/stat, includes the filesystem journal; the machine should be otherwise idle).
An SD card sees about the device figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from bench_writer import start_mosquitto  # noqa: E402
from writer_helpers import jpeg_bytes, make_face  # noqa: E402

from facepipe.config import parse_config  # noqa: E402
from facepipe.delivery import (  # noqa: E402
    DELIVERY_COUNTERS,
    DELIVERY_GAUGES,
    PublisherConfig,
    start_publishing,
)
from facepipe.logsetup import setup_logging  # noqa: E402
from facepipe.mqtt import MqttSettings  # noqa: E402
from facepipe.stats import Counters  # noqa: E402


def device_of(path: Path) -> str | None:
    dev = os.stat(path).st_dev
    name = f"{os.major(dev)}:{os.minor(dev)}"
    for block in Path("/sys/block").iterdir():
        if (block / "dev").read_text().strip() == name:
            return block.name
    return None


def sectors_written(device: str | None) -> int:
    if device is None:
        return 0
    return int((Path("/sys/block") / device / "stat").read_text().split()[6])


def process_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def run(port: int, faces: list[tuple[str, bytes]], outbox: Path | None) -> dict[str, float]:
    argv = [f"--mqtt-port={port}", "--mqtt-host=127.0.0.1", f"--mqtt-client-id=bench-{os.getpid()}"]
    if outbox is not None:
        argv.append(f"--outbox-dir={outbox}")
    cfg = parse_config(PublisherConfig, "bench", "", argv, {})
    counters = Counters(
        ["published", "publish_dropped", "acked", *DELIVERY_COUNTERS], DELIVERY_GAUGES
    )
    settings = MqttSettings.from_config(cfg.mqtt, default_client_id="bench")
    publishing = start_publishing(
        cfg.outbox, cfg.mqtt, settings, device="bench-cam", counters=counters
    )
    publishing.session.start()
    publishing.session.wait_connected(10)
    device = device_of(outbox.parent) if outbox is not None else None
    os.sync()
    sectors0, bytes0 = sectors_written(device), process_write_bytes()
    submits: list[float] = []
    start = time.perf_counter()
    for face_id, payload in faces:
        t0 = time.perf_counter()
        publishing.submit(face_id, payload)
        submits.append(time.perf_counter() - t0)
        while publishing.publisher.pending() >= 1000:
            time.sleep(0.001)
    while publishing.publisher.pending():
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    written_process = process_write_bytes() - bytes0
    time.sleep(6)  # the filesystem journal's commit interval is 5 s
    written_device = (sectors_written(device) - sectors0) * 512
    publishing.session.stop()
    publishing.close()
    ms = sorted(s * 1000 for s in submits)
    return {
        "fps": len(faces) / elapsed,
        "p50": statistics.median(ms),
        "p99": ms[int(len(ms) * 0.99)],
        "proc": written_process / len(faces),
        "dev": written_device / len(faces),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=2000)
    parser.add_argument("--size", type=int, default=300, help="side of the face crop, pixels")
    parser.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure")
    parser.add_argument("--noise", action="store_true", help="incompressible crops (larger)")
    args = parser.parse_args()
    setup_logging("warning")
    workdir = Path(tempfile.mkdtemp(prefix="bench-outbox-", dir=args.dir))
    broker, port = start_mosquitto(workdir)
    try:
        jpeg = jpeg_bytes(1, size=args.size, noise=args.noise)
        faces = [
            (m.face_id, p)
            for m, p in (make_face("bench-cam", i, jpeg=jpeg) for i in range(args.faces))
        ]
        mean = sum(len(p) for _, p in faces) / len(faces)
        without = run(port, faces, None)
        faces = [
            (m.face_id, p)
            for m, p in (make_face("bench-cam", i, jpeg=jpeg) for i in range(args.faces))
        ]
        with_box = run(port, faces, workdir / "outbox")
    finally:
        broker.terminate()
        broker.wait(10)
    print(
        f"{args.faces} faces of {mean / 1024:.1f} KiB, mosquitto on loopback, outbox on {args.dir}"
    )
    head = f"{'publishing path':<28} {'faces/s':>8} {'submit p50':>10} {'p99 ms':>7} "
    head += f"{'written/face':>13} {'device/face':>12}"
    print(head)
    print("-" * len(head))
    for name, r in (
        ("without outbox (broker only)", without),
        ("with outbox (fsync per face)", with_box),
    ):
        print(
            f"{name:<28} {r['fps']:>8.0f} {r['p50']:>10.2f} {r['p99']:>7.2f} "
            f"{r['proc'] / 1024:>10.1f} KiB {r['dev'] / 1024:>9.1f} KiB"
        )
    ratio = with_box["fps"] / without["fps"]
    print(f"outbox: {ratio:.0%} of the faces/s without it; a camera makes ~1 face/s")


if __name__ == "__main__":
    main()
