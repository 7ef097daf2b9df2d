"""Segments coded the way real tools code them map onto the model's labels (pure logic)."""

from __future__ import annotations

import pytest
from pydicom.sr.coding import Code

from dicom_node.learning.model_config import abdomen_ct_config
from dicom_node.pipeline.segment_matching import SegmentInfo, match_segments, same_concept
from dicom_node.pipeline.segmentation import segment_specs

SPECS = segment_specs(abdomen_ct_config())
LABEL = {s.name: s.label for s in SPECS}
ANATOMY = Code("91723000", "SCT", "Anatomical Structure")
TISSUE = Code("T-D0050", "SRT", "Tissue")  # what OHIF writes for every segment
KIDNEY = Code("64033007", "SCT", "Kidney")


def _info(label: str, ptype: Code, modifier: Code | None = None) -> SegmentInfo:
    return SegmentInfo(1, label, ptype, ANATOMY, modifier, "MANUAL")


CASES = {
    # dcmqi / 3D Slicer: generic organ + laterality, any label text
    "Kidney+Left SCT": (_info("Segment_4", KIDNEY, Code("7771000", "SCT", "Left")),
                        "kidney_left"),
    "Kidney+Right SCT": (_info("Segment_5", KIDNEY, Code("24028007", "SCT", "Right")),
                         "kidney_right"),
    # legacy SNOMED RT identifiers (PS3.16's table)
    "Kidney+Right SRT ids": (_info("x", Code("T-71000", "SRT", "Kidney"),
                                   Code("G-A100", "SRT", "Right")), "kidney_right"),
    "Liver SNM3 id": (_info("x", Code("T-62000", "SNM3", "Liver")), "liver"),
    # SNOMED CT concept ids under the SRT designator (older dcmqi / Slicer terminologies)
    "Liver SCT id under SRT": (_info("x", Code("10200004", "SRT", "Liver")), "liver"),
    "pre-coordinated Left kidney": (_info("x", Code("18639004", "SCT", "Left kidney")),
                                    "kidney_left"),
    # OHIF: "Tissue" for everything, the typed label decides
    "Tissue 'Left kidney'": (_info("Left kidney", TISSUE), "kidney_left"),
    "Tissue 'kidney_right'": (_info("kidney_right", TISSUE), "kidney_right"),
    "Tissue 'Kidney Left'": (_info("Kidney Left", TISSUE), "kidney_left"),
    "Tissue 'LeftKidney'": (_info("LeftKidney", TISSUE), "kidney_left"),
    "Tissue 'lt kidney'": (_info("lt kidney", TISSUE), "kidney_left"),
    "Tissue ' SPLEEN '": (_info(" SPLEEN ", TISSUE), "spleen"),
    "Tissue 'entire_body'": (_info("entire_body", TISSUE), "body"),
    "Tissue 'liver'": (_info("liver", TISSUE), "liver"),
    # no modifier: Kidney alone is either kidney, so the label decides
    "Kidney 'right kidney'": (_info("right kidney", KIDNEY), "kidney_right"),
}


@pytest.mark.parametrize("case", CASES)
def test_segment_maps_to_its_model_label(case: str) -> None:
    info, expected = CASES[case]
    assert match_segments([info], SPECS) == {1: LABEL[expected]}


@pytest.mark.parametrize("info", [
    _info("lesion", TISSUE),
    _info("kidney", KIDNEY),  # which one?
    _info("Segment_1", Code("108369006", "SCT", "Neoplasm")),
    _info("", TISSUE),
], ids=["tissue lesion", "kidney without side", "neoplasm", "empty label"])
def test_segment_that_means_no_model_label_maps_nowhere(info: SegmentInfo) -> None:
    assert match_segments([info], SPECS) == {}


def test_a_code_wins_over_the_label_text() -> None:
    info = _info("spleen", Code("10200004", "SCT", "Liver"))
    assert match_segments([info], SPECS) == {1: LABEL["liver"]}


def test_snomed_designators_compare_by_concept_not_by_meaning() -> None:
    assert same_concept(Code("85756007", "SCT", "Tissue"), TISSUE)
    assert same_concept(Code("85756007", "SCT", "Tissue"), Code("85756007", "SNM3", "tissue"))
    assert not same_concept(Code("10200004", "SCT", "Liver"), Code("10200004", "DCM", "Liver"))
    assert not same_concept(KIDNEY, None) and same_concept(None, None)


def test_a_segment_matching_nothing_is_logged_escaped_and_truncated(caplog) -> None:  # type: ignore[no-untyped-def]
    hostile = "\x1b[2J\nFAKE: liver accepted " + "x" * 500
    with caplog.at_level("WARNING", logger="dicom_node.pipeline.segment_matching"):
        assert match_segments([_info(hostile, Code("1\n2", "99\x1b", "odd"))], SPECS) == {}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "matches no model label" in line
    assert "\x1b" not in line and "\n" not in line and "\\x1b" in line
    assert "x" * 100 not in line and "...(+" in line
