"""DICOM-SEG from a label volume: geometry, round trip, and what real readers make of it."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset

from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.phantom.dicom import ground_truth_seg
from dicom_node.phantom.nifti import read_nifti
from dicom_node.phantom.subject import PhantomSubject
from dicom_node.pipeline.seg import (
    AI_SERIES_NUMBER,
    SegAlgorithm,
    build_seg,
    seg_uids,
)
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.volume import Volume, build_volume
from tests.peers import missing, require_binary, venv_tool
from tests.pipeline.conftest import PLANES

Series = dict[str, tuple[PhantomSubject, list[Dataset]]]
MODEL = SegAlgorithm("tessera-abdomen-unet", generation=7)
JS_DIR = Path(__file__).resolve().parents[1] / "js"


@pytest.fixture
def strict() -> Iterator[None]:
    """pydicom's strict validation while reading and writing, as highdicom's tests do."""
    saved = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    config.settings.reading_validation_mode = config.RAISE
    config.settings.writing_validation_mode = config.RAISE
    yield
    config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved


def _volume_and_labels(series: Series, name: str) -> tuple[Volume, np.ndarray]:
    subject, datasets = series[name]
    volume = build_volume(datasets, allowed_modalities={"CT"})
    order = [int(ds.InstanceNumber) - 1 for ds in volume.datasets]
    return volume, subject.labels[order]


def _roundtrip(seg: Dataset) -> Dataset:
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


@pytest.fixture(scope="session")
def seg_files(phantom_series: Series, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """AI-style SEG of the sagittal acquisition and the GT SEG of the axial one, on disk."""
    folder = tmp_path_factory.mktemp("seg")
    volume, labels = _volume_and_labels(phantom_series, "sagittal")
    ai = build_seg(volume, labels, CT_SEGMENTS, MODEL)
    subject, datasets = phantom_series["axial"]
    gt = ground_truth_seg(subject, datasets, CT_SEGMENTS)
    paths = {"ai": folder / "ai.dcm", "gt": folder / "gt.dcm"}
    ai.save_as(paths["ai"], enforce_file_format=True)
    gt.save_as(paths["gt"], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("name", [*PLANES, "shuffled"])
def test_roundtrip_under_strict_validation(phantom_series: Series, name: str, strict: None) -> None:
    volume, labels = _volume_and_labels(phantom_series, name)
    seg = _roundtrip(build_seg(volume, labels, CT_SEGMENTS, MODEL))
    back, infos = read_seg_labels(seg, volume, CT_SEGMENTS)
    np.testing.assert_array_equal(back, labels)
    assert [i.label_name for i in infos] == [s.name for s in CT_SEGMENTS]
    assert infos[3].modifier is not None and infos[3].modifier.meaning == "Left"


@pytest.mark.parametrize("name", [*PLANES, "shuffled"])
def test_every_frame_sits_on_its_source_slice(phantom_series: Series, name: str) -> None:
    volume, labels = _volume_and_labels(phantom_series, name)
    seg = build_seg(volume, labels, CT_SEGMENTS, MODEL)
    position = {uid: volume.positions[k] for k, uid in enumerate(volume.sop_instance_uids)}
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == len(CT_SEGMENTS) * volume.shape[0]  # no empty frame dropped
    seen = set()
    for item in frames:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, position[ref], atol=1e-4)
        seen.add((ref, int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)))
    assert len(seen) == len(frames)
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in iop], volume.orientation_cosines, atol=1e-6)


def test_absent_label_keeps_its_segment_and_frames(phantom_series: Series, strict: None) -> None:
    volume, labels = _volume_and_labels(phantom_series, "axial")
    labels = np.where(labels == 3, 1, labels).astype(np.uint8)  # no spleen found
    seg = _roundtrip(build_seg(volume, labels, CT_SEGMENTS, MODEL))
    assert int(seg.NumberOfFrames) == len(CT_SEGMENTS) * volume.shape[0]
    back, _ = read_seg_labels(seg, volume, CT_SEGMENTS)
    np.testing.assert_array_equal(back, labels)


def test_uids_are_deterministic_per_series_model_and_generation(phantom_series: Series) -> None:
    volume, labels = _volume_and_labels(phantom_series, "axial")
    a = build_seg(volume, labels, CT_SEGMENTS, MODEL)
    b = build_seg(volume, labels, CT_SEGMENTS, MODEL)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == seg_uids(
        volume.series_instance_uid, MODEL.name, 7
    )
    nxt = seg_uids(volume.series_instance_uid, MODEL.name, 8)
    assert a.SeriesInstanceUID != nxt[0] and a.SOPInstanceUID != nxt[1]
    assert a.SeriesNumber == AI_SERIES_NUMBER
    item = a.SegmentSequence[1]
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert item.SegmentAlgorithmName == MODEL.name
    algo = item.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == MODEL.name and algo.AlgorithmVersion == "7"
    assert a.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid


def test_read_by_position_when_frames_carry_no_source_reference(phantom_series: Series) -> None:
    """Some viewers write SEGs without per-frame derivation; positions still place them."""
    volume, labels = _volume_and_labels(phantom_series, "coronal")
    seg = _roundtrip(build_seg(volume, labels, CT_SEGMENTS, MODEL))
    for item in seg.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    del seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[1:]
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    back, _ = read_seg_labels(seg, volume, CT_SEGMENTS)
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("which", ["ai", "gt"])
def test_dciodvfy_reports_no_error(seg_files: dict[str, Path], which: str) -> None:
    dciodvfy = require_binary("dciodvfy")
    result = subprocess.run(
        [dciodvfy, "-new", str(seg_files[which])], capture_output=True, text=True
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.returncode == 0 and not errors, result.stderr


def test_dcmjs_parses_segments_references_and_pixels(
    seg_files: dict[str, Path], phantom_series: Series
) -> None:
    node = require_binary("node")
    if not (JS_DIR / "node_modules" / "dcmjs").is_dir():
        missing("dcmjs is not installed: run `npm ci --prefix tests/js`")
    out = subprocess.run(
        [node, str(JS_DIR / "parse_seg.js"), str(seg_files["ai"])],
        capture_output=True,
        text=True,
        check=True,
    )
    parsed = json.loads(out.stdout)
    volume, labels = _volume_and_labels(phantom_series, "sagittal")
    assert parsed["modality"] == "SEG"
    assert len(parsed["segments"]) == len(CT_SEGMENTS)
    assert parsed["numberOfFrames"] == len(parsed["frames"]) == len(CT_SEGMENTS) * volume.shape[0]
    for frame in parsed["frames"]:
        k = volume.index_of(frame["referencedSOPInstanceUID"])
        np.testing.assert_allclose(frame["imagePositionPatient"], volume.positions[k], atol=1e-4)
    for spec_number, spec in enumerate(CT_SEGMENTS, start=1):
        assert parsed["voxelsPerSegment"][str(spec_number)] == int((labels == spec.label).sum())


def test_dcmqi_converts_with_matching_voxel_counts_and_geometry(
    seg_files: dict[str, Path], phantom_series: Series, tmp_path: Path
) -> None:
    tool = venv_tool("segimage2itkimage")
    subprocess.run(
        [
            tool,
            "--inputDICOM",
            str(seg_files["ai"]),
            "--outputDirectory",
            str(tmp_path),
            "--outputType",
            "nifti",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    volume, labels = _volume_and_labels(phantom_series, "sagittal")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    for number, spec in enumerate(CT_SEGMENTS, start=1):
        image = read_nifti(tmp_path / f"{number}.nii.gz")
        mask = image.data > 0
        assert int(mask.sum()) == int((labels == spec.label).sum()), spec.name
        # every dcmqi voxel maps (via its affine) onto our voxel with the same label
        to_ours = np.linalg.inv(volume.affine) @ lps @ image.affine
        ijk = np.argwhere(mask)
        ours = np.rint(np.c_[ijk, np.ones(len(ijk))] @ to_ours.T)[:, :3].astype(int)
        assert (labels[ours[:, 0], ours[:, 1], ours[:, 2]] == spec.label).all(), spec.name
