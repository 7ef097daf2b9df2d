"""WADO-RS metadata of one instance: pure conversion, no server (unit tests)."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pydicom.config
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from viewer_bridge.index import InstanceRef
from viewer_bridge.metadata import PIXEL_DATA, instance_metadata

PIXEL_SPACING = Tag(0x00280030)


def header_and_ref() -> tuple[pydicom.Dataset, InstanceRef]:
    header = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ref = InstanceRef(str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                      str(header.SOPInstanceUID), str(header.SOPClassUID),
                      str(header.file_meta.TransferSyntaxUID), 1, Path("x.dcm"))
    return header, ref


def test_serving_metadata_never_touches_pydicoms_process_wide_validation_modes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge serves requests from a thread pool; a save-set-restore of pydicom's
    process-wide modes per request (what ``to_json_dict(suppress_invalid_tags=True)``
    does) leaves them strict when two requests interleave."""
    written: list[tuple[str, int]] = []
    for name in ("reading_validation_mode", "writing_validation_mode"):
        prop = getattr(pydicom.config.Settings, name)

        def record(self: pydicom.config.Settings, value: int, _p: property = prop,
                   _n: str = name) -> None:
            written.append((_n, value))
            _p.fset(self, value)  # type: ignore[misc]
        monkeypatch.setattr(pydicom.config.Settings, name, property(prop.fget, record))
    header, ref = header_and_ref()
    doc = instance_metadata(header, ref, "http://bridge")
    assert doc["00100010"]["vr"] == "PN"
    assert written == []


def test_an_element_that_cannot_be_converted_is_left_out_and_logged_escaped(
        caplog: pytest.LogCaptureFixture) -> None:
    header, ref = header_and_ref()
    hostile = b"abc\x1b[2J\\1"
    header._dict[PIXEL_SPACING] = RawDataElement(PIXEL_SPACING, "DS", len(hostile), hostile,
                                                 0, False, True)
    with caplog.at_level(logging.WARNING, logger="viewer_bridge.metadata"):
        doc = instance_metadata(header, ref, "http://bridge")
    assert "00280030" not in doc
    assert doc["00280010"] == {"vr": "US", "Value": [int(header.Rows)]}
    assert PIXEL_DATA in doc and "BulkDataURI" in doc[PIXEL_DATA]
    left_out = [r.getMessage() for r in caplog.records if "00280030" in r.getMessage()]
    assert len(left_out) == 1 and "\x1b" not in left_out[0]
