"""The job queue contract (claim, lease, heartbeat, complete, retry, dead letter,
concurrent claims), run against every backend: SQLite file and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_node.store.db import Database
from dicom_node.store.jobs import Backoff, JobQueue, LeaseLost, key_lock_id
from dicom_node.store.models import AuditEvent, Base, Job, JobState
from tests.node.conftest import Postgres, wait_until

LONG = Backoff(initial_s=60, max_s=600)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    else:
        pg: Postgres = request.getfixturevalue("postgres")
        database = Database(pg.url)
        Base.metadata.drop_all(database.engine)
    database.create_schema()
    yield database
    database.dispose()


@pytest.fixture
def pg_db(postgres: Postgres) -> Iterator[Database]:
    """PostgreSQL alone: for what only happens between claims in flight at once
    (SQLite runs one writer at a time)."""
    database = Database(postgres.url)
    Base.metadata.drop_all(database.engine)
    database.create_schema()
    yield database
    database.dispose()


def _job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _make_due(db: Database, job_id: int) -> None:
    """Let the backoff pass without waiting for it."""
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(not_before=datetime.now(UTC) - timedelta(seconds=1)))


def test_claim_heartbeat_complete(db: Database) -> None:
    queue = JobQueue(db, lease_s=30)
    job_id = queue.enqueue("export", "series-1", {"series_uid": "1.2.3"}, max_attempts=3)
    assert job_id is not None
    assert queue.enqueue("export", "series-1") is None, "one active job per kind and key"
    assert queue.claim(["inference"], "A") is None, "only the kinds asked for"

    job = queue.claim(["export"], "A")
    assert job is not None
    assert (job.id, job.kind, job.key, job.attempts, job.max_attempts) == (
        job_id, "export", "series-1", 1, 3)
    assert job.payload == {"series_uid": "1.2.3"}
    assert queue.claim(["export"], "B") is None, "a leased job is not claimed twice"

    first_lease = _job(db, job_id).lease_expires_at
    assert first_lease is not None
    time.sleep(0.01)
    queue.heartbeat(job_id, "A")
    lease = _job(db, job_id).lease_expires_at
    assert lease is not None and lease > first_lease
    with pytest.raises(LeaseLost):
        queue.heartbeat(job_id, "B")

    assert queue.complete(job_id, "B") is False
    assert queue.complete(job_id, "A") is True
    row = _job(db, job_id)
    assert row.state == JobState.DONE and row.finished_at is not None
    assert row.lease_expires_at is None
    assert queue.complete(job_id, "A") is False
    assert queue.claim(["export"], "B") is None
    assert queue.enqueue("export", "series-1") is not None, "done jobs are not active"


def test_work_queued_while_its_job_runs_gets_a_job_of_its_own_that_waits(db: Database) -> None:
    """A series that grows while it is segmented: the running job may have read it
    already, so the new work is a second job, run after the first, never beside it."""
    queue = JobQueue(db, lease_s=30)
    first = queue.enqueue("inference", "series-1:rule")
    assert first is not None and queue.claim(["inference"], "A") is not None
    second = queue.enqueue("inference", "series-1:rule")
    assert second is not None and second != first
    assert queue.enqueue("inference", "series-1:rule") is None, "one pending is enough"
    other = queue.enqueue("inference", "series-2:rule")
    claimed = queue.claim(["inference"], "B")
    assert claimed is not None and claimed.id == other, "same key waits, others go on"
    assert queue.claim(["inference"], "B") is None
    assert queue.complete(first, "A") is True
    claimed = queue.claim(["inference"], "B")
    assert claimed is not None and claimed.id == second


def test_expired_lease_is_taken_over_by_another_owner(db: Database) -> None:
    queue = JobQueue(db, lease_s=0.5)
    job_id = queue.enqueue("export", "k")
    assert queue.claim(["export"], "A") is not None
    taken = wait_until(lambda: queue.claim(["export"], "B"), timeout=30, interval=0.1,
                       what="the expired lease to be claimed")
    assert taken.id == job_id and taken.attempts == 2
    assert _job(db, job_id).lease_owner == "B"
    # The first owner learns it lost the job and its result is dropped.
    with pytest.raises(LeaseLost):
        queue.heartbeat(job_id, "A")
    assert queue.complete(job_id, "A") is False
    assert queue.fail(job_id, "A", "late", LONG) == "lost"
    assert queue.complete(job_id, "B") is True


def test_fail_backs_off_then_dead_letters_after_max_attempts(db: Database) -> None:
    queue = JobQueue(db, lease_s=30)
    job_id = queue.enqueue("export", "k", max_attempts=3)
    assert job_id is not None
    for attempt in (1, 2):
        job = queue.claim(["export"], "A")
        assert job is not None and job.attempts == attempt
        before = datetime.now(UTC)
        assert queue.fail(job_id, "A", f"refused {attempt}", LONG) == JobState.PENDING
        row = _job(db, job_id)
        assert row.last_error == f"refused {attempt}"
        assert row.lease_expires_at is None
        # Not due before its backoff (60 s, then 120 s) is over.
        expected = LONG.delay(attempt)
        assert row.not_before >= before + timedelta(seconds=expected - 1)
        assert queue.claim(["export"], "A") is None
        _make_due(db, job_id)
    job = queue.claim(["export"], "A")
    assert job is not None and job.attempts == 3
    assert queue.fail(job_id, "A", "refused 3", LONG) == JobState.DEAD
    row = _job(db, job_id)
    assert row.state == JobState.DEAD and row.last_error == "refused 3"
    assert row.finished_at is not None
    _make_due(db, job_id)
    assert queue.claim(["export"], "A") is None, "a dead job is never claimed again"
    assert queue.counts() == {("export", JobState.DEAD): 1}


def test_permanent_failure_is_dead_at_once(db: Database) -> None:
    queue = JobQueue(db)
    job_id = queue.enqueue("inference", "k", max_attempts=5)
    assert job_id is not None
    assert queue.claim(["inference"], "A") is not None
    assert queue.fail(job_id, "A", "series refused", LONG, permanent=True) == JobState.DEAD


def test_an_enqueue_does_not_wait_for_a_claim_in_flight(pg_db: Database) -> None:
    """A pending job whose row a claim holds (not committed yet) does not count, and is
    not waited for: the enqueue adds a job of its own at once."""
    db = pg_db
    queue = JobQueue(db)
    first = queue.enqueue("export", "series-1")
    assert first is not None
    added: list[int | None] = []
    with db.session() as claiming:  # a claim that has the row and has not committed
        claiming.execute(select(Job).where(Job.id == first).with_for_update())
        enqueuer = threading.Thread(
            target=lambda: added.append(queue.enqueue("export", "series-1")), daemon=True)
        enqueuer.start()
        enqueuer.join(10)
        assert not enqueuer.is_alive(), "the enqueue waited for the claim"
    assert added and added[0] not in (None, first)
    with db.session() as enqueueing:  # another enqueue of the key, not committed yet
        enqueueing.execute(select(Job).where(Job.id == added[0]).with_for_update(read=True))
        assert queue.enqueue("export", "series-1") is None, "it sees the pending one"


def test_a_claim_in_flight_keeps_a_second_job_of_its_key_waiting(pg_db: Database) -> None:
    """A claim that has not committed is invisible to the query choosing the next job;
    the lock each claim takes on its kind and key keeps a second job of the same key
    from starting beside it."""
    db = pg_db
    queue = JobQueue(db)
    first = queue.enqueue("export", "series-1")
    second = queue.enqueue("export", "series-1", unique_active=False)
    assert first is not None and second is not None
    with db.session() as claiming:  # a claim of the first, as far as it got
        claiming.execute(select(Job).where(Job.id == first).with_for_update())
        assert claiming.execute(select(func.pg_try_advisory_xact_lock(
            key_lock_id("export", "series-1")))).scalar_one()
        claiming.execute(update(Job).where(Job.id == first)
                         .values(state=JobState.RUNNING, lease_owner="A"))
        assert queue.claim(["export"], "B") is None, "the second started beside the first"
    assert queue.claim(["export"], "B") is None  # the first runs, committed
    assert queue.complete(first, "A") is True
    claimed = queue.claim(["export"], "B")
    assert claimed is not None and claimed.id == second


def test_what_giving_up_means_commits_with_the_dead_letter_or_not_at_all(db: Database) -> None:
    queue = JobQueue(db)
    job_id = queue.enqueue("export", "k", max_attempts=1)
    assert job_id is not None and queue.claim(["export"], "A") is not None

    def broken(s: Session) -> None:
        s.add(AuditEvent(kind="export-failed", reason="written, then the handler broke"))
        s.flush()
        raise RuntimeError("handler broke")

    # A handler that cannot give up: its writes roll back, the job is dead all the same
    # (a bad payload fails in on_dead as it failed in run; it must not run for ever).
    assert queue.fail(job_id, "A", "gave up", LONG, on_dead=broken) == JobState.DEAD
    row = _job(db, job_id)
    assert row.state == JobState.DEAD
    assert row.last_error == "gave up; giving up failed: RuntimeError: handler broke"
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 0

    second = queue.enqueue("export", "k3", max_attempts=1)
    assert second is not None and queue.claim(["export"], "A") is not None
    seen: list[str] = []

    def consequences(s: Session) -> None:
        seen.append(s.get_one(Job, second).state)
        s.add(AuditEvent(kind="export-failed", reason="gave up"))

    assert queue.fail(second, "A", "gave up", LONG, on_dead=consequences) == JobState.DEAD
    assert seen == [JobState.DEAD]  # inside the transaction that marks it dead
    with db.session() as s:
        assert s.execute(select(AuditEvent.reason)).scalars().all() == ["gave up"]

    retried = queue.enqueue("export", "k2", max_attempts=3)
    assert retried is not None and queue.claim(["export"], "A") is not None
    assert queue.fail(retried, "A", "once", LONG, on_dead=broken) == JobState.PENDING


def test_backoff_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(initial_s=2, max_s=20)
    assert [backoff.delay(n) for n in range(1, 7)] == [2, 4, 8, 16, 20, 20]
    assert backoff.delay(0) == 2


def test_jobs_are_claimed_oldest_first(db: Database) -> None:
    queue = JobQueue(db)
    ids = [queue.enqueue("export", f"k{i}") for i in range(3)]
    claimed = [queue.claim(["export"], "A") for _ in ids]
    assert [c.id for c in claimed if c] == ids


def test_concurrent_claims_never_return_the_same_job(db: Database) -> None:
    queue = JobQueue(db, lease_s=300)
    ids = {queue.enqueue("export", f"series-{i}") for i in range(40)}
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(owner: str) -> None:
        mine: list[int] = []
        try:
            start.wait(10)
            while (job := queue.claim(["export"], owner)) is not None:
                mine.append(job.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        claimed[owner] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    all_claims = [job_id for mine in claimed.values() for job_id in mine]
    assert len(all_claims) == len(set(all_claims)), "a job was claimed twice"
    assert set(all_claims) == ids


def test_listeners_hear_of_a_job_only_once_it_is_committed(db: Database) -> None:
    """In-process workers are woken after the commit that made a job visible, never
    before it (they would find nothing and sleep a poll interval) and never for a
    transaction that rolled back."""
    queue = JobQueue(db, lease_s=30)
    seen: list[int | None] = []
    queue.add_listener(lambda: seen.append(
        (queue.claim(["export"], "listener") or None) and 1))

    with db.session() as s:
        queue.enqueue("export", "a", session=s)
        queue.enqueue("export", "b", session=s)
        assert seen == [], "no call inside the transaction"
    assert seen == [1], "one call per commit, and the job is claimable by then"

    with pytest.raises(RuntimeError), db.session() as s:
        queue.enqueue("export", "c", session=s)
        raise RuntimeError("roll back")
    assert seen == [1], "a rolled-back job wakes nobody"

    queue.enqueue("export", "d")
    assert seen == [1, 1]


def test_a_deferred_job_comes_back_later_without_spending_an_attempt(db: Database) -> None:
    queue = JobQueue(db, lease_s=30)
    job_id = queue.enqueue("quality-metrics", "seg-1", max_attempts=1)
    assert job_id is not None
    job = queue.claim(["quality-metrics"], "A")
    assert job is not None and job.attempts == 1
    assert not queue.defer(job_id, "B", 60), "only the lease holder defers"
    assert queue.defer(job_id, "A", 60)
    row = _job(db, job_id)
    assert (row.state, row.attempts, row.lease_owner) == (JobState.PENDING, 0, None)
    assert queue.claim(["quality-metrics"], "A") is None, "not due yet"
    _make_due(db, job_id)
    again = queue.claim(["quality-metrics"], "A")
    assert again is not None and again.attempts == 1, "a deferral is not an attempt"
