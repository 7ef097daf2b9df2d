"""The job queue: rows with leases, shared by every worker process of a node.

A worker claims a job (state ``running`` with a lease), heartbeats while it works,
and completes or fails it. A job whose lease expired (its worker died) is claimed
again. Failures are retried with exponential backoff up to ``max_attempts``, then
the job is ``dead`` with its last error (a dead letter). On PostgreSQL claims use
``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent workers never block on one row;
on SQLite each transaction begins IMMEDIATE, which serialises claims.

Jobs of one kind and key run one at a time: a pending job is not claimed while another
of its kind and key runs (one whose lease expired is taken over first); on PostgreSQL a
claim also takes a transaction lock on its kind and key, for claims that have not
committed yet. Enqueueing while one is pending adds nothing (the pending job will see
the new work when it runs); while one runs, it adds a pending job, since the running one
may have read its inputs already (a series that grew while it was segmented is segmented
again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from dicom_node.errors import DicomNodeError
from dicom_node.store.db import Database, after_commit
from dicom_node.store.models import Job, JobState

LOGGER = logging.getLogger(__name__)


def key_lock_id(kind: str, key: str) -> int:
    """The PostgreSQL advisory lock a claim of a job of ``kind`` and ``key`` takes for
    its transaction (a signed 64-bit number)."""
    return int.from_bytes(blake2b(f"tessera-job:{kind}:{key}".encode(), digest_size=8)
                          .digest(), "big", signed=True)


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 2.0
    max_s: float = 600.0

    def delay(self, attempts: int) -> float:
        return min(self.max_s, self.initial_s * (2 ** max(0, attempts - 1)))


class LeaseLost(DicomNodeError):
    """The worker no longer holds the job's lease (another worker took it over)."""


class JobQueue:
    def __init__(self, db: Database, *, lease_s: float = 60.0) -> None:
        self.db = db
        self.lease = timedelta(seconds=lease_s)
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each commit that added a job (in this process).

        Workers in the same process use it to skip their poll wait, so a job queued by
        another job (export after inference) starts at once; workers in other processes
        still find it by polling.
        """
        self._listeners.append(listener)

    def _notify_after_commit(self, s: Session) -> None:
        if not self._listeners or s.info.get("tessera.jobs.notify"):
            return
        s.info["tessera.jobs.notify"] = True

        def committed() -> None:
            s.info.pop("tessera.jobs.notify", None)
            for listener in self._listeners:
                listener()

        after_commit(s, committed)

    def enqueue(
        self,
        kind: str,
        key: str,
        payload: dict[str, Any] | None = None,
        *,
        max_attempts: int = 5,
        session: Session | None = None,
        unique_active: bool = True,
    ) -> int | None:
        """Add a job; with ``unique_active`` none is added while one of the same kind
        and key is pending (returns ``None`` then). One that is running does not count:
        it may have read its inputs before this call's transaction commits."""
        def _add(s: Session) -> int | None:
            if unique_active:
                # PostgreSQL: a pending job a claim is taking right now (its row locked
                # for update) does not count: the claim may read its inputs before this
                # commits. Skipped, never waited for, so an enqueue never blocks on a
                # claim; a share lock, so concurrent enqueues still see each other's.
                pending = s.execute(select(Job.id).where(
                    Job.kind == kind, Job.key == key, Job.state == JobState.PENDING,
                ).with_for_update(read=True, skip_locked=True)).first()
                if pending is not None:
                    return None
            job = Job(kind=kind, key=key, payload=payload or {}, max_attempts=max_attempts,
                      state=JobState.PENDING, attempts=0, not_before=datetime.now(UTC))
            s.add(job)
            s.flush()
            self._notify_after_commit(s)
            return job.id

        if session is not None:
            return _add(session)
        with self.db.session() as s:
            return _add(s)

    def claim(self, kinds: Iterable[str], owner: str) -> ClaimedJob | None:
        """Claim the oldest due job of one of ``kinds`` whose kind and key is not running
        (a running one whose lease expired is taken over first), or one whose lease
        expired."""
        now = datetime.now(UTC)
        kinds = tuple(kinds)
        running = aliased(Job)
        same_key_running = exists().where(
            running.kind == Job.kind, running.key == Job.key, running.state == JobState.RUNNING)
        with self.db.session() as s:
            row = s.execute(
                select(Job)
                .where(
                    Job.kind.in_(kinds),
                    or_(
                        and_(Job.state == JobState.PENDING, Job.not_before <= now,
                             ~same_key_running),
                        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
                    ),
                )
                .order_by(Job.not_before, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if row is None:
                return None
            if not self._only_claim_of_its_key(s, row):
                return None
            if row.state == JobState.RUNNING:
                LOGGER.warning("job %s (%s) lease of %s expired; taking it over",
                               row.id, row.kind, row.lease_owner)
            row.state = JobState.RUNNING
            row.lease_owner = owner
            row.lease_expires_at = now + self.lease
            row.attempts += 1
            return ClaimedJob(row.id, row.kind, row.key, dict(row.payload or {}),
                              row.attempts, row.max_attempts)

    def _only_claim_of_its_key(self, s: Session, row: Job) -> bool:
        """PostgreSQL: whether no other claim of ``row``'s kind and key is in flight or
        committed. Under READ COMMITTED the query that chose ``row`` does not see a claim
        of another pending job of the same key that has not committed yet: the first
        claim of a key takes a lock for its transaction, and a later one, once it has
        the lock, sees the first one's job running. SQLite runs claims one at a time."""
        if self.db.is_sqlite:
            return True
        lock_id = key_lock_id(row.kind, row.key)
        if not s.execute(select(func.pg_try_advisory_xact_lock(lock_id))).scalar_one():
            return False
        return not s.execute(select(exists().where(
            Job.kind == row.kind, Job.key == row.key, Job.state == JobState.RUNNING,
            Job.id != row.id))).scalar_one()

    def heartbeat(self, job_id: int, owner: str) -> None:
        """Extend the lease; raises :class:`LeaseLost` if another worker holds it now."""
        with self.db.session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner,
                       Job.state == JobState.RUNNING)
                .values(lease_expires_at=datetime.now(UTC) + self.lease)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise LeaseLost(f"job {job_id} is no longer leased by {owner}")

    def complete(self, job_id: int, owner: str, session: Session | None = None) -> bool:
        """Mark done; returns False if the lease was lost (the result must be dropped)."""
        def _done(s: Session) -> bool:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner,
                       Job.state == JobState.RUNNING)
                .values(state=JobState.DONE, finished_at=datetime.now(UTC),
                        lease_expires_at=None, last_error=None)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

        if session is not None:
            return _done(session)
        with self.db.session() as s:
            return _done(s)

    def defer(self, job_id: int, owner: str, delay_s: float) -> bool:
        """Put a claimed job back, due in ``delay_s``, without counting its attempt;
        returns False if the lease was lost."""
        with self.db.session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner,
                       Job.state == JobState.RUNNING)
                .values(state=JobState.PENDING, lease_owner=None, lease_expires_at=None,
                        attempts=Job.attempts - 1,
                        not_before=datetime.now(UTC) + timedelta(seconds=delay_s))
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def fail(self, job_id: int, owner: str, error: str, backoff: Backoff,
             *, permanent: bool = False,
             on_dead: Callable[[Session], None] | None = None) -> str:
        """Record a failure: retry later, or dead-letter. Returns the new state.

        ``on_dead`` writes what giving up means (dead letters, a failed series, an audit
        event) in the transaction that marks the job dead: a crash never leaves one
        without the other. If it raises, its writes are rolled back (a savepoint), the
        job is dead all the same and its error says so: a handler that cannot give up
        does not keep a job alive."""
        now = datetime.now(UTC)
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.lease_owner != owner or job.state != JobState.RUNNING:
                return "lost"
            job.last_error = error[:4000]
            job.lease_expires_at = None
            if permanent or job.attempts >= job.max_attempts:
                job.state = JobState.DEAD
                job.finished_at = now
                if on_dead is not None:
                    try:
                        with s.begin_nested():
                            on_dead(s)
                    except Exception as exc:
                        LOGGER.exception("job %s (%s %s): giving up failed", job.id, job.kind,
                                         job.key)
                        job.last_error = (f"{error}; giving up failed: "
                                          f"{type(exc).__name__}: {exc}")[:4000]
            else:
                job.state = JobState.PENDING
                job.not_before = now + timedelta(seconds=backoff.delay(job.attempts))
            return job.state

    def counts(self) -> dict[tuple[str, str], int]:
        with self.db.session() as s:
            rows = s.execute(
                select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
            ).all()
        return {(k, st): n for k, st, n in rows}
