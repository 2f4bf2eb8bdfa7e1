"""facepipe-contact-sheet: one self-contained HTML page showing the newest faces in the bucket.

Lists ``<prefix>/`` (S3 settings from boto3's standard chain, like face-writer), keeps the
newest ``--limit`` objects, downscales each with OpenCV and embeds it as a ``data:`` URI, so the
file can be mailed or opened anywhere without S3 access. Counts per device cover every face
listed, not only the ones shown. Every string from the bucket is HTML-escaped.
"""

from __future__ import annotations

import base64
import heapq
import html
import logging
import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import boto3
import cv2
import numpy as np
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from facepipe.config import (
    LOG_LEVEL,
    Option,
    config_of,
    int_range,
    non_empty,
    parse_config,
    run_main,
)
from facepipe.logsetup import setup_logging

PROG: Final = "facepipe-contact-sheet"
log = logging.getLogger(__name__)

OPTIONS: Final = (
    Option("s3_bucket", non_empty, None, "bucket face-writer stores into", required=True),
    Option("s3_prefix", non_empty, "faces", "key prefix of the faces"),
    Option("output", non_empty, None, "HTML file to write", required=True),
    Option("limit", int_range(1, 5000), 200, "show the newest N faces"),
    Option("thumb_size", int_range(16, 1024), 160, "longest side of a thumbnail (pixels)"),
    Option("title", non_empty, "facepipe faces", "page title"),
    LOG_LEVEL,
)


@config_of(OPTIONS)
@dataclass(frozen=True)
class ContactSheetConfig:
    s3_bucket: str
    s3_prefix: str
    output: str
    limit: int
    thumb_size: int
    title: str
    log_level: str


@dataclass(frozen=True)
class Listed:
    key: str
    modified: datetime
    device: str


@dataclass(frozen=True)
class Tile:
    key: str
    device: str
    captured_at: str
    data_uri: str | None  # None when the object is not a decodable image
    width: int
    height: int


def list_newest(
    client: Any, bucket: str, prefix: str, limit: int
) -> tuple[list[Listed], Counter[str]]:
    """The newest ``limit`` faces (bounded memory) and a count per device of all of them."""
    counts: Counter[str] = Counter()
    # LastModified has one-second resolution; within a second, order by the key's capture
    # stamp (<device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>_...), then by the key itself.
    newest: list[tuple[datetime, str, str, Listed]] = []
    base = prefix.strip("/") + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            device, _, stamp = key[len(base) :].partition("/")
            counts[device] += 1
            item = Listed(key, obj["LastModified"], device)
            entry = (item.modified, stamp, key, item)
            if len(newest) < limit:
                heapq.heappush(newest, entry)
            else:
                heapq.heappushpop(newest, entry)
    ordered = [entry[3] for entry in sorted(newest, key=lambda e: e[:3], reverse=True)]
    return ordered, counts


def thumbnail(body: bytes, size: int) -> tuple[str, int, int] | None:
    """A JPEG data: URI of the image scaled to fit ``size`` x ``size``; None if undecodable."""
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    height, width = image.shape[:2]
    scale = min(1.0, size / max(height, width))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        return None
    return (
        "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii"),
        width,
        height,
    )


def fetch_tile(client: Any, bucket: str, item: Listed, size: int) -> Tile:
    obj = client.get_object(Bucket=bucket, Key=item.key)
    body = obj["Body"].read()
    meta = obj.get("Metadata", {})
    thumb = thumbnail(body, size)
    uri, width, height = thumb if thumb else (None, 0, 0)
    return Tile(
        key=item.key,
        device=meta.get("device-id", item.device),
        captured_at=meta.get("captured-at", ""),
        data_uri=uri,
        width=width,
        height=height,
    )


_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#fafafa;color:#222}
h1{font-size:1.3rem;margin:0 0 .5rem}
.counts{margin:.5rem 0 1rem;padding:0;list-style:none;display:flex;flex-wrap:wrap;gap:.5rem}
.counts li{background:#e8eef7;border-radius:4px;padding:.2rem .5rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(%dpx,1fr));gap:.75rem}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:.4rem}
figure img{display:block;margin:0 auto;max-width:100%%;height:auto}
figcaption{font-size:.75rem;line-height:1.3;word-break:break-all}
.missing{height:4rem;display:flex;align-items:center;justify-content:center;color:#a00}
"""


def render(
    title: str, bucket: str, prefix: str, tiles: list[Tile], counts: Counter[str], size: int
) -> str:
    esc = html.escape
    total = sum(counts.values())
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS % (size + 20)}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="summary">s3://{esc(bucket)}/{esc(prefix.strip("/"))}/: {total} face(s) '
        f"from {len(counts)} device(s); newest {len(tiles)} shown; generated "
        f"{esc(datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%SZ'))}</p>",
        '<ul class="counts">',
    ]
    for device, count in sorted(counts.items()):
        out.append(
            f'<li class="device-count" data-device="{esc(device)}">'
            f"{esc(device)}: <b>{count}</b></li>"
        )
    out.append('</ul><div class="grid">')
    for tile in tiles:
        if tile.data_uri:
            image = (
                f'<img src="{tile.data_uri}" width="{tile.width}" height="{tile.height}" '
                f'alt="{esc(tile.device)} {esc(tile.captured_at)}">'
            )
        else:
            image = '<div class="missing">not a decodable image</div>'
        out.append(
            f'<figure data-key="{esc(tile.key)}">{image}<figcaption>'
            f'<span class="device">{esc(tile.device)}</span><br>'
            f'<time class="captured">{esc(tile.captured_at)}</time><br>'
            f'<code class="key">{esc(tile.key)}</code></figcaption></figure>'
        )
    out.append("</div></body></html>")
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(
    client: Any, bucket: str, prefix: str, limit: int, size: int, title: str
) -> tuple[str, int]:
    listed, counts = list_newest(client, bucket, prefix, limit)
    with ThreadPoolExecutor(max_workers=8) as pool:
        tiles = list(pool.map(lambda item: fetch_tile(client, bucket, item, size), listed))
    return render(title, bucket, prefix, tiles, counts, size), len(tiles)


def run(argv: list[str] | None = None) -> int:
    cfg = parse_config(
        ContactSheetConfig, PROG, "Write an HTML contact sheet of stored faces.", argv
    )
    setup_logging(cfg.log_level)
    client = boto3.session.Session().client("s3", config=Config(max_pool_connections=10))
    try:
        page, shown = build(
            client, cfg.s3_bucket, cfg.s3_prefix, cfg.limit, cfg.thumb_size, cfg.title
        )
    except (BotoCoreError, ClientError) as exc:
        log.error("cannot read s3://%s/%s/: %s", cfg.s3_bucket, cfg.s3_prefix, exc)
        return 1
    write_atomically(Path(cfg.output), page)
    log.info("wrote %s with %d face(s)", cfg.output, shown)
    return 0


def main() -> None:
    run_main(PROG, run)


if __name__ == "__main__":
    main()
