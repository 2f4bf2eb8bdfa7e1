"""Detector speed and recall at 640x480 on one thread, against the naive baseline.

    python bench/bench_detector.py [--clip sample.avi] [--repeat 3] [--model yunet.onnx]

Without ``--clip`` the sample clip is generated (needs scikit-image). Rows:

- baseline: full-frame ``detectMultiScale(scaleFactor=1.1, minNeighbors=5)`` on every frame
  (what the scripts this project replaces did);
- facepipe haar: :class:`facepipe.finders.HaarFinder` with the face-detector's defaults
  (grey, downscaled to 320 px wide, mapped back);
- facepipe pipeline: the same plus what the program does per frame (crop, sharpness, tracker;
  JPEG encoding only for the few published crops);
- yunet (with ``--model``).

Each frame is timed ``--repeat`` times and its fastest time kept (other processes on a shared
machine only ever add time). "median ms", "p95 ms", fps and speedup use this thread's CPU time
(``time.thread_time``): what one core spends per frame, which waiting for a busy CPU does not
inflate; "wall med" is the wall-clock median for comparison. Recall: ground-truth faces
found (IoU >= 0.3) / ground-truth faces; "frames" counts face-segment frames where every face
was found; false positives are boxes matching no ground-truth face.
Target: median <= 33 ms/frame with recall >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from facepipe import sampleclip
from facepipe.boxes import Box
from facepipe.detector import crop_face
from facepipe.finders import HaarFinder, YuNetFinder, crop_quality
from facepipe.tracking import Observation, Tracker


def load_frames(clip: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            return frames
        frames.append(image)


def baseline_detector() -> Callable[[np.ndarray], list[Box]]:
    cascade = cv2.CascadeClassifier(
        str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml")
    )

    def detect(frame: np.ndarray) -> list[Box]:
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        found = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5)
        return [Box(*map(int, b)) for b in np.asarray(found).reshape(-1, 4)]

    return detect


def pipeline_step(detector: HaarFinder) -> Callable[[np.ndarray], list[Box]]:
    tracker: Tracker = Tracker(min_interval=2.0)
    counter = iter(range(10**9))

    def step(frame: np.ndarray) -> list[Box]:
        index = next(counter)
        boxes = detector.detect(frame)
        observations = []
        for box in boxes:
            crop = crop_face(frame, box, 0.25)
            if crop is not None:
                observations.append(Observation(crop.box, crop_quality(crop.image), crop))
        for pub in tracker.update(index, index / 20.0, observations):
            cv2.imencode(".jpg", pub.observation.payload.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        return boxes

    return step


def measure(
    detect: Callable[[np.ndarray], list[Box]], frames: list[np.ndarray], repeat: int
) -> tuple[list[float], list[float], list[list[Box]]]:
    """Per-frame CPU ms (this thread) and wall ms, each the best of ``repeat``."""
    cpu = [float("inf")] * len(frames)
    wall = [float("inf")] * len(frames)
    results: list[list[Box]] = [[] for _ in frames]
    for _ in range(repeat):
        for i, frame in enumerate(frames):
            c0, w0 = time.thread_time(), time.perf_counter()
            boxes = detect(frame)
            cpu[i] = min(cpu[i], time.thread_time() - c0)
            wall[i] = min(wall[i], time.perf_counter() - w0)
            results[i] = boxes
    return [t * 1000 for t in cpu], [t * 1000 for t in wall], results


def score(results: list[list[Box]], truth: sampleclip.GroundTruth) -> tuple[float, float, int]:
    found = wanted = full_frames = face_frames = false_pos = 0
    for i, boxes in enumerate(results):
        gt = [Box(*b) for b in truth.boxes[i]]
        matched = sum(1 for g in gt if any(g.iou(b) >= 0.3 for b in boxes))
        found += matched
        wanted += len(gt)
        if gt:
            face_frames += 1
            full_frames += matched == len(gt)
        false_pos += sum(1 for b in boxes if all(g.iou(b) < 0.3 for g in gt))
    return found / wanted, full_frames / face_frames, false_pos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", type=Path, help="sample clip (its .json truth next to it)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", type=Path, help="YuNet ONNX model to add as a row")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip
        if clip is None:
            clip = Path(tmp) / "sample.avi"
            sampleclip.write_clip(clip)
        truth = sampleclip.load_truth(clip.with_suffix(".json"))
        frames = load_frames(clip)
    assert len(frames) == truth.frames, "clip and truth disagree"

    haar = HaarFinder()
    rows: list[tuple[str, Callable[[np.ndarray], list[Box]]]] = [
        ("baseline full-frame haar (1.1, 5)", baseline_detector()),
        (f"facepipe {haar.name} @320px", haar.detect),
        ("facepipe pipeline (detect+track+crop)", pipeline_step(HaarFinder())),
    ]
    if args.model:
        yunet = YuNetFinder(args.model)
        rows.append((f"facepipe {yunet.name} @320px", yunet.detect))

    h, w = frames[0].shape[:2]
    print(
        f"{len(frames)} frames {w}x{h} at {truth.fps:g} fps, cv2 {cv2.__version__}, "
        f"1 thread, best of {args.repeat} per frame, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    header = (
        f"{'detector':<40} {'median ms':>9} {'p95 ms':>7} {'fps':>6} {'speedup':>7} "
        f"{'wall med':>8} {'recall':>6} {'frames':>6} {'false+':>6}"
    )
    print(header)
    print("-" * len(header))
    base_median = None
    for name, detect in rows:
        times, wall, results = measure(detect, frames, args.repeat)
        median = statistics.median(times)
        p95 = float(np.percentile(times, 95))
        fps = 1000 * len(times) / sum(times)
        base_median = base_median or median
        recall, frame_recall, false_pos = score(results, truth)
        print(
            f"{name:<40} {median:>9.1f} {p95:>7.1f} {fps:>6.1f} {base_median / median:>6.1f}x "
            f"{statistics.median(wall):>8.1f} {recall:>6.3f} {frame_recall:>6.3f} {false_pos:>6d}"
        )
    print("target: median <= 33 ms/frame with recall >= 0.9 (recall = faces found / faces)")


if __name__ == "__main__":
    main()
