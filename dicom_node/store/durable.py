"""Atomic file writes, the node's one way to replace a file: the bytes go to a unique
temporary name beside the target, which is then renamed over it, so that no reader ever
sees half a file and two writers never share a temporary.

``durable`` is chosen at every call: with it the file is fsync'd before the rename and
its directory after it (and each directory created on the way), so that once the call
returns the new file survives a power cut, and a crash at any moment leaves the old file
or the new one. Without it a power cut may lose the new file (or leave it empty): for
bytes held durably elsewhere (the intake journal) or cheap to lose.

Two-phase use (:func:`stage_atomic`, then :func:`publish_atomic`) lets a caller make the
bytes durable first and decide later whether they take the target's name.

A leaf of the store: instance files, the quarantine, weights, training samples and the
federation credentials all write through it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from dicom_node.errors import StoreError
from dicom_node.store.private import private_dir

__all__ = ["SHARED_FILE", "WriteFailed", "fsync_dir", "publish_atomic", "stage_atomic",
           "write_all", "write_atomic"]

# As ``open`` creates files: the umask alone decides (a model an operator imports may be
# read by a node running as another user).
SHARED_FILE = 0o666


class WriteFailed(StoreError, OSError):
    """A file could not be written; the message names it. Also an :class:`OSError`, so a
    caller that treats disk trouble as one keeps doing so."""


def write_atomic(path: Path, data: bytes, *, durable: bool, mode: int = 0o640,
                 root: Path | None = None) -> None:
    """Replace ``path`` with ``data`` atomically, and durably if ``durable``.

    ``mode`` is the new file's mode before the umask narrows it. Missing parent
    directories are created 0700, up to ``root``. On failure the old file is untouched
    and no temporary is left.

    Raises
    ------
    WriteFailed
        The file or its directory could not be written; the message names the file.
    """
    staged = stage_atomic(path, data, durable=durable, mode=mode, root=root)
    publish_atomic(staged, path, durable=durable)


def stage_atomic(path: Path, data: bytes, *, durable: bool, mode: int = 0o640,
                 root: Path | None = None) -> Path:
    """Write ``data`` (fsync'd if ``durable``) to a new temporary name beside ``path``;
    returns that name, for :func:`publish_atomic`. Raises :class:`WriteFailed`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        private_dir(path.parent, stop=root,
                    created=(lambda made: fsync_dir(made.parent)) if durable else None)
        # The name is claimed first, with its mode: unique, and never looser than ``mode``
        # even while the bytes go in.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _discard(tmp)
        raise _failed("write", path, exc) from exc
    return tmp


def publish_atomic(staged: Path, path: Path, *, durable: bool) -> None:
    """Rename ``staged`` over ``path`` (then fsync the directory if ``durable``); on
    failure ``staged`` is removed. Raises :class:`WriteFailed`."""
    try:
        os.replace(staged, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        _discard(staged)
        raise _failed("publish", path, exc) from exc


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may take less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # the error that got us here is the one to report
        tmp.unlink(missing_ok=True)


def _failed(what: str, path: Path, exc: OSError) -> WriteFailed:
    error = WriteFailed(f"cannot {what} {path.name}: {exc.strerror or exc}")
    error.errno = exc.errno
    return error
