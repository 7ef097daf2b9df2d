"""The CT phantom: deterministic, anatomically sane, geometry-consistent, site-specific."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.phantom import ct
from dicom_node.phantom.ct import LABELS, SITES, generate_subject

ORGANS = (ct.LIVER, ct.SPLEEN, ct.KIDNEY_LEFT, ct.KIDNEY_RIGHT)


@pytest.fixture(scope="module")
def subject_c() -> ct.PhantomSubject:
    return generate_subject("C", 3, seed=11)


def test_same_arguments_same_bytes(subject_c: ct.PhantomSubject) -> None:
    again = generate_subject("C", 3, seed=11)
    assert again.image.tobytes() == subject_c.image.tobytes()
    assert again.labels.tobytes() == subject_c.labels.tobytes()
    assert again.origin == subject_c.origin and again.spacing == subject_c.spacing


def test_another_seed_or_index_is_another_subject(subject_c: ct.PhantomSubject) -> None:
    for other in (generate_subject("C", 3, seed=12), generate_subject("C", 4, seed=11)):
        assert not np.array_equal(other.labels, subject_c.labels)


def test_shape_types_and_label_names(subject_c: ct.PhantomSubject) -> None:
    s = subject_c
    assert s.image.dtype == np.int16 and s.labels.dtype == np.uint8
    assert s.image.shape == s.labels.shape
    assert 64 <= s.image.shape[0] <= 160 and s.image.shape[1:] == (256, 256)
    assert LABELS == {
        0: "background",
        1: "body",
        2: "liver",
        3: "spleen",
        4: "kidney_left",
        5: "kidney_right",
    }


def test_every_organ_present_and_inside_the_body(subject_c: ct.PhantomSubject) -> None:
    labels = subject_c.labels
    # organs lie inside the trunk: at least 3 voxels in-plane from the skin
    inner = ndimage.binary_erosion(labels > 0, iterations=3, structure=np.ones((1, 3, 3)))
    for organ in ORGANS:
        mask = labels == organ
        assert mask.sum() > 2000, LABELS[organ]
        assert inner[mask].all(), LABELS[organ]


def test_radiological_sides(subject_c: ct.PhantomSubject) -> None:
    """Patient right (liver, right kidney) is on the image left of an axial slice."""
    col = {o: np.nonzero(subject_c.labels == o)[2].mean() for o in ORGANS}
    assert col[ct.LIVER] < 128 < col[ct.SPLEEN]
    assert col[ct.KIDNEY_RIGHT] < 128 < col[ct.KIDNEY_LEFT]


def test_hounsfield_units_are_plausible() -> None:
    s = generate_subject("A", 0)
    med = {o: float(np.median(s.image[s.labels == o])) for o in ORGANS}
    assert 80 < med[ct.LIVER] < 140  # portal venous liver
    assert med[ct.KIDNEY_LEFT] > med[ct.LIVER]  # enhancing cortex
    body = s.image[s.labels == ct.BODY]
    assert np.percentile(body, 25) < -60  # plenty of fat
    assert body.max() > 400  # bone
    assert np.median(s.image[s.labels == 0]) < -900  # air


def _organ_centroids(s: ct.PhantomSubject) -> dict[int, np.ndarray]:
    aff = s.affine()
    out = {}
    for organ in ORGANS:
        idx = np.argwhere(s.labels == organ).mean(axis=0)
        out[organ] = (aff @ np.append(idx, 1.0))[:3]
    return out


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_planes_image_the_same_patient_space(plane: str) -> None:
    axial = _organ_centroids(generate_subject("C", 1, orientation="axial"))
    other = _organ_centroids(generate_subject("C", 1, orientation=plane))
    for organ in ORGANS:
        assert np.linalg.norm(axial[organ] - other[organ]) < 3.0, LABELS[organ]


def _noise_hu(s: ct.PhantomSubject) -> float:
    """Robust noise estimate from neighbour differences inside the eroded liver."""
    mask = ndimage.binary_erosion(s.labels == ct.LIVER, iterations=3)
    diff = np.diff(s.image.astype(np.float32), axis=1)[mask[:, 1:]]
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))))


def test_sites_differ_measurably() -> None:
    subjects = {name: generate_subject(name, 0) for name in ("A", "B", "D")}
    noise = {name: _noise_hu(s) for name, s in subjects.items()}
    assert noise["D"] > 1.5 * noise["A"] and noise["B"] > 1.2 * noise["A"]
    for name, s in subjects.items():
        assert s.spacing[0] == SITES[name].slice_thickness_mm
        assert s.spacing[1] == pytest.approx(SITES[name].fov_mm / 256)
    assert SITES["C"].slice_thickness_mm == 5.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown site"):
        generate_subject("Z", 0)
    with pytest.raises(ValueError):
        generate_subject("A", 0, orientation="oblique")
