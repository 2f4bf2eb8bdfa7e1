"""face-detector: faces from a camera (or a file) to MQTT, one crop per tracked face per interval.

Main loop: read a frame -> detect -> track -> crop the chosen faces with a margin -> JPEG ->
:func:`facepipe.contract.encode_face` -> publish on ``<prefix>/<device_id>``.

Publishing never blocks capture on a live source: paho queues at most ``--max-queued``
messages while the broker is slow or away; beyond that new faces are dropped and counted
(``publish_dropped``), because on a camera bounded memory matters more than old faces. With a
file or folder source (tests, the lab) nothing may be lost: the loop instead waits while
``--max-queued`` messages are unacknowledged, so a slow broker slows playback down.

A finished file (no ``--loop``) and SIGTERM end the same way: wait until every publish is
acknowledged (a finished file waits as long as it takes; SIGTERM at most ``--drain-timeout``),
publish the retained ``offline`` status, disconnect cleanly, exit 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import cv2
import numpy as np

from facepipe import brokerstats, contract
from facepipe.boxes import Box
from facepipe.brokerstats import BrokerStats
from facepipe.config import (
    LOGGING_OPTIONS,
    MQTT_OPTIONS,
    LoggingConfig,
    MqttConfig,
    Option,
    config_of,
    device_id,
    existing_file,
    float_range,
    int_range,
    non_empty,
    parse_bool,
    parse_config,
    parse_networks,
    resolve_device_id,
    run_main,
)
from facepipe.delivery import (
    DELIVERY_COUNTERS,
    DELIVERY_GAUGES,
    OUTBOX_OPTIONS,
    OutboxConfig,
    start_publishing,
)
from facepipe.finders import FaceFinder, HaarFinder, YuNetFinder, crop_quality, set_threads
from facepipe.frames import CameraMode, Frame, FrameSource, fourcc, open_source
from facepipe.logsetup import setup_logging
from facepipe.mqtt import MqttSettings, Will
from facepipe.notify import Notifier, stop_on_signals
from facepipe.stats import Counters, StatsReporter, serve_metrics
from facepipe.tracking import Observation, Tracker

PROG: Final = "face-detector"
log = logging.getLogger(__name__)


OPTIONS: Final = (
    Option(
        "source",
        non_empty,
        None,
        "camera (/dev/video0 or an index), video file, rtsp:// or http(s):// URL, or a folder "
        "of images ($CREDENTIALS_DIRECTORY/camera-source wins over the environment: a URL "
        "with credentials is a secret)",
        required=True,
        credential="camera-source",
    ),
    Option("device_id", device_id, None, "device id in topics and metadata (default: hostname)"),
    Option(
        "realtime", parse_bool, True, "play files at their own frame rate", flag_only_value="true"
    ),
    Option(
        "loop", parse_bool, False, "restart a file or folder at its end", flag_only_value="true"
    ),
    Option(
        "fps", float_range(0, 1000), 0.0, "frame rate of folders / files without one (0 = auto)"
    ),
    Option(
        "camera_width", int_range(0, 10000), 0, "V4L2 camera: frame width to ask for (0 = its own)"
    ),
    Option(
        "camera_height",
        int_range(0, 10000),
        0,
        "V4L2 camera: frame height to ask for (0 = its own)",
    ),
    Option(
        "camera_fps", float_range(0, 1000), 0.0, "V4L2 camera: frame rate to ask for (0 = its own)"
    ),
    Option(
        "camera_format",
        fourcc,
        None,
        "V4L2 camera: pixel format such as MJPG or YUYV (default: its own)",
    ),
    Option(
        "detect_fps",
        float_range(0, 1000),
        0.0,
        "camera or stream: detect at most this often per second, skipping the frames between "
        "(0 = every frame)",
    ),
    Option("min_interval", float_range(0), 2.0, "seconds of source time between a track's faces"),
    Option("jpeg_quality", int_range(1, 100), 90, "JPEG quality of published crops"),
    Option(
        "crop_margin", float_range(0, 2), 0.25, "margin around a face, as a fraction of its size"
    ),
    Option("detect_width", int_range(0, 10000), 320, "width to detect at (0 = full frame)"),
    Option("scale_factor", float_range(1.01, 2.0), 1.2, "Haar: detectMultiScale scale factor"),
    Option("min_neighbors", int_range(0, 50), 3, "Haar: detectMultiScale minNeighbors"),
    Option("min_size", int_range(1, 10000), 40, "smallest face side in source pixels"),
    Option(
        "equalize",
        parse_bool,
        False,
        "Haar: equalize the histogram before detecting",
        flag_only_value="true",
    ),
    Option("cascade", existing_file, None, "Haar cascade XML (default: OpenCV's frontalface)"),
    Option(
        "model", existing_file, None, "YuNet ONNX model: use cv2.FaceDetectorYN instead of Haar"
    ),
    Option("score_threshold", float_range(0, 1), 0.8, "YuNet: minimum face score"),
    Option("min_hits", int_range(1, 100), 3, "frames a face must be seen in before publishing"),
    Option("max_missed", int_range(0, 1000), 10, "frames a track survives without a detection"),
    Option("iou_threshold", float_range(0.01, 1), 0.3, "IoU that links a detection to a track"),
    Option("threads", int_range(0, 64), 1, "OpenCV threads (0 = OpenCV's default)"),
    Option(
        "max_bytes",
        int_range(1024, 256 * 1024 * 1024),
        1024 * 1024,
        "largest face message in bytes (the brokers' message_size_limit); larger crops are "
        "re-encoded smaller",
    ),
    Option("max_queued", int_range(1, 1_000_000), 1000, "unacknowledged publishes held at most"),
    Option("drain_timeout", float_range(0), 30.0, "seconds to wait for acks on SIGTERM"),
    *OUTBOX_OPTIONS,
    *MQTT_OPTIONS,
    *LOGGING_OPTIONS,
)


@config_of(OPTIONS)
@dataclass(frozen=True)
class DetectorConfig:
    source: str
    device_id: str | None
    realtime: bool
    loop: bool
    fps: float
    camera_width: int
    camera_height: int
    camera_fps: float
    camera_format: str | None
    detect_fps: float
    min_interval: float
    jpeg_quality: int
    crop_margin: float
    detect_width: int
    scale_factor: float
    min_neighbors: int
    min_size: int
    equalize: bool
    cascade: Path | None
    model: Path | None
    score_threshold: float
    min_hits: int
    max_missed: int
    iou_threshold: float
    threads: int
    max_bytes: int
    max_queued: int
    drain_timeout: float
    outbox: OutboxConfig
    mqtt: MqttConfig
    logging: LoggingConfig


COUNTERS: Final = (
    "frames",
    "dropped",
    "faces",
    "tracks",
    "published",
    "acked",
    "publish_dropped",
    "publish_refused",
    "too_large_dropped",
    "read_errors",
    "skipped",
)
GAUGES: Final = ("pending", "source_up")


@dataclass(frozen=True)
class Crop:
    box: Box  # the face in source pixels (what the metadata's bbox says)
    image: np.ndarray  # the face with its margin


def crop_face(frame: np.ndarray, box: Box, margin: float) -> Crop | None:
    height, width = frame.shape[:2]
    face = box.clamped(width, height)
    if face is None:
        return None
    region = face.with_margin(margin, width, height)
    if region is None:
        return None
    image = frame[region.y : region.y + region.h, region.x : region.x + region.w].copy()
    return Crop(face, image)


def build_finder(cfg: DetectorConfig) -> FaceFinder:
    if cfg.model is not None:
        return YuNetFinder(
            cfg.model,
            score_threshold=cfg.score_threshold,
            min_size=cfg.min_size,
            detect_width=cfg.detect_width,
        )
    return HaarFinder(
        cfg.cascade,
        scale_factor=cfg.scale_factor,
        min_neighbors=cfg.min_neighbors,
        min_size=cfg.min_size,
        detect_width=cfg.detect_width,
        equalize=cfg.equalize,
    )


class Pipeline:
    """Detect, track, crop and publish; no I/O of its own besides the publisher."""

    def __init__(
        self,
        detector: FaceFinder,
        tracker: Tracker[tuple[Crop, datetime]],
        publish: Callable[[str, bytes], bool],
        device: str,
        cfg: DetectorConfig,
        counters: Counters,
    ) -> None:
        self.detector = detector
        self.tracker = tracker
        self.publish = publish
        self.device = device
        self.margin = cfg.crop_margin
        self.quality = cfg.jpeg_quality
        self.max_bytes = cfg.max_bytes
        self.counters = counters

    def process(self, frame: Frame) -> int:
        """Handle one frame; return how many faces were published."""
        boxes = self.detector.detect(frame.image)
        observations: list[Observation[tuple[Crop, datetime]]] = []
        for box in boxes:
            crop = crop_face(frame.image, box, self.margin)
            if crop is not None:
                observations.append(
                    Observation(crop.box, crop_quality(crop.image), (crop, frame.captured_at))
                )
        self.counters.inc("faces", len(observations))
        before = self.tracker.started
        chosen = self.tracker.update(frame.index, frame.source_time, observations)
        self.counters.inc("tracks", self.tracker.started - before)
        sent = 0
        for pub in chosen:
            crop, captured_at = pub.observation.payload
            meta = contract.FaceMeta.new(
                device_id=self.device,
                captured_at=captured_at,
                frame=pub.frame,
                bbox=crop.box.as_tuple(),
                detector=self.detector.name,
                track_id=pub.track_id,
            )
            message = encode_within(crop.image, meta, self.quality, self.max_bytes)
            if message is None:
                log.warning(
                    "face of frame %d does not fit in %d bytes even when shrunk; dropped",
                    pub.frame,
                    self.max_bytes,
                )
                self.counters.inc("too_large_dropped")
                continue
            if self.publish(meta.face_id, message):
                sent += 1
                log.debug("face %s track %s frame %d", meta.face_id, pub.track_id, pub.frame)
        return sent


# JPEG qualities tried, then halvings of the crop, until a face message fits in --max-bytes.
_FALLBACK_QUALITIES: Final = (70, 50, 30)
_MIN_SIDE: Final = 24


def encode_within(
    image: np.ndarray, meta: contract.FaceMeta, quality: int, max_bytes: int
) -> bytes | None:
    """The face message at ``quality``, or smaller (lower quality, then halved) if it would
    exceed ``max_bytes`` (the brokers refuse larger messages); None if nothing fits."""
    qualities = [quality, *(q for q in _FALLBACK_QUALITIES if q < quality)]
    while True:
        for q in qualities:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])
            if not ok:
                return None
            message = contract.encode_face(buf.tobytes(), meta)
            if len(message) <= max_bytes:
                return message
        height, width = image.shape[:2]
        if min(height, width) // 2 < _MIN_SIDE:
            return None
        image = cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
        qualities = [qualities[-1]]


def run(argv: list[str] | None = None) -> int:
    cfg = parse_config(DetectorConfig, PROG, "Detect faces and publish them to MQTT.", argv)
    device = resolve_device_id(cfg.device_id)
    settings = MqttSettings.from_config(cfg.mqtt, default_client_id=f"{PROG}-{device}")
    setup_logging(cfg.logging.log_level)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # we log source states
    set_threads(cfg.threads)
    if cfg.mqtt.qos == 0:
        log.warning("--qos 0: faces may be lost on the way to the broker")
    detector = build_finder(cfg)
    camera = CameraMode(
        cfg.camera_width, cfg.camera_height, cfg.camera_fps, cfg.camera_format or ""
    )
    source = open_source(
        cfg.source, realtime=cfg.realtime, loop=cfg.loop, fps=cfg.fps, camera=camera
    )
    gate = RateGate(cfg.detect_fps if source.live else 0.0)

    # The outbox's gauges exist only with an outbox (they would stay 0: bridge_up=0 forever).
    outbox_gauges = DELIVERY_GAUGES if cfg.outbox.outbox_dir else ()
    counters = Counters(
        [*COUNTERS, *DELIVERY_COUNTERS, *brokerstats.COUNTERS],
        [*GAUGES, *outbox_gauges, *brokerstats.GAUGES],
        unknown=brokerstats.FIGURES,
    )
    notifier = Notifier()
    stop = stop_on_signals()

    status = contract.status_topic(cfg.mqtt.topic_prefix, device)
    publishing = start_publishing(
        cfg.outbox,
        cfg.mqtt,
        settings,
        device=device,
        counters=counters,
        will=Will(status, contract.STATUS_OFFLINE.encode(), qos=1, retain=True),
        # Live: paho's queue is the bound (beyond it a face waits in the outbox, or without
        # one is dropped and counted). Files: unbounded in paho, bounded by wait_room.
        max_queued=cfg.max_queued if source.live else 0,
        max_pending=cfg.max_queued,
    )
    session, publisher = publishing.session, publishing.publisher
    BrokerStats(counters).attach(session)  # the edge broker's bridge queue and drops
    tracker: Tracker[tuple[Crop, datetime]] = Tracker(
        min_interval=cfg.min_interval,
        iou_threshold=cfg.iou_threshold,
        min_hits=cfg.min_hits,
        max_missed=cfg.max_missed,
    )
    pipeline = Pipeline(detector, tracker, publishing.submit, device, cfg, counters)
    if cfg.logging.metrics_port:
        serve_metrics(
            "facepipe_detector",
            counters,
            cfg.logging.metrics_address,
            cfg.logging.metrics_port,
            parse_networks(cfg.logging.metrics_allow),
        )

    log.info(
        "device %s: %s (%s) -> %s with %s",
        device,
        source.description,
        "live" if source.live else f"{source.fps:g} fps",
        publisher.topic,
        detector.name,
    )
    session.start()
    session.wait_connected(2.0)
    notifier.ready("connected" if session.connected.is_set() else "connecting to the broker")
    reporter = StatsReporter(
        counters, cfg.logging.stats_interval, notifier.status, {"frames": "fps"}
    )
    announced = (0, "")

    def tick() -> None:
        nonlocal announced
        # After every (re)connect (the Will may have said offline) and every change of the camera.
        state = (session.connects, _status(source))
        # A full paho queue refuses the status (None): the next tick tries again.
        if (
            state != announced
            and session.connected.is_set()
            and publisher.publish_status(status, state[1].encode()) is not None
        ):
            announced = state
        publishing.tick()
        counters.set_gauge("pending", publisher.pending())
        counters.set_gauge("source_up", 0.0 if source.live and not _up(source) else 1.0)
        reporter.tick()
        notifier.watchdog()

    try:
        while not stop.is_set():
            tick()
            frame = source.read(0.5)
            if frame is None:
                if source.finished:
                    log.info(
                        "%s finished after %d frames", source.description, counters.get("frames")
                    )
                    break
                continue
            counters.inc("frames")
            if gate.due(frame.source_time):
                pipeline.process(frame)
            else:
                counters.inc("skipped")
            if not source.live:  # a file loses nothing: wait for room rather than drop
                publisher.wait_room(stop, tick)
                while publishing.outbox_full() and not stop.is_set():
                    tick()
                    time.sleep(0.05)
            _sync_source_counters(source, counters)
    finally:
        source.close()

    notifier.stopping()
    _sync_source_counters(source, counters)
    drained = publisher.drain(stop, cfg.drain_timeout, tick, publishing.unfinished)
    if not drained:
        log.warning("%d message(s) not acknowledged before the drain timeout", publisher.pending())
    if session.connected.is_set():
        mid = publisher.publish_status(status, contract.STATUS_OFFLINE.encode())
        deadline = time.monotonic() + 5.0
        while not publisher.is_acked(mid) and time.monotonic() < deadline:
            time.sleep(0.01)
    session.stop()
    publishing.tick()
    publishing.close()
    counters.set_gauge("pending", publisher.pending())
    if publishing.delivery is not None and publishing.delivery.outbox.depth:
        log.info(
            "%d face(s) wait in the outbox for the cloud's acknowledgement; they go out again "
            "at the next start",
            publishing.delivery.outbox.depth,
        )
    log.info("stopped: %s", reporter.line())
    return 0


class RateGate:
    """Lets at most ``fps`` frames per second of source time through (0: every frame). A frame
    is due once 1/fps has passed since the last one let through, so a slower source loses none."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._next = -math.inf

    def due(self, source_time: float) -> bool:
        if source_time < self._next:
            return False
        # From the due time, not the frame's, so frames 33 ms apart still average fps; after a
        # pause (or the first frame) from this frame, so no burst catches up.
        self._next += self.period
        if self._next <= source_time:
            self._next = source_time + self.period
        return True


def _status(source: FrameSource) -> str:
    """camera-down while a live source fails (not while its first attempt is under way)."""
    return contract.STATUS_CAMERA_DOWN if source.failing else contract.STATUS_ONLINE


def _up(source: FrameSource) -> bool:
    opened = getattr(source, "opened", None)
    return bool(opened is not None and opened.is_set())


def _sync_source_counters(source: FrameSource, counters: Counters) -> None:
    for name, value in (("dropped", source.dropped), ("read_errors", source.read_errors)):
        delta = value - counters.get(name)
        if delta > 0:
            counters.inc(name, delta)


def main() -> None:
    run_main(PROG, run)


if __name__ == "__main__":
    main()
