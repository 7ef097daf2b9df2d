"""Read a received DICOM-SEG (BINARY, FRACTIONAL or LABELMAP) into a label volume.

Frames are placed on the source volume through highdicom: by the source instance
each frame references when the SEG says spatial locations are preserved, otherwise
(dcmqi writes no SpatialLocationsPreserved; some viewers write no per-frame
references) by each frame's ImagePositionPatient. Both ways apply the same rule to
a segment's values (:func:`inside`): a voxel belongs to a segment at >= 0.5 of
MaximumFractionalValue (BINARY: value 1; LABELMAP: the segment's number). One
exception, for a writer's quirk: a FRACTIONAL SEG holding only 0 and 1 is binary
(:func:`_fractional_maximum`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import InvalidDatasetError
from dicom_node.pipeline.seg import SegmentSpec
from dicom_node.pipeline.seg_quirks import readable
from dicom_node.pipeline.segment_matching import SegmentInfo, match_segments, segment_infos
from dicom_node.pipeline.volume import Volume

LOGGER = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# The SOP classes whose instances the node reads as segmentations (and corrections).
SEG_SOP_CLASSES = frozenset({SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE})

INSIDE_FRACTION = 0.5
_POSITION_TOL_MM = 0.05


class SegType(enum.StrEnum):
    """Segmentation Type (0062,0001)."""

    BINARY = "BINARY"
    FRACTIONAL = "FRACTIONAL"
    LABELMAP = "LABELMAP"


def inside(values: np.ndarray, maximum: float) -> np.ndarray:
    """The one rule for every SEG: a voxel is inside at >= 0.5 of ``maximum``
    (MaximumFractionalValue for FRACTIONAL, 1 for BINARY and per-segment label maps)."""
    return np.asarray(values) >= INSIDE_FRACTION * maximum


def read_seg_labels(
    seg: Dataset, volume: Volume, specs: Sequence[SegmentSpec] | None = None
) -> tuple[np.ndarray, list[SegmentInfo]]:
    """Read a BINARY/FRACTIONAL/LABELMAP SEG into a label volume aligned to ``volume``.

    Voxels take the segment number, or the spec label when ``specs`` are given (segments
    matching no spec are ignored). Where segments overlap, the higher segment number
    wins. Frames absent from the SEG (viewers may omit empty ones) are background.

    Raises
    ------
    InvalidDatasetError
        Not a SEG; another frame of reference or frame size; frames that reference
        source instances not in ``volume``; a frame that falls on no slice of
        ``volume``; a label map with pixel values that name no declared segment.
    """
    if str(seg.get("Modality", "")) != "SEG":
        raise InvalidDatasetError("not a segmentation (Modality is not SEG)")
    if (int(seg.Rows), int(seg.Columns)) != volume.shape[1:]:
        raise InvalidDatasetError("SEG frame size differs from the source volume")
    for_uid = str(seg.get("FrameOfReferenceUID", ""))
    if for_uid and volume.frame_of_reference_uid and for_uid != volume.frame_of_reference_uid:
        raise InvalidDatasetError("SEG has another frame of reference than the source volume")
    infos = segment_infos(seg)
    mapping = {i.number: i.number for i in infos}
    if specs is not None:
        mapping = match_segments(infos, specs)
    out_dtype = np.uint8 if max(mapping.values(), default=0) < 256 else np.uint16
    labels = np.zeros(volume.shape, dtype=out_dtype)

    hseg = (seg if isinstance(seg, hd.seg.Segmentation)
            else hd.seg.Segmentation.from_dataset(readable(seg)))
    kind = SegType(str(hseg.SegmentationType))
    if kind is SegType.LABELMAP:
        _check_label_values(hseg, {i.number for i in infos})
    else:
        _check_frame_segments(hseg, {i.number for i in infos})
    maximum = _fractional_maximum(hseg) if kind is SegType.FRACTIONAL else 1.0
    numbers = sorted(mapping)
    if not numbers:
        return labels, infos
    if _referenced_frames(hseg, volume):
        try:
            if volume.frame_numbers:  # the frames of one multi-frame source
                masks = hseg.get_pixels_by_source_frame(
                    volume.sop_instance_uids[0], list(volume.frame_numbers),
                    segment_numbers=numbers, assert_missing_frames_are_empty=True,
                    rescale_fractional=False, dtype=np.float32)
            else:
                masks = hseg.get_pixels_by_source_instance(
                    list(volume.sop_instance_uids),
                    segment_numbers=numbers, assert_missing_frames_are_empty=True,
                    rescale_fractional=False, dtype=np.float32)
        except RuntimeError as exc:  # spatial locations not declared preserved
            LOGGER.debug("SEG %s placed by frame position: %s", seg.get("SOPInstanceUID"), exc)
        else:
            for i, number in enumerate(numbers):
                labels[inside(masks[..., i], maximum)] = mapping[number]
            return labels, infos
    _place_by_position(hseg, kind, maximum, volume, mapping, labels)
    return labels, infos


def _fractional_maximum(hseg: hd.seg.Segmentation) -> float:
    """MaximumFractionalValue, except for a FRACTIONAL SEG whose values are all 0 or 1.

    dcmjs's RLE writer (OHIF's Cornerstone adapter, ``rleEncode``) declares FRACTIONAL
    with MaximumFractionalValue 255 but stores 1 for "inside": a binary SEG in
    disguise. A real probability map never holds only 0 and 1/255, so such a SEG is
    read as binary instead of as empty.
    """
    declared = float(hseg.get("MaximumFractionalValue", 1) or 1)
    if declared > 1 and int(np.max(hseg.pixel_array, initial=0)) <= 1:
        LOGGER.info("SEG %s: FRACTIONAL with values 0/1 only (max %g declared): read as "
                    "binary", hseg.get("SOPInstanceUID"), declared)
        return 1.0
    return declared


def _check_frame_segments(hseg: hd.seg.Segmentation, declared: set[int]) -> None:
    """Every frame of a binary or fractional SEG names a declared segment.

    OHIF 3.13's 'bitmap' Save drops an empty segment from the Segment Sequence and
    renumbers the rest, but its frames keep the old numbers: read as written, each
    frame would land on the wrong label.
    """
    shared = hseg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    numbers: set[int] = set()
    for item in hseg.get("PerFrameFunctionalGroupsSequence") or []:
        ident = (item.get("SegmentIdentificationSequence")
                 or shared.get("SegmentIdentificationSequence"))
        if ident:
            numbers.add(int(ident[0].ReferencedSegmentNumber))
    stray = sorted(numbers - declared)
    if stray:
        raise InvalidDatasetError(
            f"SEG frames reference segment number(s) {', '.join(map(str, stray[:8]))} "
            f"that its Segment Sequence does not declare (it declares "
            f"{', '.join(map(str, sorted(declared)[:8]))})")


def _check_label_values(hseg: hd.seg.Segmentation, declared: set[int]) -> None:
    """A label map's pixel values must be background (0) or declared segment numbers."""
    values = {int(v) for v in np.unique(hseg.pixel_array)} - {0}
    stray = sorted(values - declared)
    if stray:
        shown = ", ".join(map(str, stray[:8])) + (" ..." if len(stray) > 8 else "")
        segments = sorted(declared - {0})
        raise InvalidDatasetError(
            f"Label Map SEG has pixel values ({shown}) that are no declared segment "
            f"(it declares {len(segments)} segment(s): "
            f"{', '.join(map(str, segments[:8]))})")


def _frame_sources(item: Dataset, multi_frame: bool) -> list[tuple[str, int]]:
    """(SOP Instance UID, frame number or 0) of each source a SEG frame names."""
    return [(str(src.ReferencedSOPInstanceUID),
             int(src.get("ReferencedFrameNumber", 0) or 0) if multi_frame else 0)
            for der in item.get("DerivationImageSequence") or []
            for src in der.get("SourceImageSequence") or []
            if "ReferencedSOPInstanceUID" in src]


def _referenced_frames(hseg: hd.seg.Segmentation, volume: Volume) -> bool:
    """Whether every frame names its source instance (then frames can be placed by
    reference). Frames that name instances not in ``volume`` are refused."""
    known = set(volume.source_frames)
    unknown: set[tuple[str, int]] = set()
    frames = stray = 0
    for item in hseg.get("PerFrameFunctionalGroupsSequence") or []:
        sources = set(_frame_sources(item, bool(volume.frame_numbers)))
        frames += bool(sources)
        if sources - known:
            stray += 1
            unknown |= sources - known
    if unknown:
        raise InvalidDatasetError(
            f"{stray} SEG frame(s) reference {len(unknown)} source instance(s) that are "
            f"not in series {volume.series_instance_uid} (e.g. {_named(min(unknown))})")
    return frames > 0 and frames == int(hseg.get("NumberOfFrames", 0) or 0)


def _named(source: tuple[str, int]) -> str:
    uid, frame = source
    return uid[:64] + (f" frame {frame}" if frame else "")


def _place_by_position(
    hseg: hd.seg.Segmentation,
    kind: SegType,
    maximum: float,
    volume: Volume,
    mapping: dict[int, int],
    labels: np.ndarray,
) -> None:
    shared = hseg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for n, item in enumerate(hseg.PerFrameFunctionalGroupsSequence):
        if kind is SegType.LABELMAP:
            numbers = sorted(mapping)
        else:
            ident = (item.get("SegmentIdentificationSequence")
                     or shared.get("SegmentIdentificationSequence"))
            if not ident:
                raise InvalidDatasetError(f"SEG frame {n + 1} names no segment")
            number = int(ident[0].ReferencedSegmentNumber)
            if number not in mapping:
                continue
            numbers = [number]
        plane = item.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        if not plane:
            raise InvalidDatasetError(f"SEG frame {n + 1} has no position")
        ipp = np.asarray([float(v) for v in plane[0].ImagePositionPatient])
        dist = np.linalg.norm(volume.positions - ipp[None, :], axis=1)
        k = int(np.argmin(dist))
        if dist[k] > max(_POSITION_TOL_MM, 0.1 * volume.spacing[0]):
            raise InvalidDatasetError(f"SEG frame {n + 1} lies on no slice of the source series")
        frame = np.asarray(hseg.get_stored_frame(n + 1))
        for number in numbers:
            if kind is SegType.LABELMAP:
                labels[k][frame == number] = mapping[number]
            else:
                labels[k][inside(frame, maximum)] = mapping[number]
