"""face-writer throughput against moto, next to the old writer's folder re-sync per message.

Usage: python bench/bench_writer.py [--batch 1000] [--sizes 100,1000,2000] [--workers 8]

For each bucket size S (objects already stored), the bucket is pre-filled with S faces, then:
- face-writer: the real program (``python -m facepipe.writer``) on a real mosquitto; BATCH faces
  are published at QoS 1 and timed from the first publish until all are in S3.
- baseline: the old design, S3 side only (no MQTT, which only flatters it): per message, write
  the face to a local folder, list the whole bucket, upload the files the listing lacks. Its
  cost grows with S, so it is timed on a sample of --baseline-sample messages per size.
Peak RSS of the writer process is VmHWM from /proc/<pid>/status.

moto is one process with a global lock holding objects in RAM: a correctness stand-in, so the
absolute numbers are a floor for real S3; the ratio and the trend with S are the point.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from writer_helpers import Publisher, jpeg_bytes, make_face  # noqa: E402

from facepipe import contract  # noqa: E402

HOST = "127.0.0.1"


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\nmax_queued_messages 100000\n"
        f"user {getpass.getuser()}\nlog_dest none\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)])
    wait_port(port)
    return proc, port


def start_moto() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc, port


def s3_env(port: int) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://{HOST}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def s3_client(port: int):
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=f"http://{HOST}:{port}",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
        config=Config(max_pool_connections=16),
    )


def prefill(client, bucket: str, count: int, folder: Path | None = None) -> None:
    client.create_bucket(Bucket=bucket)
    jpeg = jpeg_bytes(0)

    def put(i: int) -> None:
        meta, payload = make_face("old-cam", i, jpeg=jpeg)
        key = contract.face_key("faces", meta)
        client.put_object(Bucket=bucket, Key=key, Body=payload, ContentType="image/jpeg")
        if folder is not None:
            path = folder / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


def count_keys(client, bucket: str, prefix: str) -> int:
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += page.get("KeyCount", 0)
    return total


def stored_total(port: int) -> int:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("facepipe_writer_stored_total "):
                return int(float(line.split()[1]))
    return 0


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_writer(size: int, batch: int, workers: int, mqtt_port: int, s3_port: int, tmp: Path):
    client = s3_client(s3_port)
    bucket = f"bench-writer-{size}"
    prefill(client, bucket, size)
    log = tmp / f"writer-{size}.log"
    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACEPIPE_", "AWS_", "NOTIFY"))}
    env.update(s3_env(s3_port))
    env.update(
        {
            "FACEPIPE_MQTT_HOST": HOST,
            "FACEPIPE_MQTT_PORT": str(mqtt_port),
            # One client id for every size: a durable session of an earlier size would stay in
            # the share group and have half of the messages queued for it while offline.
            "FACEPIPE_MQTT_CLIENT_ID": "bench-writer",
            "FACEPIPE_S3_BUCKET": bucket,
            "FACEPIPE_WORKERS": str(workers),
            "FACEPIPE_LOG_LEVEL": "warning",
            "FACEPIPE_METRICS_PORT": str(metrics_port),
        }
    )
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "facepipe.writer", "--log-level", "info"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while "subscribed to" not in log.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"writer did not start:\n{log.read_text()}")
        time.sleep(0.05)
    jpeg = jpeg_bytes(1)
    faces = [make_face("bench-cam", i, jpeg=jpeg)[1] for i in range(batch)]
    publisher = Publisher(HOST, mqtt_port)
    start = time.perf_counter()
    for payload in faces:
        publisher.publish("faces/bench-cam", payload)
    # Progress from the writer's own metrics: polling a listing would load moto itself.
    deadline = time.monotonic() + 300
    while (stored := stored_total(metrics_port)) < batch:
        if time.monotonic() > deadline:
            raise SystemExit(f"writer stored only {stored} of {batch}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    rss = peak_rss_mib(proc.pid)
    found = count_keys(client, bucket, "faces/bench-cam/")
    if found != batch:
        raise SystemExit(f"writer reported {batch} stored but the bucket holds {found}")
    publisher.close()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    if code != 0:
        raise SystemExit(f"writer exited {code}:\n{log.read_text()}")
    return batch / elapsed, rss


def bench_ceiling(size: int, batch: int, workers: int, s3_port: int) -> float:
    """What the endpoint itself takes: bare boto3 PUTs from ``workers`` threads, no MQTT.

    moto is one process behind a global lock, so this is the ceiling any writer can reach here;
    the writer's figure is read against it (real S3 takes thousands of PUTs/s per prefix).
    """
    client = s3_client(s3_port)
    bucket = f"bench-ceiling-{size}"
    prefill(client, bucket, size)
    jpeg = jpeg_bytes(2)
    faces = [make_face("bench-cam", i, jpeg=jpeg) for i in range(batch)]

    def put(face: tuple) -> None:
        meta, payload = face
        client.put_object(
            Bucket=bucket,
            Key=contract.face_key("faces", meta),
            Body=payload,
            ContentType="image/jpeg",
            Metadata=contract.s3_metadata(meta),
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, faces))
    return batch / (time.perf_counter() - start)


def bench_baseline(size: int, sample: int, s3_port: int, tmp: Path) -> float:
    """The old writer: save to a folder, then 'sync' the folder to S3 for every message."""
    client = s3_client(s3_port)
    bucket = f"bench-baseline-{size}"
    folder = tmp / f"baseline-{size}"
    folder.mkdir()
    prefill(client, bucket, size, folder)
    jpeg = jpeg_bytes(1)
    faces = [make_face("bench-cam", i, jpeg=jpeg) for i in range(sample)]
    start = time.perf_counter()
    for meta, payload in faces:
        path = folder / contract.face_key("faces", meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        remote = {
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for obj in page.get("Contents", [])
        }
        for local in folder.rglob("*.jpg"):
            key = local.relative_to(folder).as_posix()
            if key not in remote:
                client.put_object(Bucket=bucket, Key=key, Body=local.read_bytes())
    elapsed = time.perf_counter() - start
    return sample / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000, help="faces published per size")
    parser.add_argument("--sizes", default="100,1000,2000", help="bucket sizes (stored faces)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--baseline-sample", type=int, default=50)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmpdir:
        tmp = Path(tmpdir)
        broker, mqtt_port = start_mosquitto(tmp)
        moto, s3_port = start_moto()
        rows = []
        try:
            for size in sizes:
                progress(f"bucket size {size}: face-writer ...")
                writer_rate, rss = bench_writer(
                    size, args.batch, args.workers, mqtt_port, s3_port, tmp
                )
                progress(f"bucket size {size}: baseline ...")
                base_rate = bench_baseline(size, args.baseline_sample, s3_port, tmp)
                progress(f"bucket size {size}: bare PUT ceiling ...")
                ceiling = bench_ceiling(size, args.batch, args.workers, s3_port)
                rows.append((size, writer_rate, base_rate, ceiling, rss))
        finally:
            for proc in (broker, moto):
                proc.terminate()
                proc.wait(10)
    print(
        f"face-writer vs old folder re-sync, moto S3 on loopback, {os.cpu_count()} CPUs, "
        f"writer: {args.batch} faces/size, {args.workers} workers, 1 process; "
        f"baseline: {args.baseline_sample} messages/size, S3 side only"
    )
    header = (
        f"{'stored faces':>12} | {'writer faces/s':>14} | {'baseline faces/s':>16} | "
        f"{'ratio':>7} | {'bare PUTs/s':>11} | {'of ceiling':>10} | {'writer peak RSS':>15}"
    )
    print(header)
    print("-" * len(header))
    for size, writer_rate, base_rate, ceiling, rss in rows:
        print(
            f"{size:>12} | {writer_rate:>14.0f} | {base_rate:>16.1f} | "
            f"{writer_rate / base_rate:>6.0f}x | {ceiling:>11.0f} | "
            f"{writer_rate / ceiling:>9.0%} | {rss:>11.0f} MiB"
        )
    print(
        "bare PUTs/s: the same faces PUT straight into the same moto from as many threads, "
        "no MQTT: the most any writer can store per second against this endpoint"
    )


if __name__ == "__main__":
    main()
