"""Write a deterministic sample clip with real faces, plus its ground truth.

The clip is the lab's and the tests' "camera": it alternates segments without faces (plain
photographs used as backgrounds) and segments where the astronaut portrait shipped in
scikit-image moves and scales slightly over a background (one segment shows two faces: the
portrait and its mirror image).

Ground truth JSON (``<clip without suffix>.json`` unless ``--truth`` says otherwise)::

    {"fps": 20.0, "frames": 300, "width": 640, "height": 480, "seed": 7,
     "segments": [{"start": 0, "end": 40, "faces": 0}, ...],
     "boxes": [[[x, y, w, h], ...], ...]}

``segments`` covers every frame exactly once; ``start`` is inclusive, ``end`` is exclusive
(Python range semantics), ``faces`` is the number of faces visible in every frame of the
segment. ``boxes[i]`` lists the face boxes (source pixels) visible in frame ``i``.

scikit-image is only needed here (an extra of the package, installed on the controller): the
tool exits with status 2 and a clear message when it is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# Head crop of skimage.data.astronaut() (x0, y0, x1, y1) and the face inside that crop.
_HEAD_CROP = (130, 5, 320, 230)
_FACE_IN_CROP = (47, 61, 95, 95)


@dataclass(frozen=True)
class Segment:
    start: int  # inclusive
    end: int  # exclusive
    faces: int


@dataclass
class GroundTruth:
    fps: float
    frames: int
    width: int
    height: int
    seed: int
    segments: list[Segment] = field(default_factory=list)
    boxes: list[list[list[int]]] = field(default_factory=list)

    def faces_in(self, frame: int) -> int:
        for seg in self.segments:
            if seg.start <= frame < seg.end:
                return seg.faces
        return 0

    def face_frames(self) -> list[int]:
        return [i for i in range(self.frames) if self.faces_in(i) > 0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroundTruth:
        return cls(
            fps=float(data["fps"]),
            frames=int(data["frames"]),
            width=int(data["width"]),
            height=int(data["height"]),
            seed=int(data.get("seed", 0)),
            segments=[Segment(**s) for s in data["segments"]],
            boxes=data.get("boxes", []),
        )


def load_truth(path: str | Path) -> GroundTruth:
    return GroundTruth.from_dict(json.loads(Path(path).read_text()))


class MissingDependencyError(RuntimeError):
    pass


def _skimage_data() -> Any:
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "facepipe-sample-clip needs scikit-image (pip install 'facepipe[sample]')"
        ) from exc
    return data


def _rgb_to_bgr(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR)


def _cover(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale and centre-crop an image so it covers width x height."""
    h, w = img.shape[:2]
    scale = max(width / w, height / h)
    resized = cv2.resize(img, (max(width, round(w * scale)), max(height, round(h * scale))))
    rh, rw = resized.shape[:2]
    y0, x0 = (rh - height) // 2, (rw - width) // 2
    return np.ascontiguousarray(resized[y0 : y0 + height, x0 : x0 + width])


def _soft_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 2 - 2, h // 2 - 2), 0, 0, 360, 1.0, -1)
    k = max(3, (min(h, w) // 12) | 1)
    return cv2.GaussianBlur(mask, (k, k), 0)[..., None]


def _paste(frame: np.ndarray, head: np.ndarray, cx: float, cy: float, scale: float) -> list[int]:
    """Blend the head crop centred at (cx, cy) with the given scale; return the face box."""
    hh, hw = head.shape[:2]
    w, h = max(8, round(hw * scale)), max(8, round(hh * scale))
    patch = cv2.resize(head, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    mask = _soft_mask(h, w)
    x0, y0 = round(cx - w / 2), round(cy - h / 2)
    fh, fw = frame.shape[:2]
    x0 = min(max(0, x0), fw - w)
    y0 = min(max(0, y0), fh - h)
    roi = frame[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    frame[y0 : y0 + h, x0 : x0 + w] = (patch * mask + roi * (1.0 - mask)).astype(np.uint8)
    fx, fy, fw_, fh_ = _FACE_IN_CROP
    return [x0 + round(fx * scale), y0 + round(fy * scale), round(fw_ * scale), round(fh_ * scale)]


# (background name, seconds, number of faces). Backgrounds chosen so the Haar cascade finds no
# face in them even with the added sensor noise (coffee, gravel, grass and coins do trigger it).
# Face segments reuse the background of the segment before, so a detector cannot key on it.
_LAYOUT: tuple[tuple[str, float, int], ...] = (
    ("rocket", 2.0, 0),
    ("rocket", 4.0, 1),
    ("brick", 2.0, 0),
    ("retina", 1.0, 0),
    ("retina", 4.0, 2),
    ("page", 2.0, 0),
)


def generate(
    fps: float = 20.0,
    width: int = 640,
    height: int = 480,
    seed: int = 7,
    speed: float = 1.0,
) -> tuple[GroundTruth, Iterator[np.ndarray]]:
    """Return the ground truth and an iterator over the BGR frames (deterministic per seed).

    ``speed`` stretches every segment (2.0 = twice as long).
    """
    data = _skimage_data()
    rng = np.random.default_rng(seed)
    astro = _rgb_to_bgr(data.astronaut())
    x0, y0, x1, y1 = _HEAD_CROP
    head = np.ascontiguousarray(astro[y0:y1, x0:x1])
    head_mirror = np.ascontiguousarray(head[:, ::-1])
    # The mirrored face box stays at the same place because the crop is nearly symmetric.
    backgrounds: dict[str, np.ndarray] = {}
    truth = GroundTruth(fps=fps, frames=0, width=width, height=height, seed=seed)
    plan: list[tuple[np.ndarray, int, int, int]] = []
    start = 0
    for name, seconds, faces in _LAYOUT:
        if name not in backgrounds:
            backgrounds[name] = _cover(_rgb_to_bgr(getattr(data, name)()), width, height)
        n = max(1, round(seconds * fps * speed))
        truth.segments.append(Segment(start, start + n, faces))
        plan.append((backgrounds[name], start, n, faces))
        start += n
    truth.frames = start
    # Smooth, seeded motion parameters per segment.
    motions = [rng.uniform(0.0, 2 * np.pi, size=4) for _ in plan]
    noise_seed = int(rng.integers(0, 2**31))
    base = min(width, height) / 480.0

    def boxes_and_frames() -> Iterator[np.ndarray]:
        noise_rng = np.random.default_rng(noise_seed)
        for (bg, seg_start, n, faces), phase in zip(plan, motions, strict=True):
            for k in range(n):
                frame = bg.copy()
                t = k / fps
                boxes: list[list[int]] = []
                for j in range(faces):
                    slot = (j + 1) / (faces + 1)
                    cx = width * slot + 40 * base * np.sin(0.9 * t + phase[0] + j)
                    cy = height * 0.5 + 25 * base * np.sin(0.7 * t + phase[1] + j)
                    scale = base * (1.05 + 0.15 * np.sin(0.5 * t + phase[2] + j))
                    if faces > 1:
                        scale *= 0.85
                    boxes.append(_paste(frame, head if j % 2 == 0 else head_mirror, cx, cy, scale))
                noise = noise_rng.normal(0.0, 3.0, size=(height, width, 1)).astype(np.float32)
                frame = np.clip(frame.astype(np.float32) + noise, 0, 255).astype(np.uint8)
                truth.boxes.append(boxes)
                assert len(truth.boxes) == seg_start + k + 1
                yield frame

    return truth, boxes_and_frames()


def write_clip(
    path: str | Path,
    truth_path: str | Path | None = None,
    *,
    fps: float = 20.0,
    width: int = 640,
    height: int = 480,
    seed: int = 7,
    speed: float = 1.0,
    images: bool = False,
    progress: Callable[[int], None] | None = None,
) -> GroundTruth:
    """Write the clip (MJPG .avi, or mp4v for .mp4) or a folder of JPEG images.

    Returns the ground truth, also written to ``truth_path`` (default: ``<stem>.json`` for a
    clip, ``<folder>/truth.json`` for images; the image loader skips non-image files).
    """
    out = Path(path)
    truth, frames = generate(fps=fps, width=width, height=height, seed=seed, speed=speed)
    if images:
        out.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            if not cv2.imwrite(
                str(out / f"frame_{i:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 92]
            ):
                raise OSError(f"cannot write image in {out}")
            if progress:
                progress(i)
        tpath = Path(truth_path) if truth_path else out / "truth.json"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        fourcc = "mp4v" if out.suffix.lower() in {".mp4", ".m4v", ".mov"} else "MJPG"
        code = cv2.VideoWriter_fourcc(*fourcc)  # type: ignore[attr-defined]
        writer = cv2.VideoWriter(str(out), code, fps, (width, height))
        if not writer.isOpened():
            raise OSError(f"cannot open a {fourcc} video writer for {out}")
        writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 85)
        try:
            for i, frame in enumerate(frames):
                writer.write(frame)
                if progress:
                    progress(i)
        finally:
            writer.release()
        tpath = Path(truth_path) if truth_path else out.with_suffix(".json")
    tpath.write_text(truth.to_json())
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facepipe-sample-clip",
        description="Write a sample clip with faces (from scikit-image photos) and its ground "
        "truth JSON (segments: start inclusive, end exclusive, faces per frame).",
    )
    parser.add_argument(
        "output", help="clip path (.avi = MJPG, .mp4 = mp4v) or folder with --images"
    )
    parser.add_argument(
        "--truth", help="ground truth JSON path (default: output with .json suffix)"
    )
    parser.add_argument("--images", action="store_true", help="write a folder of JPEG frames")
    parser.add_argument("--fps", type=float, default=20.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--speed", type=float, default=1.0, help="segment length multiplier")
    args = parser.parse_args(argv)
    if args.fps <= 0 or args.width < 160 or args.height < 120 or args.speed <= 0:
        print(
            "facepipe-sample-clip: need fps > 0, width >= 160, height >= 120, speed > 0",
            file=sys.stderr,
        )
        return 2
    try:
        truth = write_clip(
            args.output,
            args.truth,
            fps=args.fps,
            width=args.width,
            height=args.height,
            seed=args.seed,
            speed=args.speed,
            images=args.images,
        )
    except MissingDependencyError as exc:
        print(f"facepipe-sample-clip: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"facepipe-sample-clip: {exc}", file=sys.stderr)
        return 1
    with_faces = sum(s.end - s.start for s in truth.segments if s.faces)
    print(
        f"wrote {args.output}: {truth.frames} frames at {truth.fps:g} fps, "
        f"{with_faces} with faces, {truth.width}x{truth.height}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
