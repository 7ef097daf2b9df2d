"""Content-addressed blob directory and the staging area for partial uploads."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from federation_grpc.errors import FailedPrecondition
from federation_grpc.hub.private import open_private, private_dir
from federation_grpc.hub.tensorfile import write_tensors

LOGGER = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Blobs stored once under ``<root>/<sha[:2]>/<sha>``; writes are atomic and fsync'd."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(root)

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.exists():
            return sha
        private_dir(target.parent)
        tmp = target.with_name(f".{sha}.{os.getpid()}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return sha

    def scratch_path(self) -> Path:
        """A fresh path inside the store for a file that :meth:`adopt` may take in."""
        return self.root / f".incoming-{uuid.uuid4().hex}.tmp"

    def put_tensors(self, tensors: Mapping[str, np.ndarray]) -> tuple[str, int]:
        """Store ``tensors`` as a safetensors blob, streamed from the arrays; ``(sha, size)``."""
        tmp = self.scratch_path()
        try:
            sha, size = write_tensors(tmp, tensors)
            self.adopt(tmp, sha)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return sha, size

    def put_file(self, source: Path) -> tuple[str, int]:
        """Copy a file into the store in blocks, hashing on the way; ``(sha, size)``."""
        tmp = self.scratch_path()
        digest = hashlib.sha256()
        try:
            fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                while block := src.read(_HASH_CHUNK * 4):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            self.adopt(tmp, digest.hexdigest())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest.hexdigest(), size

    def adopt(self, staged: Path, sha256: str) -> None:
        """Move a verified staged file into the store under its digest."""
        target = self.path(sha256)
        private_dir(target.parent)
        if target.exists():
            staged.unlink(missing_ok=True)
            return
        os.replace(staged, target)
        _fsync_dir(target.parent)

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


class StagingBusy(FailedPrecondition):
    """Another stream is writing this update right now; retry shortly."""


class StagingArea:
    """Partial uploads, one file per update id; the file size is the received offset."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(root)
        # This process's streams, apart from the file lock: where flock is emulated with
        # POSIX locks (NFS), two descriptors of one process do not exclude each other.
        self._open: set[str] = set()
        self._open_lock = threading.Lock()

    def path(self, update_id: str) -> Path:
        return self.root / f"{update_id}.part"

    def size(self, update_id: str) -> int:
        try:
            return self.path(update_id).stat().st_size
        except FileNotFoundError:
            return 0

    def open_at(self, update_id: str, offset: int) -> int:
        """Prepare to append at ``offset`` (truncating bytes beyond it); return the fd.

        The fd holds an exclusive lock on the file until it is closed, so two streams of
        one update (in this process, or in another replica sharing the data folder) never
        write it at once. The lock is on the file, not the name: a file renamed into the
        blob store, or removed, while this call waited is not the one to write.

        Raises
        ------
        StagingBusy
            Another stream holds the file, or it has moved on since the caller looked
            (ask the hub again where the update stands).
        FailedPrecondition
            The file holds fewer than ``offset`` bytes (it changed since they were counted).
        """
        path = self.path(update_id)
        busy = f"update {update_id} is being uploaded already"
        with self._open_lock:
            if update_id in self._open:
                raise StagingBusy(busy)
            self._open.add(update_id)
        try:  # bytes to resume from are never made up: only offset 0 creates the file
            fd = open_private(path, os.O_WRONLY | (os.O_CREAT if offset == 0 else 0))
        except FileNotFoundError as exc:
            self._let_go(update_id)
            raise StagingBusy(busy) from exc
        except BaseException:
            self._let_go(update_id)
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StagingBusy(busy) from exc
            if not self._names(path, fd):
                raise StagingBusy(busy)
            held = os.fstat(fd).st_size
            if held < offset:
                raise FailedPrecondition(
                    f"hub holds {held} bytes of update {update_id}; resume from there"
                )
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            self.close(update_id, fd)
            raise
        return fd

    def close(self, update_id: str, fd: int) -> None:
        """Close a descriptor :meth:`open_at` gave, and with it the stream's lock."""
        try:
            os.close(fd)
        finally:
            self._let_go(update_id)

    def _let_go(self, update_id: str) -> None:
        with self._open_lock:
            self._open.discard(update_id)

    @staticmethod
    def _names(path: Path, fd: int) -> bool:
        """Whether ``path`` still names the file open as ``fd``."""
        try:
            named = os.stat(path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)

    def discard(self, update_id: str) -> None:
        self.path(update_id).unlink(missing_ok=True)
