"""The learning loop end to end, with real peers:

storescu -> node -> AI SEG; a radiologist's SEG (another vendor, own UIDs, other segment
order) -> storescu -R -> correction with per-label Dice -> training -> new version
served -> the next study of that site is segmented by it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.learning import optimiser_state
from dicom_node.learning.safetensors_io import read_metadata
from dicom_node.learning.scores import dice_per_label
from dicom_node.learning.weights import arrays_from_bytes, group_of
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.versions import list_versions
from dicom_node.status import node_status, render_status
from dicom_node.store.models import TrainingSample, UpdateOutboxItem
from tests.corrections.helpers import (
    TEST_MODEL,
    TUMOUR,
    Study,
    correction_for,
    dcmqi_seg,
    learning_section,
    radiologist_seg,
    segment_rule,
    segmentation_of,
    stored_dataset,
    tiny_model,
    versions,
)
from tests.node.conftest import (
    echoscu,
    node_config_data,
    storescu,
    tessera,
    wait_swapped,
    wait_until,
)


def _node(tmp_path: Path, start_node: Any, monai_encoder: bool = False,
          **learning: Any) -> Any:
    data = node_config_data(tmp_path / "node", rules=[segment_rule()],
                            learning=learning_section(**learning))
    data["models"] = {TEST_MODEL: str(tiny_model(tmp_path, monai_encoder=monai_encoder))}
    return start_node(data)


def _send_and_segment(node: Any, study: Study, folder: Path, generation: int) -> Any:
    assert storescu(node.port, *study.write(folder)).returncode == 0
    return wait_until(lambda: segmentation_of(node, study.series_uid, generation),
                      timeout=120, what=f"generation {generation} segmentation")


def _expected_dice(node: Any, study: Study, ai_sop_uid: str, corrected: np.ndarray,
                   ) -> dict[str, float]:
    """Dice AI vs corrected computed here, from the AI SEG as stored by the node."""
    _, config = node.parts.models.get(TEST_MODEL)
    ai, _ = read_seg_labels(stored_dataset(node, ai_sop_uid), study.volume(),
                            segment_specs(config))
    return dice_per_label(ai, corrected, config.label_values)


def _cli(*args: str) -> str:
    result = tessera(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _algorithm_version(seg: pydicom.Dataset) -> str:
    item = seg.SegmentSequence[0]
    return str(item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion)


def _moments_generation(path: Path) -> str | None:
    """The generation whose round wrote the node's Adam moments (written after the
    version row commits)."""
    return read_metadata(path.read_bytes()).get("generation") if path.exists() else None


@pytest.mark.slow
def test_a_monai_encoder_with_heads_serves_learns_a_liver_only_correction_and_sends_its_groups(
    tmp_path: Path, start_node: Any
) -> None:
    """A model whose encoder is a MONAI UNet (``monai-heads:UNet``), end to end: it
    segments a study into a SEG, a radiologist's liver-only correction (a site that
    annotates the liver alone) trains the encoder and ``heads.liver`` only, the update
    carries exactly those groups, and the next study is segmented by the new version."""
    node = _node(tmp_path, start_node, monai_encoder=True, annotated_labels=["liver"])
    assert node.parts.models.get(TEST_MODEL)[1].architecture == "monai-heads:UNet"
    first = Study("B", 0, seed=7310)
    _send_and_segment(node, first, tmp_path / "s1", generation=0)
    seg_path, _ = radiologist_seg(first, tmp_path / "corr1" / "seg.dcm")
    sent = pydicom.dcmread(seg_path)
    assert storescu(node.port, seg_path, options=("-R",)).returncode == 0
    corr = wait_until(lambda: correction_for(node, str(sent.SOPInstanceUID)), timeout=60,
                      what="the correction")
    assert corr.state == "recorded", corr.reason
    wait_until(lambda: [v for v in versions(node) if v.generation == 1 and v.state == "serving"],
               timeout=120, what="generation 1 serving")
    with node.parts.db.session() as s:
        item = s.execute(select(UpdateOutboxItem)).scalar_one()
    arrays, meta = arrays_from_bytes(Path(item.path).read_bytes())
    assert {group_of(name) for name in arrays} == {"encoder", "heads.liver"}
    assert all(name.startswith(("encoder.network.", "heads.liver.")) for name in arrays)
    assert json.loads(meta["trained_groups"]) == ["encoder", "heads.liver"]
    second = Study("B", 1, seed=7310)
    ai2 = _send_and_segment(node, second, tmp_path / "s2", generation=1)
    assert _algorithm_version(stored_dataset(node, ai2.seg_sop_instance_uid)) == "1"


def test_correction_trains_a_new_version_that_serves_the_next_study(
    tmp_path: Path, start_node: Any
) -> None:
    node = _node(tmp_path, start_node)
    first = Study("B", 0, seed=7300)
    ai = _send_and_segment(node, first, tmp_path / "s1", generation=0)

    seg_path, written = radiologist_seg(first, tmp_path / "corr1" / "seg.dcm")
    sent = pydicom.dcmread(seg_path)
    assert sent.SOPInstanceUID != ai.seg_sop_instance_uid
    assert storescu(node.port, seg_path, options=("-R",)).returncode == 0

    corr = wait_until(lambda: correction_for(node, str(sent.SOPInstanceUID)), timeout=60,
                      what="the correction")
    assert corr.state == "recorded", corr.reason
    assert corr.source_series_uid == first.series_uid
    assert corr.ai_generation == 0
    assert corr.unknown_segments == ["6:lesion"]  # kept, reported, not trained
    # the lesion is no model label: its voxels are background for the model's labels
    corrected = np.where(written == TUMOUR.label, 0, written)
    expected = _expected_dice(node, first, ai.seg_sop_instance_uid, corrected)
    for name, value in expected.items():
        assert corr.dice[name] == pytest.approx(value, abs=1e-6), name
    assert corr.changed_slices and corr.delay_s is not None and corr.delay_s >= 0

    gen1 = wait_until(lambda: [v for v in versions(node)
                               if v.generation == 1 and v.state == "serving"],
                      timeout=120, what="generation 1 serving")[0]
    assert gen1.parent_generation == 0 and gen1.samples == 1 and gen1.origin == "local"
    wait_swapped(node, TEST_MODEL, 1)
    assert node.parts.models.get(TEST_MODEL)[1].generation == 1
    with node.parts.db.session() as s:
        sample = s.execute(select(TrainingSample)).scalar_one()
        assert sample.state == "trained" and sample.trained_generation == 1
        assert "lesion" not in sample.annotated
        item = s.execute(select(UpdateOutboxItem)).scalar_one()
    arrays, meta = arrays_from_bytes(Path(item.path).read_bytes())
    assert meta["base_generation"] == "0" and meta["num_samples"] == "1"
    assert any(k.startswith("encoder.") for k in arrays)
    assert Path(item.path).with_suffix(".json").exists()
    # Adam's moments stay on the node for the next round (never in the update)
    moments_file = tmp_path / "node" / "optimiser" / f"{TEST_MODEL}.safetensors"
    wait_until(lambda: _moments_generation(moments_file) == "1", timeout=30,
               what="the moments of generation 1")
    first_moments = optimiser_state.load(moments_file)
    step_key = next(k for k in first_moments if k.startswith("encoder.") and k.endswith("::step"))
    assert float(first_moments[step_key]) == gen1.metrics["training"]["steps"]
    assert not any("::" in k for k in arrays)

    # The next study of that site is segmented by the new version, without a restart.
    second = Study("B", 1, seed=7300)
    ai2 = _send_and_segment(node, second, tmp_path / "s2", generation=1)
    assert _algorithm_version(stored_dataset(node, ai2.seg_sop_instance_uid)) == "1"

    # The same study corrected with a SEG written by dcmqi: recorded with the right Dice.
    dq = dcmqi_seg(second, tmp_path / "s2", tmp_path / "corr2" / "dcmqi-seg.dcm")
    dq_ds = pydicom.dcmread(dq)
    assert storescu(node.port, dq, options=("-R",)).returncode == 0
    corr2 = wait_until(lambda: correction_for(node, str(dq_ds.SOPInstanceUID)), timeout=60,
                       what="the dcmqi correction")
    assert corr2.state == "recorded", corr2.reason
    assert corr2.ai_generation == 1
    expected2 = _expected_dice(node, second, ai2.seg_sop_instance_uid,
                               second.truth_in_volume_order())
    for name, value in expected2.items():
        assert corr2.dice[name] == pytest.approx(value, abs=1e-6), name

    # A second round (with the first sample as replay) serves generation 2; the
    # operator rolls back with the CLI and the running node follows without a restart.
    gen2 = wait_until(lambda: [v for v in versions(node)
                               if v.generation == 2 and v.state == "serving"],
                      timeout=120, what="generation 2 serving")[0]
    # the second round continued the first round's moments
    wait_until(lambda: _moments_generation(moments_file) == "2", timeout=30,
               what="the moments of generation 2")
    second_moments = optimiser_state.load(moments_file)
    assert float(second_moments[step_key]) == (float(first_moments[step_key])
                                               + gen2.metrics["training"]["steps"])
    config_file = tmp_path / "node-0.toml"
    listed = json.loads(_cli("model", "list-versions", "--config", str(config_file), "--json"))
    assert [(v["generation"], v["state"]) for v in listed] == [
        (0, "retired"), (1, "retired"), (2, "serving")]
    assert listed[2]["parent"] == 1 and listed[2]["samples"] == 1
    assert "generation 1 serves (was 2)" in _cli("model", "rollback", TEST_MODEL,
                                                 "--config", str(config_file))
    wait_until(lambda: node.parts.models.get(TEST_MODEL)[1].generation == 1, timeout=30,
               what="the node to serve generation 1 again")
    assert [v["state"] for v in list_versions(node.parts.db, TEST_MODEL)] == [
        "retired", "serving", "retired"]
    status = node_status(node.parts.db)
    learning = status["learning"]
    assert sum(sum(d.values()) for d in learning["corrections_per_day"].values()) == 2
    assert "liver" in next(iter(learning["dice_per_day"].values()))
    assert "Corrections per day" in render_status(status)
    assert echoscu(node.port).returncode == 0

