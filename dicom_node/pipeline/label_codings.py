"""How real tools code the structures our models segment: a small, documented table.

Our model configs code each label one way (``LabelSpec``: the abdomen CT model writes
kidney_left as the pre-coordinated SNOMED CT concept 18639004 "Left kidney"). The
SEGs radiologists send back code the same structure in other ways:

- dcmqi and 3D Slicer (and the node's own phantom ground truth) post-coordinate paired
  organs: Kidney (SCT 64033007) plus a laterality in
  SegmentedPropertyTypeModifierCodeSequence, Left (7771000) or Right (24028007)
  (DICOM PS3.16 CID 7151 / CID 244);
- older tools use the legacy SNOMED RT identifiers (designator SRT, e.g. T-71000
  Kidney, G-A101 Left) or the SNOMED CT value under SRT/SNM3; those are compared by
  concept in :mod:`dicom_node.pipeline.segment_matching`;
- OHIF writes every segment as "Tissue" (SRT T-D0050) and only the label the user typed
  says what it is, so label text and its common synonyms are listed here too.

The ``totalsegmentator`` wheel ships a SNOMED mapping of its 117 classes, but is a
heavy dependency for five rows; the codes below are the DICOM PS3.16 / SNOMED CT
concepts for exactly our labels. A model label missing here still matches by its own
code and name. Add a row when a model gains a label.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code

_KIDNEY = Code("64033007", "SCT", "Kidney")
_LEFT = Code("7771000", "SCT", "Left")
_RIGHT = Code("24028007", "SCT", "Right")


@dataclass(frozen=True)
class LabelCoding:
    """Other codings and names of one model label (by its ``LabelSpec.name``).

    ``codings`` are (property type, modifier or None) pairs that mean this label;
    ``synonyms`` are label texts that mean it (compared case-, space- and
    underscore-insensitively, word order ignored).
    """

    name: str
    codings: tuple[tuple[Code, Code | None], ...] = ()
    synonyms: tuple[str, ...] = ()


LABEL_CODINGS: dict[str, LabelCoding] = {c.name: c for c in (
    LabelCoding("body", (
        (Code("38266002", "SCT", "Entire body"), None),
        (Code("279495008", "SCT", "Human body structure"), None),
    ), ("entire body", "body outline", "body contour", "external")),
    LabelCoding("liver", (
        (Code("10200004", "SCT", "Liver"), None),
    ), ("hepar",)),
    LabelCoding("spleen", (
        (Code("78961009", "SCT", "Spleen"), None),
    ), ("lien",)),
    LabelCoding("kidney_left", (
        (Code("18639004", "SCT", "Left kidney"), None),
        (_KIDNEY, _LEFT),
    ), ("left kidney", "kidney l", "kidney lt")),
    LabelCoding("kidney_right", (
        (Code("9846003", "SCT", "Right kidney"), None),
        (_KIDNEY, _RIGHT),
    ), ("right kidney", "kidney r", "kidney rt")),
    # Labels of imported models (``tessera model import``): the concept an imported
    # channel named like this is coded as (DICOM PS3.16 CID 7153 / SNOMED CT).
    LabelCoding("brain", (
        (Code("12738006", "SCT", "Brain"), None),
    ), ("brain mask", "whole brain", "cerebrum and cerebellum")),
    LabelCoding("pancreas", (
        (Code("15776009", "SCT", "Pancreas"), None),
    ), ()),
    LabelCoding("heart", (
        (Code("80891009", "SCT", "Heart"), None),
    ), ()),
)}


def coding_for(text: str) -> tuple[str, Code] | None:
    """``(label name, its first unmodified code)`` for a label text that names one of
    the structures above (by name or synonym), else ``None``."""
    key = _key(text)
    for coding in LABEL_CODINGS.values():
        if key == _key(coding.name) or key in {_key(s) for s in coding.synonyms}:
            for code, modifier in coding.codings:
                if modifier is None:
                    return coding.name, code
    return None


def _key(text: str) -> str:
    return " ".join(sorted(text.lower().replace("_", " ").replace("-", " ").split()))
