"""Segmentation end to end: storescu -> node -> model -> DICOM-SEG -> Orthanc.

The phantom subjects used here (seed 7000+) were never used to train the starter model.
"""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import delete, select

from dicom_node.learning.bootstrap import STARTER_DIR
from dicom_node.learning.model_config import abdomen_ct_config
from dicom_node.learning.network import build_model
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.weights import save_model
from dicom_node.phantom.ct import generate_subject
from dicom_node.phantom.dicom import subject_datasets
from dicom_node.pipeline.model_sources import STARTER_MODEL
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.volume import build_volume
from dicom_node.status import node_status
from dicom_node.store.models import Instance, Segmentation, Series
from tests.node.conftest import Orthanc, echoscu, node_config_data, storescu, wait_until


def write_series(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def orthanc_segs(orthanc: Orthanc) -> list[pydicom.Dataset]:
    out = []
    for series in orthanc.get("/series?expand"):
        if series["MainDicomTags"].get("Modality") != "SEG":
            continue
        for iid in series["Instances"]:
            url = f"http://127.0.0.1:{orthanc.http_port}/instances/{iid}/file"
            with urllib.request.urlopen(url, timeout=10) as resp:
                out.append(pydicom.dcmread(io.BytesIO(resp.read())))
    return out


def segment_rule(model: str, *destinations: str, **match: Any) -> dict[str, Any]:
    return {"name": "segment", "action": "segment", "model": model,
            "destinations": list(destinations), "match": match or {"modality": ["CT"]}}


@pytest.mark.slow
def test_phantom_series_is_segmented_and_the_seg_arrives_in_orthanc(
    tmp_path: Path, start_node: Any, orthanc: Orthanc
) -> None:
    if not (STARTER_DIR / "model.safetensors").exists():
        pytest.fail("the starter model is not shipped in dicom_node/learning/starter")
    data = node_config_data(
        tmp_path / "node",
        destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        rules=[segment_rule(STARTER_MODEL, "pacs")])
    node = start_node(data)
    subject = generate_subject("A", 0, seed=7001)
    datasets = subject_datasets(subject)
    files = write_series(datasets, tmp_path / "series")
    result = storescu(node.port, *files)
    assert result.returncode == 0, result.stderr

    segs = wait_until(lambda: orthanc_segs(orthanc), timeout=240, interval=1.0,
                      what="the SEG in Orthanc")
    assert len(segs) == 1
    seg = segs[0]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    _, config = node.parts.models.get(STARTER_MODEL)
    assert seg.SegmentSequence[0].SegmentAlgorithmName == config.name
    volume = build_volume(datasets)
    labels, infos = read_seg_labels(seg, volume, segment_specs(config))
    assert [i.label_name for i in infos] == [s.name for s in segment_specs(config)]
    scores = dice_per_label(labels, subject.labels, config.label_values)
    assert np.mean(list(scores.values())) >= 0.9, scores

    def stored_segmentation() -> Segmentation | None:
        with node.parts.db.session() as s:
            row = s.execute(select(Segmentation)).scalar_one()
            return row if "mean_entropy" in (row.metrics or {}) else None

    # quality metrics follow the SEG's delivery, for the hub's quality model later
    row = wait_until(stored_segmentation, timeout=60, what="the quality metrics")
    with node.parts.db.session() as s:
        series = s.execute(select(Series).where(
            Series.series_uid == str(datasets[0].SeriesInstanceUID))).scalar_one()
        assert series.state == "segmented"
        for key in ("mean_entropy", "uncertain_fraction", "volume_ml.liver",
                    "components.liver", "slice_consistency.liver"):
            assert key in row.metrics
        assert row.metrics["volume_ml.liver"] > 100


@pytest.fixture
def untrained_model(tmp_path: Path) -> Path:
    """A model that loads but was never trained: refusals happen before inference."""
    config = abdomen_ct_config(name="untrained-ct")
    return save_model(build_model(config), config, tmp_path / "untrained.safetensors")


def _refusal_node(tmp_path: Path, start_node: Any, model_path: Path, **match: Any) -> Any:
    data = node_config_data(tmp_path / "node", destinations={
        "nowhere": {"ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}},
        rules=[segment_rule("untrained-ct", "nowhere", **match)])
    data["models"] = {"untrained-ct": str(model_path)}
    return start_node(data)


def _state(node: Any, series_uid: str) -> tuple[str, str | None]:
    with node.parts.db.session() as s:
        row = s.execute(select(Series).where(Series.series_uid == series_uid)).scalar_one()
        return row.state, row.state_reason


@pytest.mark.parametrize("defect", ["missing-slice", "mixed-orientation", "mr-to-ct-model"])
def test_series_that_cannot_be_segmented_is_refused_with_a_reason(
    tmp_path: Path, start_node: Any, untrained_model: Path, defect: str
) -> None:
    match = {"modality": ["CT", "MR"]} if defect == "mr-to-ct-model" else {}
    node = _refusal_node(tmp_path, start_node, untrained_model, **match)
    datasets = subject_datasets(generate_subject("B", 1, seed=7002))[:40]
    if defect == "missing-slice":
        del datasets[20]
    elif defect == "mixed-orientation":
        datasets[10].ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    else:
        for ds in datasets:
            ds.Modality = "MR"
    files = write_series(datasets, tmp_path / "series")
    assert storescu(node.port, *files).returncode == 0
    uid = str(datasets[0].SeriesInstanceUID)
    wait_until(lambda: _state(node, uid)[0] == "refused", timeout=60,
               what="the series to be refused")
    _, reason = _state(node, uid)
    assert reason
    expected = {"missing-slice": "slice", "mixed-orientation": "orientation",
                "mr-to-ct-model": "modality"}[defect]
    assert expected in reason.lower(), reason
    status = node_status(node.parts.db)
    assert any(r["series_uid"] == uid and r["reason"] == reason
               for r in status["refused_series"])
    assert status["events"]["counts"].get("series-refused") == 1
    with node.parts.db.session() as s:
        assert s.execute(select(Segmentation)).first() is None
    assert echoscu(node.port).returncode == 0


def test_rerunning_an_inference_job_makes_no_second_seg(
    tmp_path: Path, start_node: Any, untrained_model: Path
) -> None:
    """At-least-once jobs: a repeated job finds the same SEG (deterministic UIDs)."""
    from dicom_node.pipeline.flow import InferencePayload, enqueue
    from dicom_node.store.models import Instance, JobState

    node = _refusal_node(tmp_path, start_node, untrained_model)
    datasets = subject_datasets(generate_subject("A", 2, seed=7003))[:24]
    files = write_series(datasets, tmp_path / "series")
    assert storescu(node.port, *files).returncode == 0
    uid = str(datasets[0].SeriesInstanceUID)
    wait_until(lambda: _state(node, uid)[0] == "segmented", timeout=120,
               what="the series to be segmented")
    # as if a worker had died after storing the SEG but before recording it, and the
    # job had been handed out again
    with node.parts.db.session() as s:
        s.execute(delete(Segmentation).where(Segmentation.series_uid == uid))
    enqueue(node.parts.queue, InferencePayload(uid, "rerun", "untrained-ct"))
    node.worker.wake()

    def rerun_done() -> bool:
        from dicom_node.store.models import Job

        with node.parts.db.session() as s:
            job = s.execute(select(Job).where(Job.key == f"{uid}:rerun")).scalar_one()
            return job.state == JobState.DONE

    wait_until(rerun_done, timeout=120, what="the repeated job")
    with node.parts.db.session() as s:
        segs = s.execute(select(Instance).where(
            Instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4")).scalars().all()
        rows = s.execute(select(Segmentation)).scalars().all()
    assert len(segs) == 1
    assert len(rows) == 1
    assert rows[0].seg_sop_instance_uid == segs[0].sop_instance_uid
    assert node_status(node.parts.db)["events"]["counts"].get("duplicate-conflict") is None


def test_a_series_that_gains_instances_after_its_seg_is_segmented_again(
    tmp_path: Path, start_node: Any, untrained_model: Path
) -> None:
    """A sender that pauses longer than the quiet period completes the series twice: the
    second completion segments it again from every instance (issue 21's A 0.41), as a new
    instance of the same SEG series; the same series again makes no third SEG."""
    data = node_config_data(tmp_path / "node", rules=[segment_rule("untrained-ct")])
    data["models"] = {"untrained-ct": str(untrained_model)}
    node = start_node(data)
    datasets = subject_datasets(generate_subject("A", 3, seed=7004))[:24]
    files = write_series(datasets, tmp_path / "series")
    uid = str(datasets[0].SeriesInstanceUID)

    def segmentation() -> Segmentation | None:
        with node.parts.db.session() as s:
            row = s.execute(select(Segmentation).where(
                Segmentation.series_uid == uid)).scalar_one_or_none()
            if row is not None:
                s.expunge(row)
            return row

    assert storescu(node.port, *files[:10]).returncode == 0
    first = wait_until(segmentation, timeout=120, what="the SEG of the first 10 slices")
    assert first.metrics["source_instances"] == 10 and first.metrics["revision"] == 0
    assert storescu(node.port, *files[10:]).returncode == 0
    again = wait_until(lambda: (r := segmentation()) is not None
                       and r.metrics.get("source_instances") == 24 and r, timeout=120,
                       what="the series segmented again from all 24 slices")
    assert again.metrics["revision"] == 1
    assert again.seg_series_uid == first.seg_series_uid
    assert again.seg_sop_instance_uid != first.seg_sop_instance_uid
    with node.parts.db.session() as s:
        segs = {i.sop_instance_uid: i.path for i in s.execute(select(Instance).where(
            Instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4")).scalars()}
    assert set(segs) == {first.seg_sop_instance_uid, again.seg_sop_instance_uid}
    seg = pydicom.dcmread(node.parts.files.absolute(segs[again.seg_sop_instance_uid]))
    assert int(seg.NumberOfFrames) >= 1
    referenced = {r.ReferencedSOPInstanceUID for r in
                  seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(d.SOPInstanceUID) for d in datasets}

    # Sent once more (duplicates): nothing gained, no third SEG.
    assert storescu(node.port, *files[:3]).returncode == 0
    wait_until(lambda: _state(node, uid)[0] == "segmented", timeout=60, what="settled")
    with node.parts.db.session() as s:
        assert len(s.execute(select(Instance).where(
            Instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4")).scalars().all()) == 2
