"""A multi-frame study end to end: a Legacy Converted Enhanced CT (highdicom.legacy) sent
by a pynetdicom AE is segmented; the node's SEG references the source frames and passes
dciodvfy; a Label Map SEG drawn on the multi-frame source is a correction with the
right Dice. A multi-frame instance whose frames are no regular grid is refused with
its reason, and stays stored."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless
from sqlalchemy import select

from dicom_node.learning.scores import dice_per_label
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.pipeline.volume import build_volume
from dicom_node.status import node_status, render_status
from dicom_node.store.models import Instance, Series
from tests.corrections.helpers import (
    TEST_MODEL,
    Study,
    correction_for,
    highdicom_seg,
    learning_section,
    segment_rule,
    segmentation_of,
    store_with_pynetdicom,
    stored_dataset,
    tiny_model,
)
from tests.node.conftest import echoscu, node_config_data, wait_until
from tests.peers import require_binary
from tests.pipeline.test_multiframe import legacy_enhanced_ct


def _series_state(node: Any, series_uid: str) -> tuple[str, str | None] | None:
    with node.parts.db.session() as s:
        row = s.execute(select(Series.state, Series.state_reason).where(
            Series.series_uid == series_uid)).first()
    return (row[0], row[1]) if row is not None else None


@pytest.mark.slow
def test_multi_frame_ct_is_segmented_and_corrected(tmp_path: Path, start_node: Any) -> None:
    data = node_config_data(tmp_path / "node", rules=[segment_rule()],
                            learning=learning_section(enabled=False))
    data["models"] = {TEST_MODEL: str(tiny_model(tmp_path))}
    node = start_node(data)
    study = Study("B", 5, seed=7800, slices=16)
    enhanced = legacy_enhanced_ct(study.datasets)
    source = tmp_path / "enhanced.dcm"
    enhanced.save_as(source, enforce_file_format=True)
    bad = copy.deepcopy(enhanced)
    bad.SeriesInstanceUID = pydicom.uid.generate_uid()
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    frames = bad.PerFrameFunctionalGroupsSequence
    frames[2].PlanePositionSequence = copy.deepcopy(frames[5].PlanePositionSequence)
    bad_path = tmp_path / "bad-enhanced.dcm"
    bad.save_as(bad_path, enforce_file_format=True)
    assert store_with_pynetdicom(node.port, source, bad_path) == [0, 0]

    series_uid = str(enhanced.SeriesInstanceUID)
    ai = wait_until(lambda: segmentation_of(node, series_uid), timeout=120,
                    what="the AI segmentation of the multi-frame CT")
    refused = wait_until(lambda: (lambda st: st if st and st[0] == "refused" else None)(
        _series_state(node, str(bad.SeriesInstanceUID))), timeout=60,
        what="the irregular multi-frame series refused")
    assert "two frames share one slice position" in (refused[1] or "")
    assert "two frames share one slice position" in render_status(node_status(node.parts.db))

    ai_seg = stored_dataset(node, ai.seg_sop_instance_uid)
    volume = build_volume([enhanced])
    refs = {(str(src.ReferencedSOPInstanceUID), int(src.ReferencedFrameNumber))
            for item in ai_seg.PerFrameFunctionalGroupsSequence
            for src in item.DerivationImageSequence[0].SourceImageSequence}
    assert refs == set(volume.source_frames)
    ai_path = tmp_path / "ai.dcm"
    ai_seg.save_as(ai_path, enforce_file_format=True)
    check = subprocess.run([require_binary("dciodvfy"), "-new", str(ai_path)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "\nError" not in "\n" + check.stderr, check.stderr[-3000:]

    # the radiologist's Label Map SEG, drawn on the multi-frame source (frames in source
    # order), back by C-STORE
    truth = study.truth_in_volume_order()
    in_source_order = np.zeros_like(truth)
    in_source_order[np.asarray(volume.frame_numbers) - 1] = truth
    seg = highdicom_seg(volume, in_source_order, CT_SEGMENTS, "LABELMAP", RLELossless)
    seg_path = tmp_path / "correction.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    assert store_with_pynetdicom(node.port, seg_path) == [0]
    corr = wait_until(lambda: correction_for(node, str(seg.SOPInstanceUID)), timeout=60,
                      what="the correction")
    assert corr.state == "recorded", corr.reason
    specs = segment_specs(node.parts.models.get(TEST_MODEL)[1])
    ai_labels, _ = read_seg_labels(ai_seg, volume, specs)
    expected = dice_per_label(ai_labels, truth, {s.name: s.label for s in specs})
    assert corr.dice == pytest.approx(expected, abs=1e-6)
    assert corr.changed_slices

    with node.parts.db.session() as s:
        stored = set(s.execute(select(Instance.sop_instance_uid)).scalars())
    assert {str(enhanced.SOPInstanceUID), str(bad.SOPInstanceUID)} <= stored
    assert echoscu(node.port).returncode == 0
