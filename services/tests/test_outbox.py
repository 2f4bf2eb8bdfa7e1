"""The outbox: what put() accepted survives a crash whole; bounded; one owner at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from writer_helpers import make_face

from facepipe import contract
from facepipe.outbox import Outbox, OutboxError

MIB = 1024 * 1024


def face(i: int = 0) -> tuple[str, bytes]:
    meta, payload = make_face("cam-1", i)
    return meta.face_id, payload


def test_put_ack_and_reopen_keep_order_and_content(tmp_path):
    box = Outbox(tmp_path / "o", max_faces=100, max_bytes=MIB)
    faces = [face(i) for i in range(5)]
    for face_id, payload in faces:
        assert box.put(face_id, payload) == []
    assert box.ack(faces[1][0]).face_id == faces[1][0]
    assert box.ack(faces[1][0]) is None  # a second ack changes nothing
    box.put(*faces[0])  # the same face again: changes nothing
    with pytest.raises(ValueError, match="another message"):
        box.put(faces[0][0], b"\xff\xd8 another payload")
    box.close()
    again = Outbox(tmp_path / "o", max_faces=100, max_bytes=MIB)
    entries = again.entries()
    assert [e.face_id for e in entries] == [f for i, (f, _) in enumerate(faces) if i != 1]
    assert [again.read(e) for e in entries] == [p for i, (_, p) in enumerate(faces) if i != 1]
    assert again.size == sum(len(p) for i, (_, p) in enumerate(faces) if i != 1)


def test_one_owner_at_a_time(tmp_path):
    box = Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB)
    with pytest.raises(OutboxError, match="in use"):
        Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB)
    box.close()
    Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB).close()


def test_full_drops_the_oldest_by_count_and_by_bytes(tmp_path):
    box = Outbox(tmp_path / "o", max_faces=3, max_bytes=MIB)
    faces = [face(i) for i in range(5)]
    dropped = [d.face_id for f, p in faces for d in box.put(f, p)]
    assert dropped == [faces[0][0], faces[1][0]]
    assert [e.face_id for e in box.entries()] == [f for f, _ in faces[2:]]
    small = Outbox(tmp_path / "s", max_faces=100, max_bytes=3 * len(faces[0][1]))
    for f, p in faces:
        small.put(f, p)
    assert small.size <= small.max_bytes and small.depth <= 3
    with pytest.raises(ValueError):
        small.put(str(uuid.uuid4()), b"x" * (small.max_bytes + 1))
    assert len(list((tmp_path / "o").glob("*.face"))) == 3


def test_old_faces_expire(tmp_path):
    box = Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB, max_age=3600)
    f, p = face()
    box.put(f, p)
    assert box.expire() == []
    assert [e.face_id for e in box.expire(now=box.entries()[0].accepted_at + 3601)] == [f]
    assert box.depth == 0 and not list((tmp_path / "o").glob("*.face"))


def test_half_written_files_are_never_taken_for_faces(tmp_path):
    box = Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB)
    box.put(*face())
    box.close()
    (tmp_path / "o" / ".tmp-00000000000000000001-x.face").write_bytes(b"\xff\xd8 half")
    (tmp_path / "o" / "notes.txt").write_text("not ours")
    again = Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB)
    assert again.depth == 1
    assert not list((tmp_path / "o").glob(".tmp-*"))
    assert (tmp_path / "o" / "notes.txt").exists()


CHILD = textwrap.dedent(
    """
    import sys, uuid
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from writer_helpers import make_face
    from facepipe.outbox import Outbox
    box = Outbox(Path(sys.argv[1]), max_faces=100000, max_bytes=1 << 34)
    i = 0
    while True:
        meta, payload = make_face("cam-1", i)
        box.put(meta.face_id, payload)
        print(meta.face_id, flush=True)  # accepted
        i += 1
    """
)


@pytest.mark.parametrize("after", [5, 37, 120])
def test_sigkill_at_any_moment_keeps_every_accepted_face_whole(tmp_path, after):
    """A process killed mid-put: every face put() returned for is there, every file whole."""
    path = tmp_path / "o"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    accepted = [child.stdout.readline().strip() for _ in range(after)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    accepted += [line.strip() for line in child.stdout if line.strip()]
    box = Outbox(path, max_faces=100000, max_bytes=1 << 34)
    stored = {e.face_id: box.read(e) for e in box.entries()}
    assert set(accepted) <= set(stored)
    assert len(stored) - len(accepted) <= 1  # at most the face being put when killed
    for face_id, payload in stored.items():
        assert payload is not None
        meta, _ = contract.decode_face(payload)
        assert meta.face_id == face_id


def test_a_failing_write_loses_nothing_already_accepted(tmp_path, monkeypatch):
    """A full disk while the outbox is full: the new face is refused (OSError), the oldest
    are not dropped for it, and no temporary file is left behind."""
    box = Outbox(tmp_path / "o", max_faces=2, max_bytes=MIB)
    kept = [face(i) for i in range(2)]
    for f, p in kept:
        box.put(f, p)

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("facepipe.outbox.os.write", full)
    with pytest.raises(OSError):
        box.put(*face(2))
    monkeypatch.undo()
    assert [e.face_id for e in box.entries()] == [f for f, _ in kept]
    assert not list((tmp_path / "o").glob(".tmp-*"))
    assert len(list((tmp_path / "o").glob("*.face"))) == 2


def test_expiry_survives_a_clock_that_jumped(tmp_path, monkeypatch):
    """A face accepted while the clock read 2099 must not shield later ones from expiry."""
    box = Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB, max_age=3600)
    real = time.time
    monkeypatch.setattr("facepipe.outbox.time.time", lambda: real() + 70 * 365 * 86400)
    box.put(*face(0))
    monkeypatch.setattr("facepipe.outbox.time.time", real)
    box.put(*face(1))
    box.close()
    again = Outbox(tmp_path / "o", max_faces=10, max_bytes=MIB, max_age=3600)
    assert again.oldest_age() < 60  # the future mtime is clamped to now
    expired = again.expire(now=real() + 7200)
    assert len(expired) == 2 and again.depth == 0
