"""An imported MONAI 3D network serves, learns from a radiologist's correction and
refuses bad ones, end to end through the SCP into a real Orthanc (issue 23).

The node keeps the whole corrected volume as the sample (with its spacing and affine),
trains a copy of the network on it (MONAI Dice-CE, random 3D windows), judges it on a
held-out volume with the sliding-window segmentation the inference job uses, serves it
and puts an update of the one group ``network`` in the outbox.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from safetensors.numpy import load_file
from sqlalchemy import func, select

from dicom_node.config import load_config
from dicom_node.learning.volume_samples import decode_volume_sample
from dicom_node.node import Node
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.pipeline.trainer import IncrementalTrainer
from dicom_node.pipeline.volume import build_volume
from dicom_node.store.models import (
    AuditEvent,
    Instance,
    ModelVersion,
    TrainingSample,
    UpdateOutboxItem,
)
from dicom_node.worker import PermanentJobError
from tests.corrections.external_model import (
    EXTERNAL_MODEL,
    MODEL_VALUES,
    add_volume_sample,
    imported_monai_model,
    in_model_values,
    node_models,
    segmenting_node_data,
)
from tests.corrections.helpers import (
    Study,
    correction_for,
    half_matrix,
    learning_section,
    radiologist_seg,
    versions,
)
from tests.node.conftest import (  # noqa: F401 - orthanc is a pytest fixture
    Orthanc,
    node_config_data,
    orthanc,
    storescu,
    wait_swapped,
    wait_until,
    write_node_config,
)
from tests.node.test_segmentation import orthanc_segs, segment_rule

KIDNEY = [s for s in CT_SEGMENTS if s.name == "kidney_left"]
LIVER = [s for s in CT_SEGMENTS if s.name == "liver"]


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.slow
def test_a_monai_3d_model_serves_learns_from_a_correction_and_refuses_bad_ones(
        tmp_path: Path, start_node: Any, orthanc: Orthanc) -> None:  # noqa: F811
    node = start_node(segmenting_node_data(tmp_path / "node", orthanc.dicom_port,
                                           imported_monai_model(tmp_path)))
    study = Study("B", 0, seed=7400, slices=24)
    # a held-out case the round is judged on (another series of the same subject)
    add_volume_sample(node.parts.db, tmp_path / "node", study, "held-out",
                      series_uid=f"2.25.{uuid.uuid4().int}")

    assert storescu(node.port, *study.write(tmp_path / "study")).returncode == 0
    [ai_seg] = wait_until(lambda: orthanc_segs(orthanc), timeout=120, interval=0.5,
                          what="the AI SEG in Orthanc")
    assert {str(s.SegmentLabel) for s in ai_seg.SegmentSequence} <= {"liver", "spleen"}

    seg_path, drawn = radiologist_seg(study, tmp_path / "corr" / "seg.dcm")
    assert storescu(node.port, seg_path, options=("-R",)).returncode == 0
    version = wait_until(lambda: next((v for v in versions(node) if v.origin == "local"),
                                      None), timeout=120, what="a round of the MONAI model")
    assert (version.generation, version.state, version.parent_generation) == (1, "serving", 0)
    wait_swapped(node, EXTERNAL_MODEL, 1)  # hot swapped
    metrics = version.metrics
    assert metrics["trained_groups"] == ["network"]
    held = metrics["held_out"]
    assert held["cases"] == 1 and {"liver", "spleen", "mean"} <= set(held["candidate"])
    assert set(held["base"]) == set(held["candidate"])
    assert metrics["training"]["volumes"] == 1 and metrics["training"]["steps"] >= 1
    assert any("distill_weight" in note for note in metrics["training"]["left_out"])

    # the sample is the whole corrected volume, in the model's label values
    volume = study.volume()
    with node.parts.db.session() as s:
        row = s.execute(select(TrainingSample).where(
            TrainingSample.state == "trained")).scalar_one()
    sample = decode_volume_sample((tmp_path / "node" / row.path).read_bytes())
    assert sample.image.shape == volume.shape == sample.labels.shape
    assert row.slices == volume.shape[0]
    np.testing.assert_array_equal(sample.image, volume.pixels)
    np.testing.assert_array_equal(sample.labels, in_model_values(drawn))
    np.testing.assert_allclose(sample.affine, volume.affine)
    assert sample.spacing == volume.spacing and sample.annotated == set(MODEL_VALUES)

    # the update: the one group "network", the weights the node now serves
    with node.parts.db.session() as s:
        item = s.execute(select(UpdateOutboxItem)).scalar_one()
    assert json.loads(item.meta["trained_groups"]) == ["network"]
    tensors = load_file(item.path)
    served = node.parts.models.get(EXTERNAL_MODEL)[0].state_dict()
    assert set(tensors) == set(served) and all(k.startswith("network.") for k in tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, served[name].numpy())

    _bad_corrections_lose_nothing(node, study, tmp_path / "bad")


def _bad_corrections_lose_nothing(node: Any, study: Study, folder: Path) -> None:
    """A SEG on other geometry, and one of a structure the model lacks: flagged with the
    reason, stored, no sample, the served version and the earlier sample untouched."""
    truth = study.truth_in_volume_order()
    small = build_volume(half_matrix(study))
    bad = {
        "frame size": radiologist_seg(study, folder / "1.dcm", specs=LIVER,
                                      labels=truth[:, ::2, ::2], volume=small,
                                      author="r1")[0],
        "no segment matches a model label": radiologist_seg(
            study, folder / "2.dcm", specs=KIDNEY, labels=truth, author="r2")[0],
    }
    for path in bad.values():
        assert storescu(node.port, path, options=("-R",)).returncode == 0
    uids = {reason: _sop_uid(path) for reason, path in bad.items()}
    for reason, uid in uids.items():
        corr = wait_until(lambda u=uid: correction_for(node, u), timeout=60,
                          what=f"the correction {reason!r} decided")
        assert corr.state == "flagged" and reason in (corr.reason or ""), corr.reason
    with node.parts.db.session() as s:
        assert s.execute(select(func.count()).select_from(TrainingSample)).scalar_one() == 2
        assert {str(st) for st in s.execute(select(TrainingSample.state)).scalars()} == {
            "trained", "held-out"}
        flagged = set(s.execute(select(AuditEvent.sop_instance_uid).where(
            AuditEvent.kind == "correction-flagged")).scalars())
        assert flagged == set(uids.values())
        assert set(uids.values()) <= set(s.execute(select(Instance.sop_instance_uid)).scalars())
        serving = s.execute(select(ModelVersion.generation).where(
            ModelVersion.state == "serving")).scalars().all()
    assert serving == [1]


def test_a_round_with_head_settings_on_an_external_model_is_refused_with_the_reason(
        tmp_path: Path) -> None:
    """Distillation written in [learning.round] needs separate heads: the round is
    refused for good (dead-lettered at once), the pending sample stays for the next."""
    data = node_config_data(tmp_path / "node", rules=[segment_rule(EXTERNAL_MODEL)],
                            learning=learning_section(round={
                                "epochs": 1, "batch_size": 8, "time_budget_s": 30,
                                "distill_weight": 5.0}))
    node_models(data, imported_monai_model(tmp_path))
    node = Node(load_config(write_node_config(tmp_path / "node.toml", data), env={}))
    try:
        sample_id = add_volume_sample(node.parts.db, tmp_path / "node",
                                      Study("B", 0, seed=7400, slices=8), "pending")
        trainer = next(h for h in node.parts.handlers if isinstance(h, IncrementalTrainer))
        with pytest.raises(PermanentJobError,
                           match=r"distill_weight = 5 needs a network with heads"):
            trainer.train(EXTERNAL_MODEL)
        with node.parts.db.session() as s:
            assert s.get(TrainingSample, sample_id).state == "pending"
            assert s.execute(select(ModelVersion).where(
                ModelVersion.origin == "local")).first() is None
            assert s.execute(select(UpdateOutboxItem)).first() is None
    finally:
        node.parts.db.dispose()
