"""Multi-frame input: Legacy Converted Enhanced CT (highdicom.legacy) and pydicom-data's
enhanced CT/MR become volumes like single-frame series, their SEG references the
source frames and passes dciodvfy; frames that are no regular grid are refused."""

from __future__ import annotations

import copy
import io
import json
import random
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.errors import SeriesRefused
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.phantom.nifti import read_nifti
from dicom_node.pipeline.seg import SegAlgorithm, build_seg
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.seg_template import SegTemplate
from dicom_node.pipeline.volume import build_volume
from tests.corrections.helpers import JS_DIR, Study
from tests.peers import missing, require_binary, venv_tool

MODEL = SegAlgorithm("tessera-abdomen-unet", generation=3)


def legacy_enhanced_ct(datasets: list[Dataset]) -> Dataset:
    """The single-frame series as one Legacy Converted Enhanced CT, read back from bytes."""
    shuffled = list(datasets)
    random.Random(5).shuffle(shuffled)  # the converter keeps its own frame order
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        shuffled, series_instance_uid=hd.UID(), series_number=3,
        sop_instance_uid=hd.UID(), instance_number=1)
    buf = io.BytesIO()
    image.save_as(buf)
    buf.seek(0)
    return pydicom.dcmread(buf)


@pytest.fixture(scope="module")
def study() -> Study:
    return Study("B", 0, seed=7300, slices=10)


@pytest.fixture(scope="module")
def enhanced(study: Study) -> Dataset:
    return legacy_enhanced_ct(study.datasets)


def test_legacy_enhanced_ct_is_the_volume_of_its_single_frame_series(
    study: Study, enhanced: Dataset
) -> None:
    volume, single = build_volume([enhanced], allowed_modalities={"CT"}), study.volume()
    np.testing.assert_allclose(volume.affine, single.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.pixels, single.pixels)  # HU, same slice order
    assert sorted(volume.frame_numbers) == list(range(1, len(study.datasets) + 1))
    assert volume.sop_instance_uids == (str(enhanced.SOPInstanceUID),) * volume.shape[0]
    frames = enhanced.PerFrameFunctionalGroupsSequence
    for k, n in enumerate(volume.frame_numbers):
        ipp = [float(v) for v in frames[n - 1].PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, volume.positions[k], atol=1e-4)


def test_seg_of_a_multi_frame_source_references_its_frames_and_passes_dciodvfy(
    study: Study, enhanced: Dataset, tmp_path: Path
) -> None:
    volume = build_volume([enhanced])
    labels = study.truth_in_volume_order()
    seg = build_seg(volume, labels, CT_SEGMENTS, MODEL)
    uid = str(enhanced.SOPInstanceUID)
    slice_of = {n: k for k, n in enumerate(volume.frame_numbers)}
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == uid
        k = slice_of[int(source.ReferencedFrameNumber)]
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, volume.positions[k], atol=1e-4)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    result = subprocess.run([require_binary("dciodvfy"), "-new", str(path)],
                            capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.returncode == 0 and not errors, result.stderr[-3000:]
    back, _ = read_seg_labels(pydicom.dcmread(path), volume, CT_SEGMENTS)
    np.testing.assert_array_equal(back, labels)
    # the inference job's pre-encoded template gives the same frames
    filled = pydicom.dcmread(io.BytesIO(SegTemplate.prepare(volume, CT_SEGMENTS, MODEL)
                                        .fill(labels)))
    np.testing.assert_array_equal(read_seg_labels(filled, volume, CT_SEGMENTS)[0], labels)


def test_pydicom_data_enhanced_ct_is_a_volume() -> None:
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    volume = build_volume([ds], allowed_modalities={"CT"})
    assert volume.shape == (2, 512, 512)
    assert volume.spacing[0] == pytest.approx(10.0)
    assert volume.pixels.min() == pytest.approx(-1024.0)  # rescaled to HU


def test_enhanced_mr_without_frame_geometry_is_refused() -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    with pytest.raises(SeriesRefused, match="no per-frame functional groups"):
        build_volume([ds])


def _broken(enhanced: Dataset, how: str) -> Dataset:
    ds = copy.deepcopy(enhanced)
    frames = ds.PerFrameFunctionalGroupsSequence
    if how == "missing position":
        del frames[3].PlanePositionSequence
    elif how == "duplicate position":
        frames[3].PlanePositionSequence = copy.deepcopy(frames[4].PlanePositionSequence)
    elif how == "frame off the grid":  # leaves a gap where it was
        frames[3].PlanePositionSequence[0].ImagePositionPatient[2] += 40.0
    return ds


@pytest.mark.parametrize(("how", "reason"), [
    ("missing position", "frame 4 has no plane position"),
    ("duplicate position", "two frames share one slice position"),
    ("frame off the grid", "missing slice"),
])
def test_frames_that_are_no_regular_grid_are_refused(enhanced: Dataset, how: str,
                                                      reason: str) -> None:
    with pytest.raises(SeriesRefused, match=reason):
        build_volume([_broken(enhanced, how)])


def test_dcmqi_and_dcmjs_read_the_seg_of_a_multi_frame_source(
    study: Study, enhanced: Dataset, tmp_path: Path
) -> None:
    volume = build_volume([enhanced])
    labels = study.truth_in_volume_order()
    path = tmp_path / "seg.dcm"
    build_seg(volume, labels, CT_SEGMENTS, MODEL).save_as(path, enforce_file_format=True)
    subprocess.run([venv_tool("segimage2itkimage"), "--inputDICOM", str(path),
                    "--outputDirectory", str(tmp_path), "--outputType", "nifti"],
                   capture_output=True, text=True, check=True)
    for number, spec in enumerate(CT_SEGMENTS, start=1):
        mask = read_nifti(tmp_path / f"{number}.nii.gz").data > 0
        assert int(mask.sum()) == int((labels == spec.label).sum()), spec.name
    node = require_binary("node")
    if not (JS_DIR / "node_modules" / "dcmjs").is_dir():
        missing("dcmjs is not installed: run `make js`")
    parsed = json.loads(subprocess.run([node, str(JS_DIR / "parse_seg.js"), str(path)],
                                       capture_output=True, text=True, check=True).stdout)
    assert {f["referencedSOPInstanceUID"] for f in parsed["frames"]} == {
        str(enhanced.SOPInstanceUID)}
    for number, spec in enumerate(CT_SEGMENTS, start=1):
        assert parsed["voxelsPerSegment"][str(number)] == int((labels == spec.label).sum())
