"""Transactions whose loss in a power cut is harmless, committed without waiting for the disk.

The row an upload opens (state PARTIAL) serves only to resume an interrupted stream. Were
it lost in a power cut or an OS crash, the hub would answer UNKNOWN for that update and
the node would send it again from byte 0 (the staged bytes are truncated then): nothing
the hub acknowledged would be lost. Its commit need not wait for an fsync. Under a burst
the wait was long: SQLite writes one transaction at a time, and fifty uploads opening at
once queued behind each other's fsync of the write-ahead log while the other streams
filled the page cache: 0.6 s at the median, 0.85 s at worst, before a stream's first
chunk; 10 ms and 41 ms without the fsync (benchmarks/federation.py --clients 50
--size-mb 10 --hold-merges, two loaded cores).

* SQLite (WAL): the transaction runs under ``PRAGMA synchronous=NORMAL`` and its
  connection is set back to FULL before it goes back to the pool (or is discarded).
  The log is written in order, so the fsync of any later FULL commit (an update
  received) makes this one durable as well. A crash of the hub process alone loses
  nothing: the log is in the kernel's hands at commit.
* PostgreSQL: ``SET LOCAL synchronous_commit TO OFF``, for this transaction only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

from federation_grpc.hub.store import HubStore


@contextmanager
def lazy_connection(store: HubStore) -> Iterator[Connection]:
    """A connection in a transaction that commits at the end (or rolls back on an
    exception) without waiting for the disk. Only for rows whose loss in a power cut is
    harmless. Core statements, not an ORM session: an upload's row is one statement or
    two."""
    dialect = store.engine.dialect.name
    if dialect != "sqlite":
        with store.engine.begin() as connection:
            if dialect == "postgresql":
                connection.execute(text("SET LOCAL synchronous_commit TO OFF"))
            yield connection
        return
    with store.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA synchronous=NORMAL")
        connection.commit()
        try:
            with connection.begin():
                yield connection
        finally:
            try:
                connection.exec_driver_sql("PRAGMA synchronous=FULL")
                connection.commit()
            except BaseException:
                connection.invalidate()  # never back to the pool without its fsync
                raise
