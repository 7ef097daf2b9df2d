"""Series -> volume: geometry from any plane or order, and clear refusals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.errors import SeriesRefused
from dicom_node.phantom.subject import PhantomSubject
from dicom_node.pipeline.volume import build_volume
from tests.pipeline.conftest import PLANES, clone, tiny_series

Series = dict[str, tuple[PhantomSubject, list[Dataset]]]


@pytest.mark.parametrize("name", [*PLANES, "shuffled"])
def test_volume_matches_the_acquisition(phantom_series: Series, name: str) -> None:
    subject, datasets = phantom_series[name]
    volume = build_volume(datasets, allowed_modalities={"CT"})
    np.testing.assert_allclose(volume.affine, subject.affine(), atol=1e-4)
    np.testing.assert_array_equal(volume.pixels, subject.image.astype(np.float32))
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == list(range(1, len(datasets) + 1))
    assert volume.sop_instance_uids[0] == volume.datasets[0].SOPInstanceUID


def test_planes_put_the_same_anatomy_at_the_same_patient_position(phantom_series: Series) -> None:
    """The liver's centroid in patient space is the same whichever plane was acquired."""
    centroids = []
    for plane in PLANES:
        subject, datasets = phantom_series[plane]
        volume = build_volume(datasets)
        idx = np.argwhere(subject.labels == 2).mean(axis=0)
        centroids.append((volume.affine @ np.append(idx, 1))[:3])
    for c in centroids[1:]:
        assert np.linalg.norm(c - centroids[0]) < 3.0


def test_oblique_stack_is_accepted_by_geometry() -> None:
    a = math.radians(20)
    iop = (math.cos(a), math.sin(a), 0.0, 0.0, 0.0, -1.0)
    datasets = tiny_series(iop=iop)
    random.Random(1).shuffle(datasets)
    volume = build_volume(datasets)
    assert volume.pixels[:, 0, 0].tolist() == [float(k) for k in range(6)]
    assert volume.spacing[0] == pytest.approx(2.5, abs=1e-3)
    np.testing.assert_allclose(volume.normal, np.cross(iop[:3], iop[3:]), atol=1e-6)


def _refused(datasets: list[Dataset], match: str, **kw: object) -> None:
    with pytest.raises(SeriesRefused, match=match):
        build_volume(datasets, **kw)  # type: ignore[arg-type]


def test_missing_slice_is_refused() -> None:
    datasets = tiny_series(8)
    del datasets[4]
    _refused(datasets, "missing slice")


def test_mixed_orientation_is_refused() -> None:
    datasets = tiny_series()
    datasets[2].ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    _refused(datasets, "mixed image orientations")


def test_inconsistent_spacing_is_refused() -> None:
    datasets = tiny_series()
    ipp = [float(v) for v in datasets[3].ImagePositionPatient]
    datasets[3].ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.8]
    _refused(datasets, "inconsistent slice spacing")


def test_different_frame_sizes_are_refused() -> None:
    datasets = tiny_series()
    datasets[1] = tiny_series(size=10)[1]
    _refused(datasets, "different frame sizes")


def test_wrong_modality_is_refused() -> None:
    _refused(tiny_series(modality="MR"), "unsupported modality MR", allowed_modalities={"CT"})


def test_missing_geometry_is_refused() -> None:
    datasets = tiny_series()
    del datasets[0].ImagePositionPatient
    _refused(datasets, "missing geometry")


def test_multiframe_is_refused() -> None:
    datasets = tiny_series()
    datasets[0].NumberOfFrames = 2
    _refused(datasets, "multi-frame")


def test_duplicate_position_and_gantry_tilt_are_refused() -> None:
    datasets = tiny_series()
    dup = clone(datasets)
    dup[2].ImagePositionPatient = dup[1].ImagePositionPatient
    _refused(dup, "share one slice position")
    tilt = clone(datasets)
    for k, ds in enumerate(tilt):
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.5 * k, ipp[2]]
    _refused(tilt, "gantry tilt")


def test_mixed_series_and_empty_input_are_refused() -> None:
    datasets = tiny_series()
    datasets[0].SeriesInstanceUID = "1.2.3"
    _refused(datasets, "several series")
    _refused([], "no instances")
