"""The hub's files are its own: directories 0700, files 0600, whatever the umask.

The database, the blobs (model weights of every hospital), partial uploads and keys
live under the hub's data directory. Modes are given at creation (``os.mkdir`` and
``os.open`` with the mode; the umask can only take bits away), so no file is ever
readable by others, not even for a moment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from sqlalchemy.engine import make_url

LOGGER = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents with mode 0700; an existing directory is
    left as it is (an operator's mount point), with a warning when others can enter."""
    missing = []
    cursor = path
    while not cursor.exists():
        missing.append(cursor)
        if cursor.parent == cursor:
            break
        cursor = cursor.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            os.mkdir(directory, DIR_MODE)
    return path


def warn_if_shared(path: Path) -> None:
    """Log when a directory the hub did not create is open to group or others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        LOGGER.warning("%s has mode %04o: group or others can read the hub's files; "
                       "chmod 700 it", path, mode)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def open_private(path: Path, flags: int) -> int:
    """``os.open`` with mode 0600 for a file it creates."""
    return os.open(path, flags, FILE_MODE)


def prepare_sqlite_file(url: str) -> None:
    """Create an SQLite database file 0600 before SQLite does (it would use 0644 less
    the umask); its -wal and -shm files take the database file's mode."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return
    database = Path(parsed.database)
    private_dir(database.parent)
    create_private_file(database)
