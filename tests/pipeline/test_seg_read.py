"""Reading other tools' SEGs: Label Map, FRACTIONAL, dcmqi, placed by reference or by
position, and the malformed ones refused with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_node.errors import InvalidDatasetError
from dicom_node.learning.model_config import abdomen_ct_config
from dicom_node.phantom.codes import CT_SEGMENTS
from dicom_node.pipeline.seg_read import (
    LABEL_MAP_SEGMENTATION_STORAGE,
    read_seg_labels,
)
from dicom_node.pipeline.segmentation import segment_specs
from tests.corrections.helpers import Study, dcmjs_seg, dcmqi_seg, highdicom_seg

MODEL_SPECS = segment_specs(abdomen_ct_config())
LIVER = next(s for s in CT_SEGMENTS if s.name == "liver")


@pytest.fixture(scope="module")
def study() -> Study:
    return Study("B", 0, seed=7300, slices=8)


def _by_position(seg: Dataset) -> Dataset:
    """No per-frame source references: only positions can place the frames."""
    for item in seg.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence
    return seg


PLACEMENTS = {"reference": lambda ds: ds, "position": _by_position}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["raw", "rle"])
def test_label_map_seg_reads_into_the_model_labels(study: Study, syntax: str,
                                                   placement: str) -> None:
    volume, truth = study.volume(), study.truth_in_volume_order()
    seg = PLACEMENTS[placement](highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP", syntax))
    assert seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert seg.file_meta.TransferSyntaxUID == syntax
    labels, infos = read_seg_labels(seg, volume, MODEL_SPECS)
    assert len([i for i in infos if not i.background]) == len(CT_SEGMENTS)
    np.testing.assert_array_equal(labels, truth)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_label_map_seg_without_frame_content_reads_like_ohifs(study: Study,
                                                              placement: str) -> None:
    """OHIF 3.13's default Save (dcmjs labelmap export) keeps a Dimension Index
    Sequence but writes no per-frame Frame Content Sequence."""
    volume, truth = study.volume(), study.truth_in_volume_order()
    seg = PLACEMENTS[placement](highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP",
                                              RLELossless))
    for item in seg.PerFrameFunctionalGroupsSequence:
        del item.FrameContentSequence
    assert "DimensionIndexSequence" in seg
    labels, _ = read_seg_labels(seg, volume, MODEL_SPECS)
    np.testing.assert_array_equal(labels, truth)
    assert "DimensionIndexSequence" in seg  # the caller's dataset is left as it was


def _one_bit_rle(seg: Dataset) -> Dataset:
    """The binary SEG as OHIF's 'bitmap' Save writes it: RLE Lossless with 1 bit
    allocated, each frame's packed bits one RLE segment (highdicom refuses to write
    this; pydicom cannot decode it)."""
    frames, per_frame = int(seg.NumberOfFrames), int(seg.Rows) * int(seg.Columns) // 8
    packed = np.frombuffer(seg.PixelData, dtype=np.uint8)[:frames * per_frame]
    view = Dataset()
    view.file_meta = pydicom.dataset.FileMetaDataset()
    view.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    view.Rows, view.Columns, view.NumberOfFrames = 1, per_frame, frames
    view.SamplesPerPixel, view.PhotometricInterpretation = 1, "MONOCHROME2"
    view.BitsAllocated, view.BitsStored, view.HighBit, view.PixelRepresentation = 8, 8, 7, 0
    view.compress(RLELossless, arr=packed.reshape(frames, 1, per_frame))
    seg.PixelData = view.PixelData
    seg["PixelData"].VR = "OB"
    seg.file_meta.TransferSyntaxUID = RLELossless
    return seg


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_one_bit_rle_binary_seg_reads_like_ohifs_bitmap_save(study: Study,
                                                            placement: str) -> None:
    volume, truth = study.volume(), study.truth_in_volume_order()
    seg = _one_bit_rle(PLACEMENTS[placement](
        highdicom_seg(volume, truth, CT_SEGMENTS, "BINARY")))
    with pytest.raises(Exception, match="1 bits allocated"):
        seg.pixel_array  # noqa: B018 -- pydicom alone cannot decode it
    labels, _ = read_seg_labels(seg, volume, MODEL_SPECS)
    np.testing.assert_array_equal(labels, truth)
    assert seg.file_meta.TransferSyntaxUID == RLELossless  # the caller's dataset is kept


def _fractional_liver(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Liver at 1.0, a ring of exactly 0.5 around it (inside), a ring of 0.3 around
    that (outside). Returns the fractions and the expected mask."""
    from scipy.ndimage import binary_dilation

    liver = truth == LIVER.label
    half = np.zeros_like(liver)
    third = np.zeros_like(liver)
    for k in range(liver.shape[0]):
        half[k] = binary_dilation(liver[k], iterations=2) & ~liver[k]
        third[k] = binary_dilation(liver[k], iterations=4) & ~liver[k] & ~half[k]
    fractions = np.where(liver, 1.0, np.where(half, 0.5, np.where(third, 0.3, 0.0)))
    assert third.any() and half.any()
    return fractions.astype(np.float32), liver | half


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fractional_seg_is_inside_at_half_the_maximum_however_it_is_placed(
    study: Study, placement: str
) -> None:
    volume, truth = study.volume(), study.truth_in_volume_order()
    fractions, expected = _fractional_liver(truth)
    seg = PLACEMENTS[placement](highdicom_seg(volume, fractions, [LIVER], "FRACTIONAL",
                                        max_fractional_value=200))
    labels, _ = read_seg_labels(seg, volume, MODEL_SPECS)
    np.testing.assert_array_equal(labels == LIVER.label, expected)
    assert set(np.unique(labels)) == {0, LIVER.label}


def test_label_map_with_values_above_its_segment_count_is_refused(study: Study) -> None:
    volume, truth = study.volume(), study.truth_in_volume_order()
    seg = highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP")
    pixels = seg.pixel_array.copy()
    pixels[0, :4, :4] = 9
    pixels[1, :4, :4] = 12
    seg.PixelData = pixels.tobytes()
    with pytest.raises(InvalidDatasetError, match=r"pixel values \(9, 12\).*5 segment"):
        read_seg_labels(seg, volume, MODEL_SPECS)


def test_frames_that_name_undeclared_segments_are_refused(study: Study) -> None:
    """Like OHIF 3.13's 'bitmap' Save with an empty segment: the Segment Sequence
    renumbered without it, the frames still numbered as before."""
    volume, truth = study.volume(), study.truth_in_volume_order()
    seg = highdicom_seg(volume, truth, CT_SEGMENTS, "BINARY")
    del seg.SegmentSequence[0]
    for number, item in enumerate(seg.SegmentSequence, start=1):
        item.SegmentNumber = number
    with pytest.raises(InvalidDatasetError, match=r"segment number\(s\) 5 .*declares 1, 2, 3, 4"):
        read_seg_labels(seg, volume, MODEL_SPECS)


def test_frames_that_point_at_unknown_source_instances_are_refused(study: Study) -> None:
    volume, truth = study.volume(), study.truth_in_volume_order()
    seg = highdicom_seg(volume, truth, CT_SEGMENTS, "LABELMAP")
    for item in seg.PerFrameFunctionalGroupsSequence[:2]:
        item.DerivationImageSequence[0].SourceImageSequence[0]\
            .ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.999.77"
    with pytest.raises(InvalidDatasetError, match=r"2 SEG frame.*not in series"):
        read_seg_labels(seg, volume, MODEL_SPECS)


@pytest.mark.parametrize("kind", ["binary", "labelmap"])
def test_dcmqi_seg_with_kidney_laterality_codes_reads_into_the_model_labels(
    study: Study, tmp_path: Path, kind: str
) -> None:
    """dcmqi codes kidneys as Kidney + Left/Right and here names segments "Segment_<n>";
    the model codes them as Left kidney / Right kidney: the codes still meet."""
    series_dir = tmp_path / "series"
    study.write(series_dir)
    path = dcmqi_seg(study, series_dir, tmp_path / "dcmqi.dcm", segmentation_type=kind,
                     generic_labels=True)
    seg = pydicom.dcmread(path)
    assert (seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE) == (kind == "labelmap")
    assert {str(i.SegmentLabel) for i in seg.SegmentSequence} - {"Background"} == {
        f"Segment_{s.label}" for s in CT_SEGMENTS}
    labels, _ = read_seg_labels(seg, study.volume(), MODEL_SPECS)
    np.testing.assert_array_equal(labels, study.truth_in_volume_order())


def test_dcmjs_rle_seg_with_ohif_tissue_codes_reads_into_the_model_labels(
    study: Study, tmp_path: Path
) -> None:
    """dcmjs's RLE SEG: FRACTIONAL, MaximumFractionalValue 255, but 1 stored for inside;
    every segment "Tissue", only the typed labels say what they are."""
    sources = study.write(tmp_path / "series")
    typed = ["Body", "Liver", "spleen", "Left kidney", "Kidney_Right"]
    truth = study.truth_in_volume_order()
    path = dcmjs_seg(study, sources, truth, typed, tmp_path / "dcmjs.dcm")
    seg = pydicom.dcmread(path)
    assert seg.file_meta.TransferSyntaxUID == RLELossless
    assert (seg.SegmentationType, int(seg.MaximumFractionalValue)) == ("FRACTIONAL", 255)
    assert {str(i.SegmentedPropertyTypeCodeSequence[0].CodeValue)
            for i in seg.SegmentSequence} == {"T-D0050"}
    labels, _ = read_seg_labels(seg, study.volume(), MODEL_SPECS)
    np.testing.assert_array_equal(labels, truth)
