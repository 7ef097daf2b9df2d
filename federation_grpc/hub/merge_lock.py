"""One merger at a time across hub replicas that share a database.

Merging reads the current generation and the pending updates, then writes a new
generation numbered max+1 in later transactions, so two replicas merging at once
could build on the same parent or take the same number. PostgreSQL: a session-level
advisory lock held on a dedicated connection for the whole merge pass. SQLite (hubs
on one host sharing ``data_dir``): an ``flock`` on ``data_dir/merge.lock``.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import Engine

from federation_grpc.hub.private import open_private, private_dir

LOGGER = logging.getLogger(__name__)

# pg_advisory_lock key: "tessera hub merge" as a stable 31-bit number.
MERGE_LOCK_KEY = 0x7E55E2A


@contextmanager
def merge_lock(engine: Engine, data_dir: Path) -> Iterator[None]:
    """Hold the hub-wide merge lock (blocking) for the body of the ``with``."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({MERGE_LOCK_KEY})")
            conn.commit()  # session-level lock: it outlives this transaction
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MERGE_LOCK_KEY})")
                conn.commit()
        return
    private_dir(data_dir)
    fd = open_private(data_dir / "merge.lock", os.O_RDWR | os.O_CREAT)
    with os.fdopen(fd, "r+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
