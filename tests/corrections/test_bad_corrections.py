"""Bad corrections are stored, flagged with a reason, never trained on; the node goes on.

Also: a crash in the middle of training leaves the serving model untouched and the
training job is retried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from dicom_node.learning import optimiser_state
from dicom_node.learning.training import TrainingProgress
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.pipeline.trainer import IncrementalTrainer
from dicom_node.pipeline.volume import build_volume
from dicom_node.status import node_status
from dicom_node.store.models import AuditEvent, Correction, Instance, Job, TrainingSample
from tests.corrections.helpers import (
    TEST_MODEL,
    Study,
    half_matrix,
    learning_section,
    radiologist_seg,
    segment_rule,
    segmentation_of,
    send_corrected_study,
    tiny_model,
    versions,
)
from tests.node.conftest import echoscu, node_config_data, storescu, wait_until

LIVER = [s for s in CT_SEGMENTS if s.name == "liver"]


def _node(tmp_path: Path, start_node: Any, rule: dict[str, Any], **learning: Any) -> Any:
    data = node_config_data(tmp_path / "node", rules=[rule],
                            learning=learning_section(**learning))
    data["models"] = {TEST_MODEL: str(tiny_model(tmp_path))}
    return start_node(data)


def _corrections(node: Any) -> dict[str, Correction]:
    with node.parts.db.session() as s:
        return {c.seg_sop_instance_uid: c for c in s.execute(select(Correction)).scalars()}


@pytest.fixture
def flags_without_audit() -> Any:
    """SEG UIDs of corrections a transaction flagged without the audit event that says so:
    a reader (or a crash) between two transactions would see one without the other."""
    missing: list[str] = []

    def after_flush(session: Session, _context: Any) -> None:
        seen = session.info.setdefault("flag_audit", (set(), set()))
        for row in session.new | session.dirty:
            if isinstance(row, Correction) and row.state == "flagged":
                seen[0].add(row.seg_sop_instance_uid)
            elif isinstance(row, AuditEvent) and row.kind == "correction-flagged":
                seen[1].add(row.sop_instance_uid)

    def after_commit(session: Session) -> None:
        flagged, audited = session.info.pop("flag_audit", (set(), set()))
        missing.extend(flagged - audited)

    event.listen(Session, "after_flush", after_flush)
    event.listen(Session, "after_commit", after_commit)
    yield missing
    event.remove(Session, "after_flush", after_flush)
    event.remove(Session, "after_commit", after_commit)


@pytest.mark.slow
def test_bad_corrections_are_flagged_with_reasons_and_never_trained_on(
    tmp_path: Path, start_node: Any, flags_without_audit: list[str]
) -> None:
    node = _node(tmp_path, start_node, segment_rule(series_description="(?i)axial"),
                 max_correction_frames=100)
    segmented = Study("B", 0, seed=7400)
    assert storescu(node.port, *segmented.write(tmp_path / "s1")).returncode == 0
    never = Study("B", 1, seed=7400)
    for ds in never.datasets:
        ds.SeriesDescription = "scout"
    assert storescu(node.port, *never.write(tmp_path / "s2")).returncode == 0
    wait_until(lambda: segmentation_of(node, segmented.series_uid), timeout=120,
               what="the AI segmentation")

    truth = segmented.truth_in_volume_order()
    bad: dict[str, Path] = {}
    bad["unknown"], _ = radiologist_seg(Study("C", 0, seed=7400), tmp_path / "b" / "1.dcm",
                                        specs=LIVER, labels=None, author="r1")
    bad["never segmented"], _ = radiologist_seg(never, tmp_path / "b" / "2.dcm", specs=LIVER,
                                                labels=never.truth_in_volume_order(),
                                                author="r2")
    small = build_volume(half_matrix(segmented))
    bad["frame size"], _ = radiologist_seg(segmented, tmp_path / "b" / "3.dcm", specs=LIVER,
                                           labels=truth[:, ::2, ::2], volume=small, author="r3")
    bad["empty"], _ = radiologist_seg(segmented, tmp_path / "b" / "4.dcm", specs=LIVER,
                                      labels=np.zeros_like(truth), author="r4")
    bad["max_correction_frames"], _ = radiologist_seg(segmented, tmp_path / "b" / "5.dcm",
                                                      specs=CT_SEGMENTS, labels=truth,
                                                      author="r5")
    uids = {k: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for k, p in bad.items()}
    for path in bad.values():  # one association each, as separate viewers would send
        assert storescu(node.port, path, options=("-R",)).returncode == 0

    found = wait_until(lambda: (lambda c: c if all(u in c for u in uids.values()) else None)(
        _corrections(node)), timeout=90, what="all five corrections decided")
    for expected, uid in uids.items():
        corr = found[uid]
        assert corr.state == "flagged", (expected, corr.state, corr.reason)
        assert expected in corr.reason.lower(), (expected, corr.reason)
    with node.parts.db.session() as s:
        flagged = s.execute(select(AuditEvent).where(
            AuditEvent.kind == "correction-flagged")).scalars().all()
        assert {e.sop_instance_uid for e in flagged} == set(uids.values())
        assert flags_without_audit == []  # each flag committed with its audit event
        stored = set(s.execute(select(Instance.sop_instance_uid)).scalars())
        assert set(uids.values()) <= stored  # stored, for inspection
        assert s.execute(select(func.count()).select_from(TrainingSample)).scalar_one() == 0
        assert s.execute(select(Job).where(Job.kind == "training")).first() is None
    status = node_status(node.parts.db)
    day = next(iter(status["learning"]["corrections_per_day"].values()))
    assert day == {"flagged": 5}
    assert echoscu(node.port).returncode == 0


@pytest.mark.slow
def test_a_crash_during_training_leaves_the_serving_model_and_the_job_is_retried(
    tmp_path: Path, start_node: Any
) -> None:
    node = _node(tmp_path, start_node, segment_rule())
    trainer = next(h for h in node.parts.handlers if isinstance(h, IncrementalTrainer))

    def crash_first_attempt(attempt: int, p: TrainingProgress) -> None:
        if attempt == 1 and p.step >= max(1, p.total_steps // (2 * p.epochs)):
            raise RuntimeError(f"injected fault at step {p.step} of attempt {attempt}")

    trainer.step_hooks.append(crash_first_attempt)
    # a damaged file of Adam's moments costs a warm-up, never the round
    moments = tmp_path / "node" / "optimiser" / f"{TEST_MODEL}.safetensors"
    moments.parent.mkdir(parents=True)
    moments.write_bytes(b"\x80\x04damaged")
    send_corrected_study(node, Study("B", 3, seed=7500), tmp_path / "corr")

    def failed_once() -> Job | None:
        with node.parts.db.session() as s:
            return s.execute(select(Job).where(Job.kind == "training",
                                               Job.last_error.is_not(None))).scalars().first()

    job = wait_until(failed_once, timeout=90, what="the first training attempt to crash")
    assert "injected fault" in (job.last_error or "")
    # the retry is backed off, so the serving model is still generation 0 here
    assert node.parts.models.get(TEST_MODEL)[1].generation == 0
    assert not [v for v in versions(node) if v.origin == "local"]
    assert moments.read_bytes() == b"\x80\x04damaged"  # a crashed round keeps nothing

    def job_done() -> Job | None:
        with node.parts.db.session() as s:
            row = s.get(Job, job.id)
            return row if row is not None and row.state == "done" else None

    done = wait_until(job_done, timeout=120, what="the retried round")
    assert done.attempts == 2
    gen1 = [v for v in versions(node) if v.generation == 1]
    assert len(gen1) == 1 and gen1[0].state == "serving"
    assert node.parts.models.get(TEST_MODEL)[1].generation == 1
    wait_until(lambda: optimiser_state.load(moments), timeout=30,
               what="the served round's moments in place of the damaged file")


@pytest.mark.slow
def test_a_round_serves_even_when_its_moments_cannot_be_written(
    tmp_path: Path, start_node: Any
) -> None:
    node = _node(tmp_path, start_node, segment_rule())
    blocker = tmp_path / "node" / "optimiser"  # a file where the folder belongs
    blocker.write_bytes(b"not a folder")
    send_corrected_study(node, Study("B", 4, seed=7600), tmp_path / "corr")
    wait_until(lambda: node.parts.models.get(TEST_MODEL)[1].generation == 1, timeout=120,
               what="generation 1 serving")
    gen1 = [v for v in versions(node) if v.generation == 1]
    assert len(gen1) == 1 and gen1[0].state == "serving"

    def training_jobs() -> list[tuple[str, int]]:
        with node.parts.db.session() as s:
            return [(j.state, j.attempts) for j in
                    s.execute(select(Job).where(Job.kind == "training")).scalars()]

    # the job finished on its first attempt; nothing is retried
    wait_until(lambda: training_jobs() == [("done", 1)] or None, timeout=30,
               what=f"the training job done at once (now {training_jobs()})")
    assert blocker.read_bytes() == b"not a folder"
