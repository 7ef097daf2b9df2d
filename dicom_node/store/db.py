"""Database engine: SQLite in WAL mode by default, PostgreSQL for scale-out."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from dicom_node.store.models import Base
from dicom_node.store.private import private_file

LOGGER = logging.getLogger(__name__)

MIGRATIONS = "dicom_node.store:migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # The driver must not open transactions on its own; the "begin" hook does.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before it returns (acknowledged means durable).
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_relaxed_pragmas(dbapi_conn: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, record)
    # NORMAL in WAL mode: a commit is not fsync'd (it is after a crash of the process,
    # not of the machine). Only for writes an intake journal already made durable.
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")


# The PostgreSQL advisory lock the relaxed sessions (the intake's writes) take.
INTAKE_LOCK_KEY = 0x7E55E2A


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock at BEGIN: claims (select then update) cannot interleave
    # between processes, which SQLite would otherwise answer with SQLITE_BUSY.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the transaction it is registered in has committed: after the
    outermost commit, not at a savepoint's release (SQLAlchemy's ``after_commit`` fires
    for that too). Never if that transaction, a savepoint it was registered in, or one
    around it rolls back. For what must wait for the commit (a file removed, a worker
    woken); an action that fails is logged, never raised from the commit."""
    registered = session.get_nested_transaction() or session.get_transaction()
    over = False

    def committed(s: Session) -> None:
        nonlocal over  # (a listener cannot remove itself while the event runs)
        if over or s.in_nested_transaction():
            return
        over = True
        try:
            action()
        except Exception:
            LOGGER.exception("an action after a commit failed")

    def rolled_back(_s: Session, previous: SessionTransaction) -> None:
        nonlocal over
        transaction = registered
        while transaction is not None:
            if transaction is previous:
                over = True
                return
            transaction = transaction.parent

    event.listen(session, "after_commit", committed)
    event.listen(session, "after_soft_rollback", rolled_back)


class Database:
    """Engine and session factory for one database URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:" and not path.startswith("file:"):
                # 0600 before SQLite creates it; its -wal and -shm files take this mode.
                private_file(Path(path))
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin_immediate)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._relaxed: sessionmaker[Session] | None = None
        self._sqlite_path = Path(self.url.split("///", 1)[-1]) if self.is_sqlite else None

    def create_schema(self) -> None:
        """Make the schema ready: ``create_all`` + Alembic stamp on an empty database,
        an upgrade of a stamped one (see :mod:`federation_grpc.schema`)."""
        from federation_grpc.schema import ensure_schema

        ensure_schema(self.engine, Base.metadata, MIGRATIONS)

    def migrate(self, revision: str = "head") -> tuple[str | None, str | None]:
        """Run the Alembic revision scripts (``tessera node migrate``)."""
        from federation_grpc.schema import migrate

        return migrate(self.engine, MIGRATIONS, revision)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def relaxed_session(self) -> Iterator[Session]:
        """A session whose commit is not synced to disk (see :meth:`sync`): for rows an
        intake journal already holds durably. One at a time across processes (SQLite's
        write lock; on PostgreSQL an advisory lock held to the commit)."""
        if not self.is_sqlite:
            with self.session() as session:
                session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                # One writer of received instances at a time across the node's processes
                # (its receivers), as SQLite's BEGIN IMMEDIATE gives: a check for an
                # instance's row and the write of its file and row never interleave
                # with another process doing the same for the same SOP Instance UID.
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                {"key": INTAKE_LOCK_KEY})
                yield session
            return
        if self._relaxed is None:
            engine = create_engine(self.url, future=True,
                                   connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(engine, "connect", _sqlite_relaxed_pragmas)
            event.listen(engine, "begin", _sqlite_begin_immediate)
            self._relaxed = sessionmaker(engine, expire_on_commit=False)
        with self._relaxed() as session, session.begin():
            yield session

    def sync(self) -> None:
        """Make every commit so far durable, relaxed ones included."""
        if self._sqlite_path is None:
            # A synchronous commit that writes WAL flushes every earlier one with it.
            with self.session() as session:
                session.execute(text("SELECT txid_current()"))
            return
        # WAL mode, synchronous=NORMAL: a commit lives in the -wal file until a
        # checkpoint copies it into the database, which SQLite then syncs before the
        # WAL can be reused; so syncing the -wal file makes every commit so far durable.
        # Never open the database file itself here: closing any descriptor of it drops
        # the POSIX locks SQLite holds on it in this process.
        wal = self._sqlite_path.with_name(self._sqlite_path.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: everything is in the (synced) database file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def dispose(self) -> None:
        if self._relaxed is not None:
            bind = self._relaxed.kw.get("bind")
            if bind is not None:
                bind.dispose()
        self.engine.dispose()
