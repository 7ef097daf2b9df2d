"""The pipeline's edges (dicom_node/pipeline/flow.py): each kind's payload survives the
job table, a wrong or damaged payload is said so, and the node handles every kind once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from dicom_node.config import load_config
from dicom_node.node import NodeParts
from dicom_node.pipeline.flow import (
    FLOW,
    ActivatePayload,
    AdaptPayload,
    CorrectionPayload,
    ExportPayload,
    InferencePayload,
    JobKind,
    JobPayload,
    QualityPayload,
    TrainingPayload,
    enqueue,
)
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import Job
from tests.node.conftest import node_config_data, write_node_config

PAYLOADS: list[JobPayload] = [
    InferencePayload("1.2.3", "segment-ct", "abdomen", ("pacs", "archive")),
    ExportPayload("1.2.3", "pacs"),
    CorrectionPayload("1.2.4"),
    TrainingPayload("abdomen"),
    ActivatePayload("abdomen"),
    AdaptPayload("abdomen", 7, 1_000_003),
    QualityPayload("1.2.826.0.1.3680043.8.498.1"),
]


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[JobQueue]:
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.create_schema()
    yield JobQueue(db)
    db.dispose()


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.kind.value)
def test_a_payload_round_trips_through_the_job_table(queue: JobQueue,
                                                     payload: JobPayload) -> None:
    job_id = enqueue(queue, payload, max_attempts=7)
    claimed = queue.claim([payload.kind], "test")
    assert claimed is not None and claimed.id == job_id
    assert claimed.key == payload.key
    assert type(payload).of(claimed) == payload
    table = {edge.kind: edge for edge in FLOW}[payload.kind]
    assert claimed.max_attempts == (table.max_attempts or 7)


def test_kinds_are_unique_and_one_table_row_each() -> None:
    assert sorted(edge.kind for edge in FLOW) == sorted(JobKind)
    assert {type(p).kind for p in PAYLOADS} == set(JobKind)


def test_a_wrong_or_damaged_payload_is_named(queue: JobQueue) -> None:
    enqueue(queue, ExportPayload("1.2.3", "pacs"), max_attempts=3)
    claimed = queue.claim([JobKind.EXPORT], "test")
    assert claimed is not None
    with pytest.raises(ValueError, match="is a 'export' job, not 'inference'"):
        InferencePayload.of(claimed)
    job_id = enqueue(queue, TrainingPayload("abdomen"))
    with queue.db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(payload={"modle": "x"}))
    damaged = queue.claim([JobKind.TRAINING], "test")
    assert damaged is not None
    with pytest.raises(ValueError, match="bad payload"):
        TrainingPayload.of(damaged)


def test_export_attempts_come_from_configuration(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="from configuration"):
        enqueue(queue, ExportPayload("1.2.3", "pacs"))


def test_the_node_handles_every_kind_exactly_once(tmp_path: Path) -> None:
    data: dict[str, Any] = node_config_data(tmp_path / "node")
    config = load_config(write_node_config(tmp_path / "node.toml", data), env={})
    parts = NodeParts.build(config)
    try:
        handled = [(kind, type(h).__name__) for h in parts.handlers for kind in h.kinds]
        assert sorted(kind for kind, _ in handled) == sorted(JobKind)
        for kind, handler in handled:
            edge = next(e for e in FLOW if e.kind == kind)
            assert edge.handled_by == handler, (kind, handler)
    finally:
        parts.db.dispose()
