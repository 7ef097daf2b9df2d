"""Durable writes: a temporary name beside the target, fsync'd, renamed, and the directory
fsync'd, so that a crash at any moment leaves the old file or the new one, never half.

A leaf of the store: instance files and the quarantine both write through it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from dicom_node.errors import StoreError
from dicom_node.store.private import private_dir

__all__ = ["fsync_dir", "place_file", "stage_durable", "write_durable"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place_file(path: Path, data: bytes, root: Path) -> None:
    """Write ``data`` to ``path`` atomically (temp, rename) but *not* durably: the caller
    holds the bytes durably elsewhere (the intake journal) until it syncs them."""
    _makedirs(path.parent, root, durable=False)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _makedirs_durable(path: Path, stop: Path) -> None:
    _makedirs(path, stop, durable=True)


def _makedirs(path: Path, stop: Path, *, durable: bool) -> None:
    """Create ``path`` (0700); with ``durable``, fsync each newly created directory's
    parent."""
    private_dir(path, stop=stop,
                created=(lambda made: fsync_dir(made.parent)) if durable else None)


def write_durable(path: Path, data: bytes, root: Path) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp, fsync, rename, fsync dir)."""
    tmp = stage_durable(path, data, root)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path.name}: {exc.strerror or exc}") from exc


def stage_durable(path: Path, data: bytes, root: Path) -> Path:
    """Write ``data`` fsync'd to a temporary name beside ``path``; returns that name."""
    _makedirs_durable(path.parent, root)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
    return tmp


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
