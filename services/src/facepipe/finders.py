"""Face finders (the algorithm face-detector runs): Haar cascade (default) or YuNet.

Both detect on a downscaled copy of the frame (``detect_width`` pixels wide, 320 by default)
and map the boxes back to source pixels: at 640x480 this is four times fewer pixels, which is
what lets one Raspberry Pi-class core keep up with a 30 fps camera. Faces smaller than about
``24 * source_width / detect_width`` pixels (the cascade's 24x24 window) are not found; set
``detect_width`` to 0 to detect on the full frame.

Haar defaults (scale factor 1.2, min neighbours 3, no histogram equalisation) come from
bench/bench_detector.py on the sample clip: 1.1/4 costs ~1.7x the time for the same recall,
and equalising the histogram halved recall on faces pasted over dark backgrounds. The tracker
needs a face in ``min_hits`` consecutive frames, which absorbs the extra false positives that
min neighbours 3 lets through.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from facepipe.boxes import Box
from facepipe.config import ConfigError

DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"


class FaceFinder(Protocol):
    """What the detector program needs: a name for the metadata and ``detect``."""

    name: str

    def detect(self, frame: np.ndarray) -> list[Box]: ...


def set_threads(threads: int) -> None:
    """OpenCV's own thread pool: 1 for the one-core target, 0 leaves OpenCV's default."""
    if threads > 0:
        cv2.setNumThreads(threads)


def _downscale(frame: np.ndarray, detect_width: int) -> tuple[np.ndarray, float]:
    """Return the image to detect on and the factor mapping its pixels back to the source."""
    width = frame.shape[1]
    if detect_width <= 0 or width <= detect_width:
        return frame, 1.0
    factor = width / detect_width
    height = max(1, round(frame.shape[0] / factor))
    small = cv2.resize(frame, (detect_width, height), interpolation=cv2.INTER_AREA)
    return small, factor


def _grey(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


class HaarFinder:
    def __init__(
        self,
        cascade: str | Path | None = None,
        *,
        scale_factor: float = 1.2,
        min_neighbors: int = 3,
        min_size: int = 40,
        detect_width: int = 320,
        equalize: bool = False,
    ) -> None:
        path = Path(cascade) if cascade else Path(cv2.data.haarcascades) / DEFAULT_CASCADE  # type: ignore[attr-defined]
        try:  # a malformed XML raises (cv2.error, or SystemError from the binding)
            self.classifier = cv2.CascadeClassifier(str(path))
            loaded = not self.classifier.empty()
        except (cv2.error, SystemError):
            loaded = False
        if not loaded:
            raise ConfigError(f"--cascade / FACEPIPE_CASCADE: cannot load a cascade from {path}")
        stem = path.stem.removeprefix("haarcascade_")
        self.name = f"haar:{stem}"
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size
        self.detect_width = detect_width
        self.equalize = equalize

    def detect(self, frame: np.ndarray) -> list[Box]:
        # Grey first (one third of the pixels to resize), then downscale.
        grey, factor = _downscale(_grey(frame), self.detect_width)
        if self.equalize:
            grey = cv2.equalizeHist(grey)
        side = max(1, math.ceil(self.min_size / factor))
        found = self.classifier.detectMultiScale(
            grey,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
        )
        height, width = frame.shape[:2]
        boxes = []
        for x, y, w, h in np.asarray(found).reshape(-1, 4).tolist():
            box = Box(x, y, w, h).scaled(factor).clamped(width, height)
            if box is not None:
                boxes.append(box)
        return boxes


class YuNetFinder:
    """``cv2.FaceDetectorYN`` with an ONNX model (e.g. face_detection_yunet_2023mar.onnx)."""

    def __init__(
        self,
        model: str | Path,
        *,
        score_threshold: float = 0.8,
        nms_threshold: float = 0.3,
        top_k: int = 50,
        min_size: int = 0,
        detect_width: int = 320,
    ) -> None:
        path = Path(model)
        try:
            self.net = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), score_threshold, nms_threshold, top_k
            )
        except cv2.error as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "cv2 error"
            raise ConfigError(
                f"--model / FACEPIPE_MODEL: cannot load a YuNet model from {path}: {reason}"
            ) from None
        self.name = f"yunet:{path.name}"
        self.min_size = min_size
        self.detect_width = detect_width
        self._input_size: tuple[int, int] | None = None

    def detect(self, frame: np.ndarray) -> list[Box]:
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        small, factor = _downscale(frame, self.detect_width)
        size = (small.shape[1], small.shape[0])
        if size != self._input_size:
            self.net.setInputSize(size)
            self._input_size = size
        _, faces = self.net.detect(small)
        if faces is None:
            return []
        height, width = frame.shape[:2]
        boxes = []
        for row in faces:
            x, y, w, h = (round(float(v)) for v in row[:4])
            box = Box(x, y, w, h, float(row[-1])).scaled(factor).clamped(width, height)
            if box is not None and min(box.w, box.h) >= self.min_size:
                boxes.append(box)
        return boxes


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grey crop: higher is sharper."""
    grey = _grey(crop)
    return float(cv2.Laplacian(grey, cv2.CV_32F).var())


def crop_quality(crop: np.ndarray) -> float:
    """What the tracker maximises: sharpness x area (a bigger, sharper face is a better one)."""
    return sharpness(crop) * crop.shape[0] * crop.shape[1]
