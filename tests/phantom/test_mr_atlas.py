"""MR subjects from the installed Colin27/AAL atlas (Debian mricron-data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.phantom import mr_atlas
from dicom_node.phantom.dicom import subject_datasets
from tests.peers import require_file


@pytest.fixture(scope="module")
def axial() -> mr_atlas.PhantomSubject:
    require_file(mr_atlas.TEMPLATES / "ch2.nii.gz")
    require_file(mr_atlas.TEMPLATES / "aal.nii.gz")
    return mr_atlas.generate_subject("B", 2, seed=1)


def _centroids(s: mr_atlas.PhantomSubject) -> dict[int, np.ndarray]:
    aff = s.affine()
    return {g: (aff @ np.append(np.argwhere(s.labels == g).mean(0), 1))[:3] for g in range(1, 5)}


def test_groups_present_and_hemispheres_on_their_side(axial: mr_atlas.PhantomSubject) -> None:
    assert axial.modality == "MR" and axial.body_part == "HEAD"
    counts = {g: int((axial.labels == g).sum()) for g in range(1, 5)}
    assert min(counts.values()) > 1000, counts
    c = _centroids(axial)
    # LPS: +x is the patient's left
    assert c[mr_atlas.CEREBRUM_LEFT][0] > 20 > -20 > c[mr_atlas.CEREBRUM_RIGHT][0]
    assert c[mr_atlas.CEREBELLUM][2] < c[mr_atlas.DEEP_GREY][2]  # cerebellum lies lower
    assert c[mr_atlas.CEREBELLUM][1] > c[mr_atlas.DEEP_GREY][1]  # and further back


def test_deterministic_and_varied(axial: mr_atlas.PhantomSubject) -> None:
    again = mr_atlas.generate_subject("B", 2, seed=1)
    assert again.image.tobytes() == axial.image.tobytes()
    assert again.labels.tobytes() == axial.labels.tobytes()
    other = mr_atlas.generate_subject("B", 3, seed=1)
    assert not np.array_equal(other.labels, axial.labels)


def test_sagittal_acquisition_images_the_same_head(axial: mr_atlas.PhantomSubject) -> None:
    sag = mr_atlas.generate_subject("B", 2, seed=1, orientation="sagittal")
    a, s = _centroids(axial), _centroids(sag)
    for g in range(1, 5):
        assert np.linalg.norm(a[g] - s[g]) < 3.0, mr_atlas.MR_LABELS[g]


def test_written_as_mr_image_storage(axial: mr_atlas.PhantomSubject) -> None:
    ds = subject_datasets(axial)[5]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.BodyPartExamined == "HEAD"
    np.testing.assert_array_equal(ds.pixel_array, axial.image[5])


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mr_atlas, "TEMPLATES", tmp_path)
    mr_atlas.load_atlas.cache_clear()
    try:
        with pytest.raises(mr_atlas.AtlasNotInstalled, match="mricron-data"):
            mr_atlas.load_atlas()
    finally:
        mr_atlas.load_atlas.cache_clear()
