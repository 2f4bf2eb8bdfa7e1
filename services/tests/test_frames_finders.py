"""Frame sources, detectors and the sample clip, without MQTT."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from facepipe import sampleclip
from facepipe.boxes import Box
from facepipe.config import ConfigError
from facepipe.finders import HaarFinder, YuNetFinder, crop_quality, sharpness
from facepipe.frames import (
    CameraMode,
    ImageFolderSource,
    LiveSource,
    VideoFileSource,
    fourcc,
    open_source,
)


def write_folder(path, n: int, size=(64, 48)) -> None:
    path.mkdir()
    for i in range(n):
        img = np.full((size[1], size[0], 3), i, np.uint8)
        cv2.imwrite(str(path / f"img_{i:03d}.png"), img)


def test_folder_source_is_sorted_and_loops_with_growing_index(tmp_path):
    write_folder(tmp_path / "f", 3)
    (tmp_path / "f" / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path / "f"), realtime=False, loop=True, fps=10)
    assert isinstance(src, ImageFolderSource)
    frames = [src.read() for _ in range(7)]
    assert [f.index for f in frames] == list(range(7))
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 1, 2, 0, 1, 2, 0]
    assert frames[6].source_time == pytest.approx(0.6)
    assert frames[0].captured_at.tzinfo is not None


def test_unreadable_images_are_skipped_and_a_fully_broken_folder_ends(tmp_path):
    write_folder(tmp_path / "f", 2)
    (tmp_path / "f" / "img_001.png").write_bytes(b"broken")
    src = open_source(str(tmp_path / "f"), realtime=False, loop=True)
    assert [f.index for f in (src.read(), src.read(), src.read())] == [0, 2, 4]
    assert src.read_errors == 2
    (tmp_path / "f" / "img_000.png").write_bytes(b"broken")
    assert src.read() is None and src.finished  # looping over nothing readable would spin


def test_folder_source_without_loop_finishes(tmp_path):
    write_folder(tmp_path / "f", 2)
    src = open_source(str(tmp_path / "f"), realtime=False)
    assert len(list(src)) == 2 and src.finished


def test_video_file_source_clock_is_frames_over_fps(sample_clip):
    clip, truth = sample_clip
    src = open_source(str(clip), realtime=False, loop=True)
    assert isinstance(src, VideoFileSource) and not src.live
    assert src.fps == truth["fps"]
    for _ in range(truth["frames"] + 5):  # past the end: looping continues the clock
        frame = src.read()
    assert frame.index == truth["frames"] + 4
    assert frame.source_time == pytest.approx(frame.index / truth["fps"])
    assert frame.image.shape == (truth["height"], truth["width"], 3)
    src.close()


def test_realtime_file_is_paced(sample_clip):
    clip, truth = sample_clip
    src = open_source(str(clip), realtime=True)
    started = time.monotonic()
    for _ in range(11):
        src.read()
    assert time.monotonic() - started >= 10 / truth["fps"] * 0.95
    src.close()


@pytest.mark.parametrize("spec", ["/nonexistent/clip.avi", "/nonexistent/folder/", "ftp://x/y", ""])
def test_bad_sources_are_config_errors(spec):
    with pytest.raises(ConfigError, match="--source / FACEPIPE_SOURCE"):
        open_source(spec)


def test_empty_folder_and_non_video_file_are_config_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "junk.avi").write_bytes(b"not a video")
    with pytest.raises(ConfigError, match=r"junk\.avi"):
        open_source(str(tmp_path / "junk.avi"))


def test_missing_camera_retries_without_crashing():
    src = open_source("/dev/video97")
    assert isinstance(src, LiveSource) and src.live
    started = time.monotonic()
    assert src.read(timeout=1.2) is None  # no frame, no exception
    assert time.monotonic() - started >= 1.0
    assert src._thread.is_alive()
    src.close()
    assert not src._thread.is_alive()


def test_live_source_keeps_only_the_latest_frame(sample_clip, monkeypatch):
    """A grabber faster than its consumer drops frames instead of queueing them."""
    clip, _ = sample_clip
    monkeypatch.setattr(LiveSource, "_open", lambda self: cv2.VideoCapture(str(clip)))
    src = LiveSource("fake", "fake camera")
    first = src.read(timeout=5)
    assert first is not None
    time.sleep(1.0)  # the grabber reads the file much faster than this consumer
    second = src.read(timeout=5)
    src.close()
    assert second.index > first.index + 1
    assert src.dropped > 0
    assert second.source_time > first.source_time


class FakeCamera:
    """A V4L2 capture that records what it was asked and offers 640x480 at 30 fps in YUYV only."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []
        self.props = {
            cv2.CAP_PROP_FRAME_WIDTH: 640.0,
            cv2.CAP_PROP_FRAME_HEIGHT: 480.0,
            cv2.CAP_PROP_FPS: 30.0,
            cv2.CAP_PROP_FOURCC: float(cv2.VideoWriter.fourcc(*"YUYV")),
        }

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, None]:
        return False, None

    def release(self) -> None:
        pass

    def set(self, prop: int, value: float) -> bool:
        self.calls.append((prop, value))
        return True

    def get(self, prop: int) -> float:
        return self.props.get(prop, 0.0)


def test_a_camera_is_asked_for_the_format_first_then_size_and_rate(monkeypatch, caplog):
    """V4L2 offers sizes and rates per pixel format: the format must be set before them, and a
    camera that gives something else is said so, once."""
    fake = FakeCamera()
    monkeypatch.setattr(cv2, "VideoCapture", lambda *args: fake)
    monkeypatch.setattr(LiveSource, "_run", lambda self: None)  # no grabber: _open is called here
    src = LiveSource("/dev/video97", "camera /dev/video97", CameraMode(1280, 720, 15.0, "MJPG"))
    try:
        with caplog.at_level("WARNING", logger="facepipe.frames"):
            src._open()
            src._open()  # a reopen asks again but does not say it again
    finally:
        src._closed.set()
    asked = [prop for prop, _ in fake.calls if prop != cv2.CAP_PROP_BUFFERSIZE]
    assert asked[:4] == [
        cv2.CAP_PROP_FOURCC,
        cv2.CAP_PROP_FRAME_WIDTH,
        cv2.CAP_PROP_FRAME_HEIGHT,
        cv2.CAP_PROP_FPS,
    ]
    assert (cv2.CAP_PROP_FOURCC, float(cv2.VideoWriter.fourcc(*"MJPG"))) in fake.calls
    said = [r.getMessage() for r in caplog.records if "asked for" in r.getMessage()]
    assert said == [
        "camera /dev/video97: asked for 1280x720 15 fps MJPG, the camera gives 640x480 30 fps YUYV "
        "(v4l2-ctl --list-formats-ext lists what it offers)"
    ]


def test_a_camera_without_a_mode_is_asked_for_nothing(monkeypatch):
    fake = FakeCamera()
    monkeypatch.setattr(cv2, "VideoCapture", lambda *args: fake)
    monkeypatch.setattr(LiveSource, "_run", lambda self: None)
    src = open_source("/dev/video97")
    try:
        src._open()
    finally:
        src.close()
    assert [prop for prop, _ in fake.calls] == [cv2.CAP_PROP_BUFFERSIZE] * len(fake.calls)


@pytest.mark.parametrize(
    ("text", "value"),
    [("MJPG", "MJPG"), (" YUYV ", "YUYV"), ("Y16", "Y16 "), ("pBAA", "pBAA"), ("", "")],
)
def test_pixel_formats(text, value):
    assert fourcc(text) == value


@pytest.mark.parametrize("text", ["MJPEG", "MJ/G", "Y 16", "MJPÉ"])
def test_bad_pixel_formats_are_refused(text):
    with pytest.raises(ValueError, match="four-character pixel format"):
        fourcc(text)


@pytest.fixture(scope="module")
def clip_frames(sample_clip):
    clip, truth = sample_clip
    cap = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    assert len(frames) == truth["frames"]
    return frames, truth


def test_haar_detector_on_the_sample_clip(clip_frames):
    """Downscaled detection finds >= 90% of the ground-truth faces and none elsewhere."""
    frames, truth = clip_frames
    cv2.setNumThreads(1)
    detector = HaarFinder()
    assert detector.name == "haar:frontalface_default"
    found = wanted = false_pos = 0
    for i in range(0, len(frames), 3):  # every third frame keeps the test short
        boxes = detector.detect(frames[i])
        gt = [Box(*b) for b in truth["boxes"][i]]
        matched = sum(1 for g in gt if any(g.iou(b) >= 0.3 for b in boxes))
        found += matched
        wanted += len(gt)
        false_pos += sum(1 for b in boxes if all(g.iou(b) < 0.3 for g in gt))
        for b in boxes:
            assert b.x >= 0 and b.y >= 0 and b.x + b.w <= 640 and b.y + b.h <= 480
    assert wanted > 0
    assert found / wanted >= 0.9
    assert false_pos <= 2


def test_custom_cascade_path_and_bad_cascade(tmp_path):
    cascade = tmp_path / "haarcascade_custom.xml"
    cascade.write_bytes(
        (
            __import__("pathlib").Path(cv2.data.haarcascades) / "haarcascade_frontalface_alt2.xml"
        ).read_bytes()
    )
    assert HaarFinder(cascade).name == "haar:custom"
    bad = tmp_path / "bad.xml"
    bad.write_text("<nope/>")
    with pytest.raises(ConfigError, match="--cascade"):
        HaarFinder(bad)


def test_bad_yunet_model_is_a_config_error(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not onnx")
    with pytest.raises(ConfigError, match="--model / FACEPIPE_MODEL"):
        YuNetFinder(model)


def test_sharper_and_bigger_crops_score_higher():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(sharp, (9, 9), 3)
    assert sharpness(sharp) > sharpness(blurred)
    assert crop_quality(np.tile(sharp, (2, 2, 1))) > crop_quality(sharp)


def test_sample_clip_is_deterministic_and_segments_cover_all_frames(tmp_path):
    a = sampleclip.write_clip(tmp_path / "a.avi", speed=0.2)
    b = sampleclip.write_clip(tmp_path / "b.avi", speed=0.2)
    assert a == b
    truth = json.loads((tmp_path / "a.json").read_text())
    segs = truth["segments"]
    assert segs[0]["start"] == 0 and segs[-1]["end"] == truth["frames"]
    assert all(x["end"] == y["start"] for x, y in itertools.pairwise(segs))
    assert {s["faces"] for s in segs} == {0, 1, 2}
    assert len(truth["boxes"]) == truth["frames"]
    assert all(len(truth["boxes"][i]) == a.faces_in(i) for i in range(truth["frames"]))


def test_sample_clip_cli_images_folder(tmp_path):
    out = tmp_path / "frames"
    proc = subprocess.run(
        [sys.executable, "-m", "facepipe.sampleclip", str(out), "--images", "--speed", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    truth = sampleclip.load_truth(out / "truth.json")
    assert len(list(out.glob("frame_*.jpg"))) == truth.frames
    src = open_source(str(out), realtime=False)
    assert len(list(src)) == truth.frames  # truth.json is skipped by the folder source


def test_sample_clip_without_scikit_image_exits_2(tmp_path):
    code = (
        "import sys; sys.modules['skimage'] = None\n"
        "from facepipe import sampleclip\n"
        f"sys.exit(sampleclip.main([{str(tmp_path / 'x.avi')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "scikit-image" in proc.stderr and "Traceback" not in proc.stderr
