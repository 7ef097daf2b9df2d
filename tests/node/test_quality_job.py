"""Quality metrics as their own job: the same figures as computing them in place, never
before the SEG's first delivery attempt ends, and nothing stuck when inputs are lost."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from dicom_node.learning.scores import quality_metrics
from dicom_node.pipeline.flow import QualityPayload, enqueue
from dicom_node.pipeline.quality_job import QualityInputs, QualityJob
from dicom_node.store.db import Database
from dicom_node.store.jobs import Backoff, ClaimedJob, JobQueue
from dicom_node.store.models import Job, JobState, OutboxItem, OutboxState, Segmentation
from dicom_node.worker import JobDeferred, JobWorker

SEG_UID = "1.2.826.0.1.3680043.8.498.1"
NAMES = {"body": 1, "liver": 2}


def _result(seed: int = 3) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 0, 1, 2], size=(6, 32, 32)).astype(np.uint8)
    confidence = rng.uniform(0.3, 1.0, labels.shape).astype(np.float32)
    entropy = {head: rng.uniform(0, 1, labels.shape).astype(np.float32)
               for head in ("body", "liver")}
    return labels, confidence, entropy


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    database.create_schema()
    with database.session() as s:
        s.add(Segmentation(series_uid="1.2.3", model_name="m", generation=0,
                           seg_series_uid="1.2.3.4", seg_sop_instance_uid=SEG_UID,
                           metrics={"domain": {"in_domain": True}}, timings={"store_s": 0.1},
                           created_at=datetime.now(UTC)))
    yield database
    database.dispose()


def test_the_stored_inputs_give_the_figures_computed_in_place(tmp_path: Path) -> None:
    labels, confidence, entropy = _result()
    inputs = QualityInputs(tmp_path)
    inputs.save(SEG_UID, labels, confidence, entropy, (0.8, 0.8, 2.5), NAMES)
    assert inputs.metrics(SEG_UID) == quality_metrics(labels, confidence, entropy,
                                                      (0.8, 0.8, 2.5), NAMES)


def test_a_hostile_uid_never_leaves_the_quality_folder(tmp_path: Path) -> None:
    path = QualityInputs(tmp_path).path("../../etc/passwd\x00 1.2")
    assert path.parent == tmp_path / "quality" and path.name == "....1.2.npz"


def _claimed(queue: JobQueue) -> ClaimedJob:
    with queue.db.session() as s:
        enqueue(queue, QualityPayload(SEG_UID), session=s)
    claimed = queue.claim(["quality-metrics"], "w")
    assert claimed is not None
    return claimed


def _undelivered_seg(db: Database, folder: Path) -> QualityInputs:
    """The SEG's inputs stored and its delivery not attempted yet."""
    inputs = QualityInputs(folder)
    inputs.save(SEG_UID, *_result(), (1.0, 1.0, 1.0), NAMES)
    with db.session() as s:
        s.add(OutboxItem(destination="pacs", sop_instance_uid=SEG_UID, series_uid="1.2.3.4",
                         state=OutboxState.PENDING, attempts=0))
    return inputs


def test_metrics_wait_for_the_first_delivery_attempt_then_land(db: Database,
                                                                tmp_path: Path) -> None:
    labels, confidence, entropy = _result()
    inputs = _undelivered_seg(db, tmp_path)
    queue = JobQueue(db)
    handler = QualityJob(db, inputs, delivery_wait_s=600)
    claimed = _claimed(queue)
    with pytest.raises(JobDeferred):
        handler.run(claimed, lambda: None)

    worker = JobWorker(queue, [handler], threads=1, backoff=Backoff(1, 1),
                       poll_interval_s=0.05, heartbeat_s=10)
    queue.defer(claimed.id, "w", 0)
    assert worker.run_one("w")  # still pending: deferred again, attempt not counted
    with db.session() as s:
        job = s.execute(select(Job)).scalar_one()
        assert (job.state, job.attempts) == (JobState.PENDING, 0)
        s.execute(OutboxItem.__table__.update().values(attempts=1))  # the attempt ended
        job.not_before = datetime.now(UTC) - timedelta(seconds=1)
    assert worker.run_one("w")
    with db.session() as s:
        seg = s.execute(select(Segmentation)).scalar_one()
        job = s.execute(select(Job)).scalar_one()
    assert job.state == JobState.DONE
    assert seg.metrics["domain"] == {"in_domain": True}, "the domain verdict is kept"
    assert seg.metrics["volume_ml.liver"] == quality_metrics(
        labels, confidence, entropy, (1.0, 1.0, 1.0), NAMES)["volume_ml.liver"]
    assert seg.timings["store_s"] == 0.1 and "metrics_s" in seg.timings
    assert not inputs.path(SEG_UID).exists(), "inputs are removed once used"


def test_a_delivery_that_takes_too_long_does_not_hold_the_metrics(db: Database,
                                                                  tmp_path: Path) -> None:
    inputs = _undelivered_seg(db, tmp_path)
    QualityJob(db, inputs, delivery_wait_s=0).run(_claimed(JobQueue(db)), lambda: None)
    with db.session() as s:
        assert "mean_entropy" in s.execute(select(Segmentation)).scalar_one().metrics


def test_lost_inputs_are_recorded_not_retried_forever(db: Database, tmp_path: Path) -> None:
    QualityJob(db, QualityInputs(tmp_path), delivery_wait_s=600).run(_claimed(JobQueue(db)),
                                                                     lambda: None)
    with db.session() as s:
        metrics = s.execute(select(Segmentation)).scalar_one().metrics
    assert metrics == {"domain": {"in_domain": True}, "quality": "inputs lost"}


def test_a_second_job_of_a_seg_whose_metrics_landed_changes_nothing(db: Database,
                                                                     tmp_path: Path) -> None:
    """A SEG's quality job queued again (its series sent again while the first ran) finds
    the figures in and its inputs gone: it keeps the figures, never 'inputs lost'."""
    inputs = _undelivered_seg(db, tmp_path)
    queue = JobQueue(db)
    handler = QualityJob(db, inputs, delivery_wait_s=0)
    first = _claimed(queue)
    handler.run(first, lambda: None)
    assert queue.complete(first.id, "w")
    with db.session() as s:
        landed = s.execute(select(Segmentation)).scalar_one()
        metrics, timings = landed.metrics, landed.timings
    handler.run(_claimed(queue), lambda: None)
    with db.session() as s:
        again = s.execute(select(Segmentation)).scalar_one()
    assert "quality" not in again.metrics and (again.metrics, again.timings) == (metrics,
                                                                                  timings)


def test_a_dead_jobs_inputs_go_only_once_it_is_dead_for_good(db: Database,
                                                              tmp_path: Path) -> None:
    """Giving up removes the inputs when the transaction that marks the job dead commits:
    not at its savepoint, and not at all if it rolls back (the job runs again, and needs
    them)."""
    inputs = _undelivered_seg(db, tmp_path)
    handler = QualityJob(db, inputs, delivery_wait_s=600)
    claimed = _claimed(JobQueue(db))
    with pytest.raises(RuntimeError), db.session() as s:
        handler.on_dead(claimed, "boom", s)
        raise RuntimeError("the commit that would mark it dead fails")
    assert inputs.path(SEG_UID).exists()
    # Giving up failed: its savepoint rolls back, and the job dies all the same.
    with db.session() as s, pytest.raises(RuntimeError), s.begin_nested():
        handler.on_dead(claimed, "boom", s)
        raise RuntimeError("on_dead failed after it asked for the removal")
    assert inputs.path(SEG_UID).exists()
    with db.session() as s:
        with s.begin_nested():  # as JobQueue.fail calls it
            handler.on_dead(claimed, "boom", s)
        assert inputs.path(SEG_UID).exists(), "removed before the commit"
    assert not inputs.path(SEG_UID).exists()
    # Through the queue: a job out of attempts.
    inputs.save(SEG_UID, *_result(), (1.0, 1.0, 1.0), NAMES)
    queue = JobQueue(db)
    with db.session() as s:
        s.execute(Job.__table__.delete())
    last = _claimed(queue)
    with db.session() as s:
        s.execute(Job.__table__.update().values(max_attempts=1))
    queue.fail(last.id, "w", "boom", Backoff(1, 1),
               on_dead=lambda s: handler.on_dead(last, "boom", s))
    with db.session() as s:
        assert s.execute(select(Job.state)).scalar_one() == JobState.DEAD
    assert not inputs.path(SEG_UID).exists()
