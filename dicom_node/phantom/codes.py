"""Coded descriptions (SNOMED CT) of the phantom labels, as SEG segment specs.

Paired organs use the generic organ code plus a laterality modifier (DICOM CID 244):
Kidney 64033007 with Left 7771000 / Right 24028007.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes

from dicom_node.phantom import ct
from dicom_node.pipeline.seg import SegmentSpec

_ANATOMY = codes.SCT.AnatomicalStructure

CT_SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec.from_rgb(ct.BODY, "body", _ANATOMY, codes.SCT.EntireBody, (177, 122, 101)),
    SegmentSpec.from_rgb(ct.LIVER, "liver", _ANATOMY, codes.SCT.Liver, (221, 130, 101)),
    SegmentSpec.from_rgb(ct.SPLEEN, "spleen", _ANATOMY, codes.SCT.Spleen, (157, 108, 162)),
    SegmentSpec.from_rgb(
        ct.KIDNEY_LEFT,
        "kidney_left",
        _ANATOMY,
        codes.SCT.Kidney,
        (185, 102, 83),
        modifier=codes.SCT.Left,
    ),
    SegmentSpec.from_rgb(
        ct.KIDNEY_RIGHT,
        "kidney_right",
        _ANATOMY,
        codes.SCT.Kidney,
        (212, 126, 151),
        modifier=codes.SCT.Right,
    ),
)
