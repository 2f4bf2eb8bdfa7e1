"""Frame sources for ``FACEPIPE_SOURCE``: camera, video file, RTSP/HTTP URL, image folder.

Every source hands out :class:`Frame` tuples ``(index, source_time, captured_at, image)``:
``index`` is the 0-based frame number in the source, ``source_time`` the source's own clock in
seconds (index / fps for files and folders, monotonic seconds since start for live sources),
``captured_at`` the wall-clock UTC time the frame was read, ``image`` a BGR ndarray.

- Files and folders are read on demand. With ``realtime`` they are paced at their frame rate
  like a camera (never dropping: a slow consumer just plays them slower); without it, as fast
  as the consumer takes them. ``loop`` restarts them; index and source time keep increasing.
- Live sources (V4L2 device or index, URL) are read by a grabber thread that keeps only the
  latest frame: when the consumer is behind, older frames are dropped and counted, so memory
  never grows. A source that fails to open or fails reads for 2 s is reopened with capped
  exponential backoff, forever, logging once per state change.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from facepipe.config import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"}
)
DEFAULT_FPS = 10.0  # for folders and files that do not state a frame rate
REOPEN_MIN_DELAY = 0.5
REOPEN_MAX_DELAY = 30.0
FAIL_SECONDS = 2.0  # a live source failing reads this long is reopened
OPTION = "--source / FACEPIPE_SOURCE"


@dataclass(frozen=True, slots=True)
class CameraMode:
    """What to ask a V4L2 camera for; 0 / "" leave the camera's own default. Streams and files
    ignore it (their sender decides)."""

    width: int = 0
    height: int = 0
    fps: float = 0.0
    fourcc: str = ""  # pixel format, e.g. MJPG (most USB cameras need it above 640x480) or YUYV

    def __bool__(self) -> bool:
        return bool(self.width or self.height or self.fps or self.fourcc)

    def describe(self) -> str:
        size = f"{self.width or '?'}x{self.height or '?'}" if self.width or self.height else ""
        rate = f"{self.fps:g} fps" if self.fps else ""
        return " ".join(part for part in (size, rate, self.fourcc.strip()) if part)


def fourcc(text: str) -> str:
    """A V4L2 pixel format as V4L2 names it: up to four letters or digits, case as given
    (``MJPG``, ``YUYV``, ``pBAA``), padded with blanks to four (``Y16`` is ``"Y16 "``); "" = the
    camera's own."""
    value = text.strip()
    if not value:
        return ""
    if len(value) > 4 or not value.isascii() or not value.isalnum():
        raise ValueError(
            f"expected a four-character pixel format such as MJPG or YUYV, got {text!r}"
        )
    return value.ljust(4)


def _fourcc_name(code: float) -> str:
    number = int(code)
    return "".join(chr((number >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00 ")


@dataclass(frozen=True, slots=True)
class Frame:
    index: int
    source_time: float
    captured_at: datetime
    image: np.ndarray


class FrameSource:
    """Common interface. ``read`` returns None when no frame is ready within ``timeout``
    (live source reconnecting) or when the source is finished (check ``finished``)."""

    live = False
    description = ""
    # A live source whose last attempt failed (cannot be opened, stopped delivering frames).
    failing = False

    def __init__(self) -> None:
        self.dropped = 0  # frames skipped because the consumer was behind (live only)
        self.read_errors = 0  # unreadable images, failed reads
        self.finished = False
        self.fps = DEFAULT_FPS
        self._closed = threading.Event()

    def read(self, timeout: float = 0.5) -> Frame | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()

    def __iter__(self) -> Iterator[Frame]:
        while not self.finished and not self._closed.is_set():
            frame = self.read()
            if frame is not None:
                yield frame

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _valid_fps(value: float) -> bool:
    return math.isfinite(value) and 0.5 <= value <= 1000


class _Paced(FrameSource):
    """Pacing and clocks shared by files and folders."""

    def __init__(self, realtime: bool, loop: bool) -> None:
        super().__init__()
        self.realtime = realtime
        self.loop = loop
        self._index = 0
        self._pace_start: float | None = None
        self._paced = 0

    def _pace(self) -> None:
        if not self.realtime:
            return
        now = time.monotonic()
        if self._pace_start is None:
            self._pace_start = now
        due = self._pace_start + self._paced / self.fps
        if now - due > 1.0:  # far behind (slow consumer): rebase instead of bursting
            self._pace_start = now - self._paced / self.fps
        elif due > now:
            self._closed.wait(due - now)
        self._paced += 1

    def _emit(self, image: np.ndarray) -> Frame:
        frame = Frame(self._index, self._index / self.fps, datetime.now(UTC), image)
        self._index += 1
        return frame


class VideoFileSource(_Paced):
    def __init__(self, path: Path, *, realtime: bool, loop: bool, fps: float = 0.0) -> None:
        super().__init__(realtime, loop)
        self.path = path
        self.description = f"file {path}"
        self._cap = cv2.VideoCapture(str(path))
        if not self._cap.isOpened():
            raise ConfigError(f"{OPTION}: {path} cannot be opened as a video")
        own = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if fps > 0 else (own if _valid_fps(own) else DEFAULT_FPS)
        ok, image = self._cap.read()
        if not ok:
            raise ConfigError(f"{OPTION}: {path} has no readable frame")
        self._pending: np.ndarray | None = image

    def read(self, timeout: float = 0.5) -> Frame | None:
        if self.finished or self._closed.is_set():
            return None
        image = self._pending
        self._pending = None
        if image is None:
            ok, image = self._cap.read()
            if not ok and self.loop:
                self._cap.release()
                self._cap = cv2.VideoCapture(str(self.path))
                ok, image = self._cap.read()
            if not ok:
                self.finished = True
                self._cap.release()
                return None
        self._pace()
        return self._emit(image)

    def close(self) -> None:
        super().close()
        self._cap.release()


class ImageFolderSource(_Paced):
    def __init__(self, path: Path, *, realtime: bool, loop: bool, fps: float = 0.0) -> None:
        super().__init__(realtime, loop)
        self.description = f"folder {path}"
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"{OPTION}: folder {path} holds no images")
        self.fps = fps if fps > 0 else DEFAULT_FPS
        self._pos = 0
        self._failed_in_row = 0

    def read(self, timeout: float = 0.5) -> Frame | None:
        while not self.finished and not self._closed.is_set():
            if self._pos >= len(self.files):
                if not self.loop:
                    self.finished = True
                    return None
                self._pos = 0
            path = self.files[self._pos]
            self._pos += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                # Counted as a frame of the source all the same, so indexes match file order.
                self.read_errors += 1
                self._index += 1
                self._failed_in_row += 1
                log.warning("cannot read image %s; skipped", path)
                if self._failed_in_row >= len(self.files):  # a whole pass: nothing readable
                    log.error("no image in %s is readable; stopping", self.description)
                    self.finished = True
                continue
            self._failed_in_row = 0
            self._pace()
            return self._emit(image)
        return None


class LiveSource(FrameSource):
    """A camera or stream read by a grabber thread that keeps only the latest frame."""

    live = True

    def __init__(self, target: int | str, description: str, mode: CameraMode | None = None) -> None:
        super().__init__()
        self.target = target
        self.description = description
        self.mode = mode or CameraMode()
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._start = time.monotonic()
        self._index = 0
        self._state = ""
        self.opened = threading.Event()  # set while the source delivers frames
        # True from a failed attempt until frames come again; False during the first attempt.
        self.failing = False
        self._thread = threading.Thread(target=self._run, name="grabber", daemon=True)
        self._thread.start()

    def _open(self) -> cv2.VideoCapture:
        if isinstance(self.target, int) or self.target.startswith("/dev/"):
            api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            cap = cv2.VideoCapture(self.target, api)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if cap.isOpened() and self.mode:
                self._apply_mode(cap)
            return cap
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 10000]
        return cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)

    def _apply_mode(self, cap: cv2.VideoCapture) -> None:
        """Ask for the configured mode (pixel format first: V4L2 picks the sizes and rates a
        format offers) and say once when the camera gives something else."""
        mode = self.mode
        if mode.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*mode.fourcc))
        if mode.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, mode.width)
        if mode.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, mode.height)
        if mode.fps:
            cap.set(cv2.CAP_PROP_FPS, mode.fps)
        got = CameraMode(
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) if mode.width else 0,
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) if mode.height else 0,
            float(cap.get(cv2.CAP_PROP_FPS)) if mode.fps else 0.0,
            _fourcc_name(cap.get(cv2.CAP_PROP_FOURCC)) if mode.fourcc else "",
        )
        if (got.width, got.height, got.fourcc) != (
            mode.width,
            mode.height,
            mode.fourcc.strip(),
        ) or (mode.fps and abs(got.fps - mode.fps) > 0.5):
            self._set_state(
                f"asked for {mode.describe()}, the camera gives {got.describe()} "
                "(v4l2-ctl --list-formats-ext lists what it offers)"
            )

    def _set_state(self, state: str, level: int = logging.WARNING) -> None:
        if state != self._state:  # once per state change, not once per retry
            self._state = state
            log.log(level, "%s: %s", self.description, state)

    def _run(self) -> None:
        failures = 0
        while not self._closed.is_set():
            cap = self._open()
            if not cap.isOpened():
                cap.release()
                self.failing = True
                self._set_state("cannot be opened; retrying with backoff")
            else:
                own = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
                if _valid_fps(own):
                    self.fps = own
                if self._grab_until_failure(cap):
                    failures = 0
                cap.release()
                self.opened.clear()
            if self._closed.is_set():
                break
            delay = min(REOPEN_MAX_DELAY, REOPEN_MIN_DELAY * 2**failures)
            failures = min(failures + 1, 16)
            self._closed.wait(delay)

    def _grab_until_failure(self, cap: cv2.VideoCapture) -> bool:
        """Read until the source fails; True if it delivered at least one frame."""
        delivered = False
        last_ok = time.monotonic()
        while not self._closed.is_set():
            ok, image = cap.read()
            now = time.monotonic()
            if not ok or image is None:
                self.read_errors += 1
                if now - last_ok > FAIL_SECONDS or not delivered:
                    self.failing = True
                    self._set_state("stopped delivering frames; reopening with backoff")
                    return delivered
                time.sleep(0.05)
                continue
            last_ok = now
            if not delivered:
                delivered = True
                self.opened.set()
                self.failing = False
                self._set_state(
                    f"delivering frames ({image.shape[1]}x{image.shape[0]})", logging.INFO
                )
            frame = Frame(self._index, now - self._start, datetime.now(UTC), image)
            self._index += 1
            with self._cond:
                if self._latest is not None:
                    self.dropped += 1  # the consumer did not take the previous one
                self._latest = frame
                self._cond.notify()
        return delivered

    def read(self, timeout: float = 0.5) -> Frame | None:
        with self._cond:
            if self._latest is None:
                self._cond.wait(timeout)
            frame, self._latest = self._latest, None
        return frame

    def close(self) -> None:
        super().close()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=15)


def is_camera(spec: str) -> bool:
    """A V4L2 camera: a device index or any path under /dev (the face_detector role gives such a
    source the video devices and group; tests/test_config.py proves the role agrees)."""
    text = spec.strip()
    return text.isdigit() or text.startswith("/dev/")


def open_source(
    spec: str,
    *,
    realtime: bool = True,
    loop: bool = False,
    fps: float = 0.0,
    camera: CameraMode | None = None,
) -> FrameSource:
    """Open ``FACEPIPE_SOURCE``: an integer or /dev/video* is a camera (asked for ``camera``'s
    mode), ``scheme://`` a stream, a folder a sequence of images (sorted by name), anything else a
    video file."""
    text = spec.strip()
    if not text:
        raise ConfigError(f"{OPTION}: must not be empty")
    if text.isdigit():
        return LiveSource(int(text), f"camera {text}", camera)
    if is_camera(text):
        # /dev/v4l/by-id/... and by-path/... are udev's stable names for /dev/videoN (whose numbers
        # move between boots); V4L2 opens the device node, so resolve the link once, here.
        return LiveSource(os.path.realpath(text), f"camera {text}", camera)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in {"rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt"}:
            raise ConfigError(f"{OPTION}: unsupported URL scheme {scheme!r}")
        return LiveSource(text, f"stream {redact_url(text)}")
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, realtime=realtime, loop=loop, fps=fps)
    if path.is_file():
        return VideoFileSource(path, realtime=realtime, loop=loop, fps=fps)
    raise ConfigError(f"{OPTION}: no such file or folder: {path}")


def redact_url(url: str) -> str:
    """A URL as logs may show it: ``scheme://***@host/path?***``.

    Everything up to the last ``@`` is credentials (a password may hold ``@``, ``:`` or ``/``;
    an ``@`` in the path hides some of the path too, never some of a password), a query string
    is hidden whole (cameras take ``?user=...&pwd=...``; fragments go with it), and so is a
    path holding ``=`` (XMEye and Dahua cameras take ``/user=admin&password=...``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    _, at, hostpart = rest.rpartition("@")
    shown = f"***@{hostpart}" if at else rest
    for mark in ("?", "#"):
        if mark in shown:
            shown = shown.split(mark, 1)[0] + mark + "***"
    host, _, path = shown.partition("/")
    if "=" in path.split("?", 1)[0].split("#", 1)[0]:
        shown = f"{host}/***"
    return f"{scheme}://{shown}"
