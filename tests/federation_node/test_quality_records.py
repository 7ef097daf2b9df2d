"""What a node reports for quality monitoring: a correction record carries the metrics
of the segmentation it corrects and the same ``segmentation_seq`` as that segmentation's
record, so the hub can fit Dice on metrics; no UID leaves; a segmentation whose metrics
are still being computed holds the report back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicom_node.config import load_config
from dicom_node.federation import FederationAgent
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.store.db import Database
from dicom_node.store.jobs import JobQueue
from dicom_node.store.models import Correction, Segmentation

UID = "1.2.826.0.1.3680043.8.498.4242"
METRICS = {"mean_entropy": 0.12, "confidence.liver": 0.91, "volume_ml.liver": 1500.0,
           "components.liver": 1.0, "bad": float("nan")}


def _agent(tmp_path: Path) -> FederationAgent:
    config = load_config(overrides={"node.data_dir": str(tmp_path / "node")}, env={})
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_schema()
    return FederationAgent(config.federation, db, ModelRegistry.__new__(ModelRegistry),
                           JobQueue(db), config.node.data_dir)


def _segmentation(agent: FederationAgent, n: int, metrics: dict, age_s: float = 0.0) -> int:
    with agent.db.session() as s:
        seg = Segmentation(series_uid=f"{UID}.{n}", model_name=agent.settings.model,
                           generation=0, seg_series_uid=f"{UID}.{n}.1",
                           seg_sop_instance_uid=f"{UID}.{n}.1.1", metrics=metrics, timings={},
                           created_at=datetime.now(UTC) - timedelta(seconds=age_s))
        s.add(seg)
        s.flush()
        return seg.id


def _correction(agent: FederationAgent, n: int, seg_id: int) -> None:
    with agent.db.session() as s:
        s.add(Correction(seg_sop_instance_uid=f"{UID}.{n}.9.1", seg_series_uid=f"{UID}.{n}.9",
                         source_series_uid=f"{UID}.{n}", segmentation_id=seg_id,
                         model_name=agent.settings.model, ai_generation=0, state="recorded",
                         dice={"liver": 0.62, "spleen": 0.9}, changed_slices=[], labels=[],
                         unknown_segments=[]))


def test_correction_records_carry_their_segmentations_metrics(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    first = _segmentation(agent, 1, METRICS)
    _segmentation(agent, 2, METRICS)
    _correction(agent, 1, first)
    records, seg_last, corr_last = agent._metric_records({"segmentation": 0, "correction": 0})
    segs = [r for r in records if r.kind == "segmentation"]
    (corr,) = [r for r in records if r.kind == "correction"]
    assert len(segs) == 2 and seg_last == 2 and corr_last == 1
    assert corr.values["segmentation_seq"] == segs[0].values["segmentation_seq"] == first
    assert corr.values["dice.liver"] == 0.62 and corr.values["dice.spleen"] == 0.9
    assert corr.values["mean_entropy"] == 0.12 and corr.values["volume_ml.liver"] == 1500.0
    assert "bad" not in corr.values  # non-finite numbers stay home
    assert not any(UID in key for r in records for key in r.values)


def test_metrics_still_being_computed_hold_the_report_back(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    done = _segmentation(agent, 1, METRICS)
    pending = _segmentation(agent, 2, {})
    _correction(agent, 2, pending)
    records, seg_last, corr_last = agent._metric_records({"segmentation": 0, "correction": 0})
    assert [r.values["segmentation_seq"] for r in records] == [done]
    assert seg_last == done and corr_last == 0
    # Metrics that never come (the computation failed) stop holding it back after a while.
    with agent.db.session() as s:
        row = s.get(Segmentation, pending)
        assert row is not None
        row.created_at = datetime.now(UTC) - timedelta(hours=1)
    records, seg_last, corr_last = agent._metric_records({"segmentation": done,
                                                          "correction": 0})
    assert {r.kind for r in records} == {"segmentation", "correction"}
    (corr,) = [r for r in records if r.kind == "correction"]
    assert corr.values["segmentation_seq"] == pending and "mean_entropy" not in corr.values
