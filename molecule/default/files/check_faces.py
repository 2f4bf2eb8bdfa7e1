#!/usr/bin/env python3
"""Check the faces the pipeline stored in S3 (molecule/default verify; black box: boto3 only).

Waits (bounded) until every device has at least --min faces, then checks every stored face:
key = <prefix>/<device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>_<face_id>.jpg, Content-Type image/jpeg,
user metadata (face-id, device-id, captured-at, frame, bbox, detector) consistent with the key,
body a JPEG, and (with --truth) the frame inside a face segment of the sample clip's ground truth.
Prints a JSON summary; exit 1 with the problems otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter

import boto3

KEY_RE = re.compile(
    r"^(?P<prefix>.+)/(?P<device>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/"
    r"(?P<hms>\d{6})\.(?P<ms>\d{3})_(?P<face_id>[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12})\.jpg$"
)
CAPTURED_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})Z$")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="faces")
    p.add_argument("--devices", required=True, help="comma-separated device ids")
    p.add_argument("--min", type=int, default=1, help="faces per device to wait for")
    p.add_argument("--wait", type=float, default=180)
    p.add_argument("--truth", help="ground truth JSON of the sample clip")
    p.add_argument("--max-check", type=int, default=200, help="objects to inspect in detail")
    p.add_argument(
        "--deploy-checks",
        type=int,
        default=0,
        help="test faces of the deploy check (detector deploy-check) each device must have, exactly; -1: any",
    )
    p.add_argument(
        "--require-ids",
        default="",
        help="comma-separated face ids that must each be stored exactly once (e.g. an outbox's before a drain)",
    )
    args = p.parse_args()
    devices = [d for d in args.devices.split(",") if d]
    s3 = boto3.client(
        "s3",
        endpoint_url=args.endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )

    def listing() -> list[dict]:
        out: list[dict] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix + "/"):
            out.extend(page.get("Contents", []))
        return out

    t0 = time.monotonic()
    while True:
        objs = listing()
        per_device = Counter(o["Key"].split("/")[1] for o in objs)
        if all(per_device[d] >= args.min for d in devices) or time.monotonic() - t0 > args.wait:
            break
        time.sleep(2)
    waited = time.monotonic() - t0

    problems: list[str] = []
    for d in devices:
        if per_device[d] < args.min:
            problems.append(f"device {d}: {per_device[d]} faces after {waited:.0f}s, wanted >= {args.min}")
    truth_segments = None
    truth_frames = 1
    if args.truth:
        with open(args.truth) as f:
            truth = json.load(f)
        truth_frames = int(truth["frames"])
        truth_segments = [(s["start"], s["end"]) for s in truth["segments"] if s["faces"]]
    in_segment = outside = 0
    test_faces: Counter[str] = Counter()
    for o in objs:  # the deploy check's test faces: no frame of the clip, counted on their own
        if KEY_RE.match(o["Key"]):
            head = s3.head_object(Bucket=args.bucket, Key=o["Key"])
            if head.get("Metadata", {}).get("detector") == "deploy-check":
                test_faces[o["Key"].split("/")[1]] += 1
    stored_ids = Counter(m["face_id"] for m in (KEY_RE.match(o["Key"]) for o in objs) if m)
    required = [i for i in args.require_ids.split(",") if i]
    for face_id in required:
        if stored_ids[face_id] != 1:
            problems.append(f"face {face_id}: stored {stored_ids[face_id]} times, wanted once")
    for d in devices:
        if args.deploy_checks >= 0 and test_faces[d] != args.deploy_checks:
            problems.append(f"device {d}: {test_faces[d]} deploy-check faces, wanted {args.deploy_checks}")
    for o in objs[: args.max_check]:
        key = o["Key"]
        m = KEY_RE.match(key)
        if not m:
            problems.append(f"{key}: key does not follow <prefix>/<device>/YYYY/MM/DD/HHMMSS.mmm_<uuid4>.jpg")
            continue
        if m["prefix"] != args.prefix:
            problems.append(f"{key}: prefix {m['prefix']!r} != {args.prefix!r}")
        head = s3.head_object(Bucket=args.bucket, Key=key)
        if head.get("ContentType") != "image/jpeg":
            problems.append(f"{key}: content type {head.get('ContentType')!r}")
        meta = head.get("Metadata", {})
        missing = {"face-id", "device-id", "captured-at", "frame", "bbox", "detector"} - set(meta)
        if missing:
            problems.append(f"{key}: metadata lacks {sorted(missing)}")
            continue
        if meta["face-id"] != m["face_id"] or meta["device-id"] != m["device"]:
            problems.append(
                f"{key}: metadata face-id/device-id {meta['face-id']}/{meta['device-id']} disagree with the key"
            )
        c = CAPTURED_RE.match(meta["captured-at"])
        if not c or (c[1], c[2], c[3], c[4] + c[5] + c[6], c[7]) != (m["y"], m["m"], m["d"], m["hms"], m["ms"]):
            problems.append(f"{key}: captured-at {meta['captured-at']!r} does not match the key's time")
        body = s3.get_object(Bucket=args.bucket, Key=key)["Body"].read(3)
        if body[:2] != b"\xff\xd8":
            problems.append(f"{key}: body is not a JPEG")
        if truth_segments is not None and meta["detector"] != "deploy-check":
            frame = int(meta["frame"]) % truth_frames  # a looped clip keeps counting frames
            if any(a <= frame < b for a, b in truth_segments):
                in_segment += 1
            else:
                outside += 1
    checked = in_segment + outside
    if truth_segments is not None and checked and in_segment / checked < 0.9:
        problems.append(f"only {in_segment} of {checked} faces come from frames with faces in the clip")
    summary = {
        "faces": len(objs),
        "per_device": dict(per_device),
        "waited_s": round(waited, 1),
        "checked": min(len(objs), args.max_check),
        "frames_in_face_segments": in_segment,
        "frames_outside": outside,
        "deploy_check_faces": dict(test_faces),
        "required_ids_stored_once": sum(1 for i in required if stored_ids[i] == 1),
        "examples": [o["Key"] for o in objs[:3]],
        "problems": problems,
    }
    print(json.dumps(summary, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
