"""DICOM-SEG: write a label volume aligned to a :class:`Volume` (reading: ``seg_read``).

Writing keeps every frame, empty ones included (``omit_empty_frames=False``): each
segment has one frame per source slice, each frame references its source instance and
sits at its position, so viewers (OHIF via dcmjs) never shift or drop slices, and a
label absent from the volume still yields a valid segment.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.coding import Code

from dicom_node import __version__
from dicom_node.pipeline.volume import Volume

LOGGER = logging.getLogger(__name__)

AI_SERIES_NUMBER = 9001
GROUND_TRUTH_SERIES_NUMBER = 9000
_ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")


class SegAlgorithmType(enum.StrEnum):
    """Segment Algorithm Type (0062,0008): who made the segmentation."""

    AUTOMATIC = "AUTOMATIC"
    SEMIAUTOMATIC = "SEMIAUTOMATIC"
    MANUAL = "MANUAL"


@dataclass(frozen=True)
class SegmentSpec:
    """How one model label is written as a segment.

    ``color_lab`` is the recommended display colour as CIELab (L* 0-100, a*/b* -128-127).
    ``modifier`` is a laterality (SNOMED CT Left 7771000 / Right 24028007) placed in the
    SegmentedPropertyTypeModifierCodeSequence, as DICOM recommends for paired organs.
    """

    label: int
    name: str
    category: Code
    property_type: Code
    color_lab: tuple[float, float, float]
    modifier: Code | None = None

    def __post_init__(self) -> None:
        if not 0 < self.label < 65536:
            raise ValueError(f"SegmentSpec.label must be in 1..65535, got {self.label}")
        if not self.name or len(self.name) > 64:
            raise ValueError(f"SegmentSpec.name must be 1-64 characters, got {self.name!r}")

    @classmethod
    def from_rgb(
        cls,
        label: int,
        name: str,
        category: Code,
        property_type: Code,
        rgb: tuple[int, int, int],
        modifier: Code | None = None,
    ) -> SegmentSpec:
        lab = hd.color.CIELabColor.from_rgb(*rgb)
        return cls(
            label, name, category, property_type, (lab.l_star, lab.a_star, lab.b_star), modifier
        )


@dataclass(frozen=True)
class SegAlgorithm:
    """Who produced the segmentation: a model (name + generation) or a person."""

    name: str
    generation: int = 0
    algorithm_type: SegAlgorithmType | str = SegAlgorithmType.AUTOMATIC
    # > 0: the series gained instances after its SEG by this generation was made, and
    # was segmented again; the new SEG is another instance of the same SEG series.
    revision: int = 0

    @property
    def kind(self) -> SegAlgorithmType:
        return SegAlgorithmType(self.algorithm_type)


_UID_NAMESPACE = uuid.UUID("5a1d0c3e-7e55-4e2a-9c1b-7e55e2a0d1c0")


def deterministic_uid(*parts: object) -> str:
    """A UUID-derived UID (``2.25.<uuid5>``) that depends only on ``parts``.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy
    sources and returns a random UUID, so it cannot be used for repeatable UIDs.)
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, parts))).int}"


def seg_uids(source_series_uid: str, model_name: str, generation: int,
             revision: int = 0) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SEG of a series by a model generation
    (its ``revision``-th, after the series gained instances: same series, new instance).

    Deterministic, so a re-run of the same job produces the same object, not a duplicate.
    """
    base = (source_series_uid, model_name, generation)
    again = (f"revision-{revision}",) if revision else ()
    return (deterministic_uid(*base, "seg-series"),
            deterministic_uid(*base, "seg-instance", *again))


def build_seg(
    volume: Volume,
    labels: np.ndarray,
    specs: Sequence[SegmentSpec],
    algorithm: SegAlgorithm,
    *,
    series_number: int | None = None,
    series_description: str | None = None,
    manufacturer: str = "Tessera",
    device_serial_number: str = "tessera-node",
) -> hd.seg.Segmentation:
    """Encode ``labels`` (shape ``volume.shape``, values = ``SegmentSpec.label``) as a SEG.

    Segments are numbered 1..N in the order of ``specs``; label values with no spec are
    written as background.

    Raises
    ------
    ValueError
        ``labels`` does not match the volume's shape; ``specs`` is empty or repeats a
        label or name.
    """
    segment_map = _segment_map(volume, labels, specs)
    descriptions = _segment_descriptions(volume, specs, algorithm)
    kind = algorithm.kind

    series_uid, sop_uid = seg_uids(volume.series_instance_uid, algorithm.name,
                                   algorithm.generation, algorithm.revision)
    if series_number is None:
        manual = kind is SegAlgorithmType.MANUAL
        series_number = GROUND_TRUTH_SERIES_NUMBER if manual else AI_SERIES_NUMBER
    if volume.frame_numbers:  # one multi-frame source: SEG frames in source frame order
        in_source_order = np.zeros_like(segment_map)
        in_source_order[np.asarray(volume.frame_numbers) - 1] = segment_map
        segment_map = in_source_order
    seg = hd.seg.Segmentation(
        source_images=list(volume.datasets),
        pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"tessera {__version__}",
        device_serial_number=device_serial_number,
        omit_empty_frames=False,
        content_label="GROUNDTRUTH" if kind is SegAlgorithmType.MANUAL else "TESSERA",
        content_description=f"{algorithm.name} generation {algorithm.generation}"[:64],
    )
    body_part = volume.datasets[0].get("BodyPartExamined")
    if body_part:
        seg.BodyPartExamined = body_part
    seg.SeriesDescription = (
        series_description or f"SEG {algorithm.name} gen {algorithm.generation}"
    )[:64]
    LOGGER.info(
        "SEG %s for series %s: %d segments, %d frames",
        sop_uid,
        volume.series_instance_uid,
        len(specs),
        int(seg.NumberOfFrames),
    )
    return seg


def _segment_map(volume: Volume, labels: np.ndarray, specs: Sequence[SegmentSpec]
                 ) -> np.ndarray:
    """``labels`` renumbered to segment numbers 1..N in the order of ``specs``."""
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} differs from volume {volume.shape}")
    if not specs:
        raise ValueError("specs must name at least one segment")
    if len({s.label for s in specs}) != len(specs) or len({s.name for s in specs}) != len(specs):
        raise ValueError("specs must not repeat a label or a name")
    lut = np.zeros(int(max(int(labels.max(initial=0)), max(s.label for s in specs))) + 1, np.uint8)
    for number, spec in enumerate(specs, start=1):
        lut[spec.label] = number
    return lut[labels.astype(np.intp, copy=False)]


def _segment_descriptions(volume: Volume, specs: Sequence[SegmentSpec],
                         algorithm: SegAlgorithm) -> list[hd.seg.SegmentDescription]:
    """One coded description per spec (property type, modifier, colour, tracking UID
    derived from series, model and generation so a re-run describes the same segment)."""
    kind = algorithm.kind
    ident = None
    if kind is not SegAlgorithmType.MANUAL:
        ident = hd.AlgorithmIdentificationSequence(
            name=algorithm.name, family=_ALGORITHM_FAMILY, version=str(algorithm.generation)
        )
    descriptions = []
    for number, spec in enumerate(specs, start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.name,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=kind.value,
            algorithm_identification=ident,
            tracking_uid=deterministic_uid(
                volume.series_instance_uid,
                algorithm.name,
                algorithm.generation,
                spec.name,
            ),
            tracking_id=spec.name,
            display_color=hd.color.CIELabColor(*spec.color_lab),
        )
        if spec.modifier is not None:
            item = desc.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(spec.modifier)
            ]
        descriptions.append(desc)
    return descriptions
