"""The edge's outbox: a face waits on disk until the cloud says it is stored.

A face is *accepted* once :meth:`Outbox.put` returns. Its message is then a file of its own,
written under a temporary name, fsync'd, renamed into place and the directory fsync'd: a crash
or a power cut at any moment leaves either the whole face or nothing, never half a file.
:meth:`Outbox.ack` deletes it when the writer's acknowledgement arrives (a deletion that a
crash undoes only makes the face go out once more, which S3 absorbs: its key depends on the
message only).

Files are named ``<seq>-<face_id>.face``; ``seq`` grows with every face, so the order of
acceptance survives restarts. Messages are read back from disk when they are republished, so
memory does not grow with the backlog. The outbox is bounded by a number of faces and of bytes;
when it is full the *oldest* faces are dropped to make room (the caller counts them), and faces
older than ``max_age`` are dropped too (the writer would set them aside as ``too_old``).

One process owns an outbox directory at a time (an exclusive ``flock`` on ``.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from facepipe.contract import is_valid_face_id

log = logging.getLogger(__name__)

SUFFIX: Final = ".face"
_NAME_RE: Final = re.compile(r"(\d{20})-([0-9a-f-]{36})\.face")
_TMP_PREFIX: Final = ".tmp-"


class OutboxError(Exception):
    """The outbox cannot be opened (in use by another process, not writable)."""


@dataclass
class Entry:
    """One accepted face. ``seq`` orders the outbox (it only grows); ``accepted_at`` is the wall
    clock when it was written (for expiry; from the file's mtime after a restart);
    ``published_at`` is monotonic (0.0: not published by this process yet)."""

    face_id: str
    seq: int
    size: int
    accepted_at: float
    published_at: float = 0.0
    publishes: int = 0

    @property
    def name(self) -> str:
        return f"{self.seq:020d}-{self.face_id}{SUFFIX}"


class Outbox:
    """A directory of face messages waiting for their acknowledgement; thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        max_faces: int,
        max_bytes: int,
        max_age: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_faces = max_faces
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # by seq: oldest first
        self._bytes = 0
        self._seq = 0
        self._writing: set[str] = set()  # face ids being written by put()
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_file = open(self.path / ".lock", "a")  # noqa: SIM115 - held while open
        except OSError as exc:
            raise OutboxError(f"cannot use {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise OutboxError(f"{self.path} is in use by another process") from None
        self._recover()

    # --- opening -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Load what a previous run left; delete half-written temporary files."""
        found: list[Entry] = []
        for child in self.path.iterdir():
            if child.name.startswith(_TMP_PREFIX):
                child.unlink(missing_ok=True)  # never renamed: never accepted
                continue
            match = _NAME_RE.fullmatch(child.name)
            if match is None or not is_valid_face_id(match.group(2)):
                continue  # .lock, or something that is not ours: left alone
            seq = int(match.group(1))
            try:
                stat = child.stat()
            except FileNotFoundError:
                continue
            accepted = min(stat.st_mtime, time.time())  # a clock that ran ahead is clamped
            found.append(Entry(match.group(2), seq, stat.st_size, accepted_at=accepted))
        for entry in sorted(found, key=lambda e: e.seq):
            self._entries[entry.face_id] = entry
            self._bytes += entry.size
            self._seq = max(self._seq, entry.seq)
        if found:
            log.info(
                "outbox %s: %d face(s), %d bytes left by the previous run",
                self.path,
                len(found),
                self._bytes,
            )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    # --- faces -------------------------------------------------------------------------

    def put(self, face_id: str, payload: bytes) -> list[Entry]:
        """Accept a face durably; return the oldest faces dropped to make room for it.

        The face is written before anything is dropped, so a failing write (a full disk)
        raises OSError and loses nothing that was accepted. Putting a face id that is already
        waiting with the same message changes nothing (a caller that crashed between its put
        and its own bookkeeping may put the same face again); with another message it is a
        ValueError.
        """
        if not is_valid_face_id(face_id):
            raise ValueError(f"not a face id: {face_id!r}")
        if len(payload) > self.max_bytes:
            raise ValueError(f"a face of {len(payload)} bytes never fits in {self.max_bytes}")
        with self._lock:
            existing = self._entries.get(face_id)
            busy = face_id in self._writing
            if existing is None and not busy:
                self._writing.add(face_id)
                self._seq = max(self._seq + 1, time.time_ns())
                entry = Entry(face_id, self._seq, len(payload), accepted_at=time.time())
        if busy:
            raise ValueError(f"face {face_id} is being put by another thread")
        if existing is not None:
            if self.read(existing) not in (payload, None):
                raise ValueError(f"face {face_id} already waits with another message")
            return []
        try:
            self._write(entry.name, payload)
        finally:
            with self._lock:
                self._writing.discard(face_id)
        with self._lock:
            self._entries[face_id] = entry
            self._bytes += entry.size
            dropped: list[Entry] = []
            while len(self._entries) > 1 and (
                len(self._entries) > self.max_faces or self._bytes > self.max_bytes
            ):
                dropped.append(self._remove_oldest())
        return dropped

    def ack(self, face_id: str) -> Entry | None:
        """Forget an acknowledged face (None if it was not waiting)."""
        with self._lock:
            entry = self._entries.pop(face_id, None)
            if entry is None:
                return None
            self._bytes -= entry.size
        (self.path / entry.name).unlink(missing_ok=True)
        return entry

    def expire(self, now: float | None = None) -> list[Entry]:
        """Drop faces accepted longer than ``max_age`` ago; return them."""
        if self.max_age is None:
            return []
        limit = (time.time() if now is None else now) - self.max_age
        with self._lock:  # a full scan: wall-clock times need not follow the outbox's order
            expired = [e for e in self._entries.values() if e.accepted_at < limit]
            for entry in expired:
                del self._entries[entry.face_id]
                self._bytes -= entry.size
        for entry in expired:
            (self.path / entry.name).unlink(missing_ok=True)
        return expired

    def read(self, entry: Entry) -> bytes | None:
        """A waiting face's message; None if it is gone (acknowledged meanwhile)."""
        try:
            return (self.path / entry.name).read_bytes()
        except FileNotFoundError:
            return None

    def entries(self) -> list[Entry]:
        """The waiting faces, oldest first (the entries themselves: callers may update their
        publish bookkeeping)."""
        with self._lock:
            return list(self._entries.values())

    def get(self, face_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(face_id)

    def __contains__(self, face_id: object) -> bool:
        with self._lock:
            return face_id in self._entries

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def size(self) -> int:
        with self._lock:
            return self._bytes

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds the oldest waiting face has waited (0 when empty)."""
        with self._lock:
            if not self._entries:
                return 0.0
            oldest = min(e.accepted_at for e in self._entries.values())
        return max(0.0, (time.time() if now is None else now) - oldest)

    # --- files -------------------------------------------------------------------------

    def _remove_oldest(self) -> Entry:
        """Pop the oldest entry and delete its file (the lock is held)."""
        _, entry = self._entries.popitem(last=False)
        self._bytes -= entry.size
        (self.path / entry.name).unlink(missing_ok=True)
        return entry

    def _write(self, name: str, payload: bytes) -> None:
        tmp = self.path / f"{_TMP_PREFIX}{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
