"""Axis-aligned boxes in source pixels: intersection over union, margins, clamping."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """``[x, y, w, h]`` in source pixels; ``score`` is the detector's confidence (1.0 if none)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def area(self) -> int:
        return max(0, self.w) * max(0, self.h)

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)

    def iou(self, other: Box) -> float:
        ix = max(0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def scaled(self, factor: float) -> Box:
        """Map a box found on a resized image (``factor`` = source / resized) back to source."""
        return Box(
            round(self.x * factor),
            round(self.y * factor),
            round(self.w * factor),
            round(self.h * factor),
            self.score,
        )

    def clamped(self, width: int, height: int) -> Box | None:
        """The part of the box inside a ``width`` x ``height`` frame, or None if nothing is."""
        x0, y0 = max(0, self.x), max(0, self.y)
        x1, y1 = min(width, self.x + self.w), min(height, self.y + self.h)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1 - x0, y1 - y0, self.score)

    def with_margin(self, margin: float, width: int, height: int) -> Box | None:
        """Grow by ``margin`` x size on every side, then clamp to the frame."""
        dx, dy = round(self.w * margin), round(self.h * margin)
        grown = Box(self.x - dx, self.y - dy, self.w + 2 * dx, self.h + 2 * dy, self.score)
        return grown.clamped(width, height)
