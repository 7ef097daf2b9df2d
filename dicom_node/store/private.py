"""Directories 0700 and secret files 0600, whatever the process umask.

The node's data directory holds patient images, the index and the federation
credentials: with a umask of 000 (some container runtimes, some service managers)
``mkdir`` and SQLite would make them readable by every local user. Everything the
node creates goes through these two functions instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path, *, stop: Path | None = None,
                created: Callable[[Path], None] | None = None) -> Path:
    """Create ``path`` and its missing parents (up to ``stop``) with mode 0700; returns
    ``path``. ``created`` is called with each directory made, parents first (the durable
    writer fsyncs each one's parent there).

    Directories that already exist keep their mode (an operator may have chosen it).
    """
    missing: list[Path] = []
    p = Path(path)
    while not p.exists() and p != stop and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode is masked by the umask; chmod is not
        if created is not None:
            created(d)
    return Path(path)


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists with mode 0600 (created empty when missing, tightened
    when it is ours and looser); returns ``path``."""
    private_dir(Path(path).parent)
    # Never open an existing file: closing any descriptor of a SQLite database drops
    # every POSIX lock this process holds on it (a running node's, in tests).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    with contextlib.suppress(PermissionError):  # someone else's file: leave it
        os.chmod(path, PRIVATE_FILE)
    return Path(path)
