"""The intake journal: one durable write per acknowledged instance, with group commit.

A received instance is appended to the current segment (its Part 10 bytes and the
index intent, framed with a CRC) and the segment is ``fdatasync``'d before the
instance is acknowledged. Its file and index row are written behind it without an
fsync of their own; a *checkpoint* makes them durable in one batch (every file and
directory written since the last checkpoint fsync'd, the index flushed) and only then
deletes the segments it covers. At start the remaining segments are replayed
idempotently (see :meth:`dicom_node.store.instances.InstanceStore.open_journal`), so a
crash at any moment, a power cut included, loses no acknowledged instance.

Group commit: threads that append while another thread's ``fdatasync`` is running wait
for it and then share the next one, so one fsync acknowledges every instance that was
waiting at that moment, across associations.

One process owns a journal directory at a time (``flock`` on ``LOCK``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.errors import StoreError
from dicom_node.store.durable import fsync_dir
from dicom_node.store.private import private_dir

LOGGER = logging.getLogger(__name__)

MAGIC = b"TSJ1"
_FRAME = struct.Struct("<4sIQI")  # magic, intent length, data length, crc32(intent+data)
SEGMENT_BYTES = 64 * 2**20
CHECKPOINT_S = 10.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """An appended record: its sequence number and the segment that holds it."""

    seq: int
    segment: int


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    fd: int
    size: int = 0
    pending: int = 0                   # appended, not yet reported applied
    written: set[Path] = field(default_factory=set)  # files to fsync at checkpoint


def _segment_name(number: int) -> str:
    return f"{number:012d}.journal"


def frame(intent: bytes, data: bytes) -> bytes:
    """The header of one record (followed by ``intent`` and ``data``)."""
    return _FRAME.pack(MAGIC, len(intent), len(data), zlib.crc32(data, zlib.crc32(intent)))


def read_segment(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """The whole records of one segment, in order; stops at a torn or corrupt tail
    (a record that was never acknowledged: the fdatasync comes after the write)."""
    data = path.read_bytes()
    offset = 0
    while offset + _FRAME.size <= len(data):
        magic, intent_len, data_len, crc = _FRAME.unpack_from(data, offset)
        start = offset + _FRAME.size
        end = start + intent_len + data_len
        if magic != MAGIC or end > len(data):
            break
        body = memoryview(data)[start:end]
        if zlib.crc32(body) != crc:
            break
        yield bytes(body[:intent_len]), bytes(body[intent_len:])
        offset = end
    if offset != len(data):
        LOGGER.warning("intake journal %s: %d bytes of unacknowledged tail ignored",
                       path.name, len(data) - offset)


class IntakeJournal:
    """Append-only segments under ``directory``; see the module docstring."""

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES,
                 checkpoint_s: float = CHECKPOINT_S) -> None:
        self.directory = private_dir(directory)
        self.segment_bytes = segment_bytes
        self.checkpoint_s = checkpoint_s
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise StoreError(f"intake journal {directory} is in use by another process") \
                from exc
        self._cond = threading.Condition()
        self._written = 0
        self._durable = 0
        self._syncing = False
        self._closed = False
        self.leftover = sorted(self.directory.glob("*.journal"))
        last = int(self.leftover[-1].stem) if self.leftover else 0
        self._old: list[_Segment] = []
        self._current = self._open_segment(last + 1)
        self._due = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._sync_index: Callable[[], None] = lambda: None
        self.fsyncs = 0  # journal fdatasyncs, for the benchmark's breakdown
        self.records = 0

    def _open_segment(self, number: int) -> _Segment:
        path = self.directory / _segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fsync_dir(self.directory)
        return _Segment(number, path, fd)

    def start(self, sync_index: Callable[[], None]) -> None:
        """Start the background checkpointer; ``sync_index`` makes the index durable."""
        self._sync_index = sync_index
        self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                              name="intake-checkpoint", daemon=True)
        self._checkpointer.start()

    # -- the acknowledgement path -----------------------------------------------------

    def append(self, intent: bytes, data: bytes) -> Ticket:
        """Write one record (not yet durable: see :meth:`commit`)."""
        head = frame(intent, data)
        with self._cond:
            if self._closed:
                raise StoreError("intake journal closed")
            seg = self._current
            try:
                _write_all(seg.fd, (head, intent, data))
            except OSError as exc:
                raise StoreError(f"cannot append to the intake journal: {exc}") from exc
            seg.size += len(head) + len(intent) + len(data)
            seg.pending += 1
            self._written += 1
            self.records += 1
            if seg.size >= self.segment_bytes:
                self._due.set()
            return Ticket(self._written, seg.number)

    def commit(self, upto: int | None = None) -> None:
        """Return once every record up to ``upto`` (default: all written so far) is
        durable; one ``fdatasync`` serves every thread waiting at that moment."""
        with self._cond:
            target = self._written if upto is None else upto
            while self._durable < target:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                covered, fd = self._written, self._current.fd
                self._cond.release()
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    raise StoreError(f"cannot sync the intake journal: {exc}") from exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                self.fsyncs += 1
                self._durable = max(self._durable, covered)

    def applied(self, ticket: Ticket, written: Path | None) -> None:
        """The record's file and index row are written (or it needed none)."""
        with self._cond:
            seg = self._current if ticket.segment == self._current.number else next(
                (s for s in self._old if s.number == ticket.segment), None)
            if seg is None:
                return
            seg.pending -= 1
            if written is not None:
                seg.written.add(written)
            self._cond.notify_all()

    # -- checkpoints ------------------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        while not self._closed:
            self._due.wait(self.checkpoint_s)
            self._due.clear()
            if self._closed:
                return
            try:
                self.checkpoint()
            except Exception:
                LOGGER.exception("intake journal checkpoint failed; retried later")

    def checkpoint(self, *, timeout_s: float = 60.0) -> int:
        """Make every applied record durable in its final place and drop its segments;
        returns how many segments were dropped."""
        with self._cond:
            if self._current.size == 0 and not self._old:
                return 0
            while self._syncing:
                self._cond.wait()
            if self._current.size:
                # Rotate: the old segment is synced so that its records stay durable.
                old = self._current
                os.fdatasync(old.fd)
                self._durable = self._written
                self._current = self._open_segment(old.number + 1)
                self._old.append(old)
            done = self._cond.wait_for(lambda: all(s.pending <= 0 for s in self._old),
                                       timeout_s)
            if not done:
                LOGGER.warning("intake checkpoint: records still being applied; later")
                return 0
            segments, self._old = self._old, []
        sync_written(set().union(*(s.written for s in segments)))
        self._sync_index()
        for seg in segments:
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
        fsync_dir(self.directory)
        return len(segments)

    def drop_leftover(self) -> None:
        """Delete the segments found at start once they are replayed and synced."""
        for path in self.leftover:
            path.unlink(missing_ok=True)
        self.leftover = []
        fsync_dir(self.directory)

    def close(self) -> None:
        """Final checkpoint, then release the directory."""
        try:
            self.checkpoint()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._due.set()
            if self._current.size == 0:
                os.close(self._current.fd)
                self._current.path.unlink(missing_ok=True)
            else:
                os.close(self._current.fd)
            os.close(self._lock_fd)


def _write_all(fd: int, parts: tuple[bytes, ...]) -> None:
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done == total:
        return
    rest = memoryview(b"".join(parts))[done:]
    while rest:
        rest = rest[os.write(fd, rest):]


def sync_written(paths: set[Path]) -> None:
    """fsync each file, then each directory on the way up to it (once each)."""
    dirs: set[Path] = set()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.update((path.parent, path.parent.parent, path.parent.parent.parent))
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            fsync_dir(d)
        except FileNotFoundError:
            continue
