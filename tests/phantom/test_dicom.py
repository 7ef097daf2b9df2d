"""Phantom subjects as DICOM: valid CT/MR objects, consistent geometry, stable UIDs, CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from typer.testing import CliRunner

from dicom_node.phantom.ct import generate_subject
from dicom_node.phantom.dicom import subject_datasets
from tests.peers import require_binary
from viewer_bridge.main import app


@pytest.fixture(scope="module")
def subject():  # type: ignore[no-untyped-def]
    return generate_subject("C", 2, seed=5, orientation="coronal")


def test_hu_survive_rescale_and_geometry_is_consistent(subject) -> None:  # type: ignore[no-untyped-def]
    datasets = subject_datasets(subject)
    assert len(datasets) == subject.image.shape[0]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    np.testing.assert_allclose(positions, subject.slice_positions(), atol=1e-5)
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(
        np.linalg.norm(steps, axis=1), float(datasets[0].SpacingBetweenSlices)
    )
    for k in (0, len(datasets) // 2):
        ds = datasets[k]
        hu = apply_modality_lut(ds.pixel_array, ds)
        np.testing.assert_array_equal(hu, subject.image[k])
        assert ds.Modality == "CT" and ds.BodyPartExamined == "ABDOMEN"
        assert [float(v) for v in ds.ImageOrientationPatient] == list(subject.orientation_cosines)


def test_uids_are_deterministic_and_planes_share_the_frame_of_reference(subject) -> None:  # type: ignore[no-untyped-def]
    a, b = subject_datasets(subject), subject_datasets(subject)
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert len({d.SOPInstanceUID for d in a}) == len(a)
    axial = subject_datasets(generate_subject("C", 2, seed=5))
    assert axial[0].StudyInstanceUID == a[0].StudyInstanceUID
    assert axial[0].FrameOfReferenceUID == a[0].FrameOfReferenceUID
    assert axial[0].SeriesInstanceUID != a[0].SeriesInstanceUID
    other_seed = subject_datasets(generate_subject("C", 2, seed=6))
    assert other_seed[0].StudyInstanceUID != a[0].StudyInstanceUID


def test_ct_slice_passes_dciodvfy(subject, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dciodvfy = require_binary("dciodvfy")
    path = tmp_path / "ct.dcm"
    subject_datasets(subject)[3].save_as(path, enforce_file_format=True)
    result = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.returncode == 0 and not errors, result.stderr


def test_cli_writes_series_seg_and_labels(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["phantom", "--out", str(tmp_path), "--site", "C", "--subjects", "1", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "C-0000"
    images = sorted(folder.glob("IMG*.dcm"))
    labels = np.load(folder / "labels.npy")
    assert len(images) == labels.shape[0] >= 64
    seg = pydicom.dcmread(folder / "gt-seg.dcm")
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 5
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    expected = generate_subject("C", 0, seed=3)
    np.testing.assert_array_equal(labels, expected.labels)


def test_cli_refuses_unknown_site(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["phantom", "--out", str(tmp_path), "--site", "Q"])
    assert result.exit_code != 0
    assert "unknown site" in result.output
