"""The SEG encoded before inference and filled in afterwards equals the SEG built whole."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.pipeline.seg import SegAlgorithm, build_seg
from dicom_node.pipeline.seg_read import read_seg_labels
from dicom_node.pipeline.seg_template import SegTemplate
from dicom_node.pipeline.volume import build_volume
from tests.pipeline.conftest import PLANES

MODEL = SegAlgorithm("tessera-abdomen-unet", generation=3)
# Set per build: creation times and highdicom's random dimension organisation UID.
VOLATILE = {"InstanceCreationTime", "InstanceCreationDate", "ContentTime", "ContentDate",
            "ContributingEquipmentSequence", "DimensionOrganizationSequence",
            "DimensionIndexSequence"}


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


@pytest.mark.parametrize("plane", [*PLANES, "shuffled"])
def test_filled_template_is_the_seg_built_whole(phantom_series, plane: str) -> None:
    subject, datasets = phantom_series[plane]
    volume = build_volume(datasets, allowed_modalities={"CT"})
    labels = subject.labels[[int(ds.InstanceNumber) - 1 for ds in volume.datasets]]
    assert len(np.unique(labels)) > 3, "the phantom must exercise several segments"

    filled = _read(SegTemplate.prepare(volume, CT_SEGMENTS, MODEL).fill(labels))
    whole = build_seg(volume, labels, CT_SEGMENTS, MODEL)
    buffer = io.BytesIO()
    whole.save_as(buffer, enforce_file_format=True)
    whole = _read(buffer.getvalue())

    assert [e.keyword for e in filled] == [e.keyword for e in whole]
    differing = {e.keyword for e in whole if filled[e.tag].value != e.value}
    assert differing <= VOLATILE, differing - VOLATILE
    assert filled.PixelData == whole.PixelData
    assert np.array_equal(read_seg_labels(filled, volume, CT_SEGMENTS)[0], labels)


def test_one_template_serves_any_labels(phantom_series) -> None:
    """Filling never mutates the template: a second fill with other labels is exact."""
    _, datasets = phantom_series["axial"]
    volume = build_volume(datasets, allowed_modalities={"CT"})
    template = SegTemplate.prepare(volume, CT_SEGMENTS, MODEL)
    rng = np.random.default_rng(0)
    values = np.array([0, *(s.label for s in CT_SEGMENTS)], np.uint8)
    for _ in range(2):
        labels = rng.choice(values, size=volume.shape).astype(np.uint8)
        got, _ = read_seg_labels(_read(template.fill(labels)), volume, CT_SEGMENTS)
        assert np.array_equal(got, labels)
    empty = _read(template.fill(np.zeros(volume.shape, np.uint8)))
    assert not np.any(empty.pixel_array)


def test_labels_of_another_shape_are_refused(phantom_series) -> None:
    _, datasets = phantom_series["axial"]
    volume = build_volume(datasets, allowed_modalities={"CT"})
    template = SegTemplate.prepare(volume, CT_SEGMENTS, MODEL)
    with pytest.raises(ValueError, match="differs from volume"):
        template.fill(np.zeros((volume.shape[0] - 1, *volume.shape[1:]), np.uint8))


def test_a_single_segment_template_fills_like_the_seg_built_whole(phantom_series) -> None:
    """One segment: highdicom identifies it in the shared functional groups (an imported
    brain-extraction model has one label)."""
    subject, datasets = phantom_series["axial"]
    volume = build_volume(datasets, allowed_modalities={"CT"})
    spec = CT_SEGMENTS[0]
    labels = subject.labels[[int(ds.InstanceNumber) - 1 for ds in volume.datasets]]
    labels = np.where(labels == spec.label, spec.label, 0).astype(np.uint8)
    filled = _read(SegTemplate.prepare(volume, [spec], MODEL).fill(labels))
    whole = build_seg(volume, labels, [spec], MODEL)
    assert filled.PixelData == whole.PixelData
    assert np.array_equal(read_seg_labels(filled, volume, [spec])[0], labels)
