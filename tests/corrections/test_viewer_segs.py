"""SEGs as real viewers and tools save them are corrections, or are flagged with a reason.

One node (no training: the correction records are what is checked) segments a phantom
study; then, by C-STORE from a pynetdicom AE (dcmtk 3.6.7 cannot send Label Map SEG)
and by DICOMweb STOW-RS:

- a Label Map SEG in RLE Lossless (highdicom), kidneys coded Kidney + laterality;
- a Label Map SEG coded as OHIF codes it: every segment "Tissue" (SRT T-D0050) with a
  typed label, RLE Lossless, one typed label ("lesion") that is no model label (written
  by highdicom: OHIF 3.12's label map writer is @cornerstonejs/adapters, not in tests/js);
- a SEG written by dcmjs's Cornerstone adapter (OHIF's older save path) with the same
  "Tissue" coding, RLE (FRACTIONAL with 0/1 values, as dcmjs writes it);
- dcmqi's ``itkimage2segimage --segmentationType labelmap`` with Kidney + laterality
  codes and Slicer's generic segment names;
- malformed: a label map with pixel values above its segment count, frames that point
  at unknown source instances, a label map of a series the node does not know, RLE
  frames that do not decode.

Each usable one is recorded with per-label Dice against the AI result; each unusable
one is flagged with its reason, in ``tessera node status`` (text and JSON) and in the
log at WARNING; every instance stays stored and the node keeps serving.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.sr.coding import Code
from pydicom.uid import RLELossless, generate_uid
from sqlalchemy import select

from dicom_node.learning.scores import dice_per_label
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.pipeline.seg import SegmentSpec
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.segmentation import segment_specs
from dicom_node.store.models import Correction, Instance
from tests.corrections.helpers import (
    TEST_MODEL,
    Study,
    dcmjs_seg,
    dcmqi_seg,
    highdicom_seg,
    segment_rule,
    store_with_pynetdicom,
    stored_dataset,
    tiny_model,
)
from tests.node.conftest import echoscu, storescu, tessera, wait_until
from tests.viewer.conftest import ai_segmentation, start_bridge_node

TISSUE = Code("T-D0050", "SRT", "Tissue")
LESION = 6


def _ohif_specs() -> list[SegmentSpec]:
    """OHIF's coding: "Tissue" for every segment, only the typed label differs."""
    typed = ["Body", "Liver", "Spleen", "Left kidney", "right_kidney", "lesion"]
    return [SegmentSpec(n, name, TISSUE, TISSUE, (50.0, 0.0, 0.0))
            for n, name in enumerate(typed, start=1)]


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _corrections(node: Any) -> dict[str, Correction]:
    with node.parts.db.session() as s:
        return {c.seg_sop_instance_uid: c for c in s.execute(select(Correction)).scalars()}


@pytest.mark.slow
def test_viewer_segs_are_corrections_or_flagged_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node")
    bridge = start_bridge_node(tmp_path, rules=[segment_rule()],
                               models={TEST_MODEL: str(tiny_model(tmp_path))})
    node = bridge.node
    try:
        study = Study("B", 2, seed=7700, slices=24)
        sources = study.write(tmp_path / "study")
        assert storescu(node.port, *sources).returncode == 0
        ai = wait_until(lambda: ai_segmentation(node, study.series_uid), timeout=120,
                        what="the AI segmentation")
        volume, truth = study.volume(), study.truth_in_volume_order()

        segs: dict[str, Path] = {}
        segs["labelmap rle"] = _save(highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP",
                                                   RLELossless), tmp_path / "lm-rle.dcm")
        ohif = truth.copy()
        ohif[(truth == 2) & (np.indices(truth.shape)[1] % 9 == 0)] = LESION
        ohif_seg = highdicom_seg(volume, ohif, _ohif_specs(), "LABELMAP", RLELossless)
        segs["dcmjs rle"] = dcmjs_seg(study, sources, truth, [s.name for s in _ohif_specs()],
                                      tmp_path / "dcmjs.dcm")
        segs["dcmqi labelmap"] = dcmqi_seg(study, tmp_path / "study", tmp_path / "dcmqi.dcm",
                                           segmentation_type="labelmap", generic_labels=True)
        bad = highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP")
        pixels = bad.pixel_array.copy()
        pixels[3, :6, :6] = 9
        bad.PixelData = pixels.tobytes()
        segs["values above"] = _save(bad, tmp_path / "bad-values.dcm")
        stray = highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP")
        stray.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]\
            .SourceImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
        segs["unknown instances"] = _save(stray, tmp_path / "bad-refs.dcm")
        other = highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP")
        other.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
        segs["unknown series"] = _save(other, tmp_path / "bad-series.dcm")
        broken = highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP", RLELossless)
        frames = [b"".join(f) for f in generate_fragmented_frames(
            broken.PixelData, number_of_frames=int(broken.NumberOfFrames))]
        frames[2] = frames[2][:64] + bytes(len(frames[2]) - 64)  # RLE segments lie
        broken.PixelData = encapsulate(frames)
        segs["unreadable"] = _save(broken, tmp_path / "bad-pixels.dcm")
        uids = {k: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for k, p in segs.items()}
        uids["ohif stow"] = str(ohif_seg.SOPInstanceUID)

        assert store_with_pynetdicom(node.port, *segs.values()) == [0] * len(segs)
        stow = bridge.client().store_instances([ohif_seg])
        assert len(stow.ReferencedSOPSequence) == 1

        found = wait_until(
            lambda: (lambda c: c if set(uids.values()) <= set(c) else None)(_corrections(node)),
            timeout=90, what="every SEG decided")
        corr = {k: found[u] for k, u in uids.items()}

        # usable: recorded with the Dice of the AI result against the correction
        specs = segment_specs(node.parts.models.get(TEST_MODEL)[1])
        ai_labels, _ = read_seg_labels(stored_dataset(node, ai.seg_sop_instance_uid),
                                       volume, specs)
        values = {s.name: s.label for s in specs}
        for name, corrected in (("labelmap rle", truth), ("dcmqi labelmap", truth),
                                ("dcmjs rle", truth),
                                ("ohif stow", np.where(ohif == LESION, 0, ohif))):
            c = corr[name]
            assert c.state == "recorded", (name, c.reason)
            assert sorted(c.labels) == sorted(values), name  # every label mapped
            expected = dice_per_label(ai_labels, corrected, values)
            for label, value in expected.items():
                assert c.dice[label] == pytest.approx(value, abs=1e-6), (name, label)
            assert c.changed_slices, name
        assert corr["ohif stow"].unknown_segments == ["6:lesion"]
        assert corr["labelmap rle"].unknown_segments == []
        assert corr["dcmqi labelmap"].unknown_segments == []
        assert corr["dcmjs rle"].unknown_segments == ["6:lesion"]  # declared, never drawn

        # unusable: flagged, with the reason
        reasons = {"values above": "pixel values (9)", "unknown instances": "not in series",
                   "unknown series": "unknown to the node",
                   "unreadable": "pixel data cannot be read"}
        for name, words in reasons.items():
            assert corr[name].state == "flagged", (name, corr[name].state)
            assert words in (corr[name].reason or ""), (name, corr[name].reason)
            assert any(r.levelno == logging.WARNING and uids[name] in r.getMessage()
                       for r in caplog.records), name

        config = tmp_path / "node.toml"
        text = tessera("node", "status", "--config", str(config))
        assert text.returncode == 0, text.stderr
        for name, words in reasons.items():
            assert words in text.stdout, (name, text.stdout[-3000:])
        assert "segments matching no model label (not trained on): 6:lesion" in text.stdout
        as_json = tessera("node", "status", "--config", str(config), "--json")
        recent = json.loads(as_json.stdout)["learning"]["recent_corrections"]
        assert {c["reason"] for c in recent if c["state"] == "flagged"} == {
            corr[n].reason for n in reasons}
        assert ["6:lesion"] in [c["unknown_segments"] for c in recent]

        # nothing lost, the node keeps serving
        with node.parts.db.session() as s:
            stored = set(s.execute(select(Instance.sop_instance_uid)).scalars())
        assert set(uids.values()) <= stored
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()
