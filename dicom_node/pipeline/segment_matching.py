"""Which model label each segment of a received SEG means.

A segment maps to a model label by, in order:

1. its coded property type plus modifier (laterality), when exactly one label has
   that coding, its own (``SegmentSpec``) or one listed in
   :data:`~dicom_node.pipeline.label_codings.LABEL_CODINGS`; SNOMED codes are compared
   by concept whatever the designator (SCT, SRT, SNM3), legacy SNOMED RT identifiers
   (T-71000) through DICOM PS3.16's table as pydicom ships it (``Code.__eq__``);
2. its label text, compared with the label's name, code meaning and synonyms with
   case, spaces, underscores and word order ignored ("Left kidney" = "kidney_left").

Generic codes such as OHIF's "Tissue" match no label, so the typed label decides.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom_node.dicom.peer_text import escaped
from dicom_node.pipeline.label_codings import LABEL_CODINGS
from dicom_node.pipeline.seg import SegmentSpec

LOGGER = logging.getLogger(__name__)

# Designators under which SEG writers put SNOMED codes: SNOMED CT (SCT), SNOMED RT (SRT,
# retired for SCT in 2019 but still written), SNOMED 3 (SNM3). Numeric values are
# SNOMED CT concept ids whichever of these carries them.
SNOMED_DESIGNATORS = frozenset({"SCT", "SRT", "SNM3"})
BACKGROUND = Code("125040", "DCM", "Background")


@dataclass(frozen=True)
class SegmentInfo:
    """A segment as found in a SEG being read."""

    number: int
    label_name: str
    property_type: Code
    category: Code
    modifier: Code | None
    algorithm_type: str

    @property
    def background(self) -> bool:
        """A label map's segment 0 or a segment coded Background (DCM 125040), as
        highdicom writes in every Label Map SEG: nothing to map."""
        return self.number == 0 or same_concept(self.property_type, BACKGROUND)


def segment_infos(seg: Dataset) -> list[SegmentInfo]:
    """The segments a SEG declares, in segment-number order."""
    infos = []
    for item in seg.SegmentSequence:
        ptype = item.SegmentedPropertyTypeCodeSequence[0]
        mods = ptype.get("SegmentedPropertyTypeModifierCodeSequence") or []
        cat = item.SegmentedPropertyCategoryCodeSequence[0]
        infos.append(
            SegmentInfo(
                number=int(item.SegmentNumber),
                label_name=str(item.get("SegmentLabel", "")),
                property_type=_code(ptype),
                category=_code(cat),
                modifier=_code(mods[0]) if mods else None,
                algorithm_type=str(item.get("SegmentAlgorithmType", "")),
            )
        )
    return sorted(infos, key=lambda i: i.number)


def _code(item: Dataset) -> Code:
    return Code(str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")),
                str(item.get("CodeMeaning", "")))


def concept(code: Code) -> Code:
    """``code`` reduced to what identifies its concept (no meaning, no version)."""
    scheme = code.scheme_designator.strip().upper()
    value = code.value.strip()
    if scheme in SNOMED_DESIGNATORS:
        scheme = "SCT" if value.isdigit() else "SRT"  # SRT ids compare via PS3.16's table
    return Code(value, scheme, "")


def same_concept(a: Code | None, b: Code | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(concept(a) == concept(b))


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^0-9a-z]+")


def text_keys(text: str) -> set[str]:
    """Keys under which a label text is compared: its words lowercased, joined in order
    and in sorted order ("Left kidney" -> {"leftkidney", "kidneyleft"})."""
    words = [w for w in _SEPARATORS.split(_CAMEL.sub(" ", text.strip()).lower()) if w]
    return {"".join(words), "".join(sorted(words))} if words else set()


def _codings(spec: SegmentSpec) -> list[tuple[Code, Code | None]]:
    extra = LABEL_CODINGS.get(spec.name)
    return [(spec.property_type, spec.modifier), *(extra.codings if extra else ())]


def _names(spec: SegmentSpec) -> Iterable[str]:
    extra = LABEL_CODINGS.get(spec.name)
    return (spec.name, spec.property_type.meaning, *(extra.synonyms if extra else ()))


def match_segments(infos: Sequence[SegmentInfo], specs: Sequence[SegmentSpec]) -> dict[int, int]:
    """Map segment numbers to spec labels: by coded property type (+ modifier), then by
    label text. Segments matching no label (or several) are left out and logged."""
    keys = {spec.label: set().union(*(text_keys(n) for n in _names(spec))) for spec in specs}
    mapping: dict[int, int] = {}
    for info in infos:
        if info.background:
            continue
        found = {s.label for s in specs
                 if any(same_concept(p, info.property_type) and same_concept(m, info.modifier)
                        for p, m in _codings(s))}
        if len(found) != 1:
            typed = text_keys(info.label_name)
            found = {label for label, known in keys.items() if typed & known}
        if len(found) == 1:
            mapping[info.number] = found.pop()
        else:
            LOGGER.warning("segment %d (%s, coded %s %s) matches no model label",
                           info.number, escaped(info.label_name, 64),
                           escaped(info.property_type.scheme_designator, 64),
                           escaped(info.property_type.value, 64))
    return mapping

