"""Hub state in SQL: SQLAlchemy 2.0 typed models; SQLite (WAL) by default, PostgreSQL too."""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from federation_grpc.hub.private import prepare_sqlite_file
from federation_grpc.schema import ensure_schema

LOGGER = logging.getLogger(__name__)

MIGRATIONS = "federation_grpc.hub:migrations"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; every stored time is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class UpdateStatus(enum.StrEnum):
    PARTIAL = "partial"
    RECEIVED = "received"
    EVALUATING = "evaluating"
    MERGED = "merged"
    REJECTED = "rejected"


class GenerationStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    CANDIDATE = "CANDIDATE"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class NodeRow(Base):
    __tablename__ = "nodes"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    # sha256 hex of the node token; the token itself is never stored.
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    # sha256 of the DER client certificate the token is bound to (NULL: bound at the
    # node's next call over TLS).
    cert_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # When the node last asked for federated evaluation tasks (NULL: never): it takes part
    # in federated evaluation, and the hub waits for its answers (see ``evaluations``).
    evaluator_seen: Mapped[datetime | None] = mapped_column(default=None)


class EnrolmentTokenRow(Base):
    __tablename__ = "enrolment_tokens"
    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    note: Mapped[str] = mapped_column(String(200), default="")
    used_by: Mapped[str | None] = mapped_column(String(64), default=None)
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    # The random salt (hex) the node token of the enrolment that used the token was
    # derived with from the node's request id (NULL: none given): the same request sent
    # again is answered again (see ``nodes.enrol``).
    answer_salt: Mapped[str | None] = mapped_column(String(64), default=None)


class GenerationRow(Base):
    __tablename__ = "generations"
    number: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(BigInteger, default=None)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    strategy: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(16), default=GenerationStatus.ACTIVE)
    validation_score: Mapped[float | None] = mapped_column(Float, default=None)
    # How the gate decided, when there is more to say than accepted/rejected (a candidate
    # published without a federated verdict, sites too small to judge); "" otherwise.
    notes: Mapped[str] = mapped_column(Text, default="")


class HubStateRow(Base):
    """A single row (id 1) pointing at the generation nodes should serve."""

    __tablename__ = "hub_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    current_generation: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # Bumped on every change of the current generation, so watchers in any process notice.
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class UpdateRow(Base):
    __tablename__ = "updates"
    update_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"), index=True)
    base_generation: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int] = mapped_column(BigInteger)
    trained_groups: Mapped[list[str]] = mapped_column(JSON)
    local_metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    total_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    merged_into: Mapped[int | None] = mapped_column(BigInteger, default=None, index=True)
    candidate_generation: Mapped[int | None] = mapped_column(BigInteger, default=None)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    received_at: Mapped[datetime | None] = mapped_column(default=None)
    sequence: Mapped[int | None] = mapped_column(BigInteger, default=None, index=True)


class RejectionRow(Base):
    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    update_id: Mapped[str] = mapped_column(String(36), index=True)
    node_id: Mapped[str] = mapped_column(String(64), default="")
    stage: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[str]] = mapped_column(JSON)
    candidate_generation: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MetricRow(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(BigInteger)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The node's name for the record (NULL: none given); one row per node and key.
    record_key: Mapped[str | None] = mapped_column(String(64), default=None)

    __table_args__ = (UniqueConstraint("node_id", "record_key", name="uq_metrics_node_key"),)


class EvaluationTaskRow(Base):
    __tablename__ = "evaluation_tasks"
    task_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    candidate_generation: Mapped[int] = mapped_column(BigInteger)
    reference_generation: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline: Mapped[datetime]
    open: Mapped[bool] = mapped_column(Boolean, default=True)


class EvaluationResultRow(Base):
    __tablename__ = "evaluation_results"
    task_id: Mapped[str] = mapped_column(ForeignKey("evaluation_tasks.task_id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    candidate_score: Mapped[float] = mapped_column(Float)
    reference_score: Mapped[float] = mapped_column(Float)
    num_cases: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class SqliteWriteGate:
    """One writer at a time per process, handed over at once.

    SQLite lets one connection write; the others get SQLITE_BUSY, and the busy handler
    makes them sleep and retry with growing naps (up to 100 ms each). Under a burst of
    uploads (each a few small write transactions) the naps, not the fsyncs, were most
    of the wait. This gate takes a process-wide lock before a connection's first
    writing statement and gives it back when the transaction ends, so the next writer
    starts the moment the last one committed; SQLite's own locking still guards against
    other processes (the CLI), with the busy timeout as before. A writer that waits
    longer than that timeout goes on without the gate and meets SQLite's busy handling.
    """

    _KEY = "tessera_write_gate"

    def __init__(self, engine: Engine, timeout_s: float = 30.0) -> None:
        self.lock = threading.Lock()  # owned by a connection, not a thread
        self.timeout_s = timeout_s
        event.listen(engine, "before_cursor_execute", self._before_execute)
        for name in ("commit", "rollback"):
            event.listen(engine, name, self._end)
        event.listen(engine.pool, "reset", self._reset)
        event.listen(engine.pool, "checkin", self._checkin)

    def _before_execute(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if conn.info.get(self._KEY) or statement.lstrip()[:6].upper() in ("SELECT", "PRAGMA"):
            return
        if self.lock.acquire(timeout=self.timeout_s):
            conn.info[self._KEY] = True

    def _end(self, conn: Any) -> None:
        self._release(conn.info)

    def _reset(self, dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        self._release(connection_record.info)

    def _checkin(self, dbapi_connection: Any, connection_record: Any) -> None:
        self._release(connection_record.info)

    def _release(self, info: dict[Any, Any]) -> None:
        if info.pop(self._KEY, False):
            self.lock.release()


class HubStore:
    """Engine and sessions for the hub tables; ``session()`` commits or rolls back."""

    def __init__(self, url: str) -> None:
        self.url = url
        is_sqlite = url.startswith("sqlite")
        if is_sqlite:
            prepare_sqlite_file(url)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if is_sqlite:
            # A file on this host: no connection to go stale, so no ping per checkout;
            # and enough connections that a burst of uploads does not queue on the pool
            # (SQLite itself serialises the writes).
            kwargs = {
                "connect_args": {"check_same_thread": False, "timeout": 30},
                "pool_size": 16,
                "max_overflow": 112,
            }
        self.engine: Engine = create_engine(url, **kwargs)
        if is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            self.write_gate: SqliteWriteGate | None = SqliteWriteGate(self.engine)
        else:
            self.write_gate = None
        ensure_schema(self.engine, Base.metadata, MIGRATIONS)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        with self.session() as session:
            if session.get(HubStateRow, 1) is None:
                session.add(HubStateRow(id=1, current_generation=None, version=0))

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def locked_update(session: Session, update_id: str) -> UpdateRow:
    """The update's row, locked for this transaction (it was read moments ago: a
    missing row means the store changed under the merge, which must stop it)."""
    row = session.get(UpdateRow, update_id, with_for_update=True)
    if row is None:
        raise RuntimeError(f"update {update_id} vanished from the hub store during a merge")
    return row
