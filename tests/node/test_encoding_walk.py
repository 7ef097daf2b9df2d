"""The structural walk every received instance goes through (``dicom.encoding``): it
reads the elements the index needs and refuses every truncation with an
:class:`EncodingError`, whichever path (the fast one, or the careful one for the last
bytes) reads the element a cut falls in."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.dicom.encoding import EncodingError, check_encoding
from dicom_node.dicom.meta import dataset_offset

# (file, implicit VR, little endian)
SOURCES = [("CT_small.dcm", False, True), ("MR_small_implicit.dcm", True, True),
           ("MR_small_bigendian.dcm", False, False), ("JPEG2000.dcm", False, True)]
WANTED = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID",
          0x0020000E: "SeriesInstanceUID"}


def dataset_of(name: str) -> bytes:
    raw = Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]
    return raw[dataset_offset(raw):]


@pytest.mark.parametrize(("name", "implicit", "little"), SOURCES)
def test_the_walk_reads_the_wanted_values_as_pydicom_does(
        name: str, implicit: bool, little: bool) -> None:
    found = check_encoding(dataset_of(name), 0, implicit=implicit, little=little,
                           max_value=1 << 30, wanted=frozenset(WANTED))
    ds = pydicom.dcmread(get_testdata_file(name))  # type: ignore[arg-type]
    assert {WANTED[t]: v.rstrip(b"\x00 ").decode() for t, v in found.items()} == \
        {k: str(ds[k].value) for k in WANTED.values()}


@pytest.mark.parametrize(("name", "implicit", "little"), SOURCES)
def test_a_cut_inside_an_element_is_refused_as_truncated(
        name: str, implicit: bool, little: bool) -> None:
    """A cut between two top-level elements leaves a valid, shorter dataset (and the rest
    is one too); any other cut is an :class:`EncodingError`, never a crash."""
    data = dataset_of(name)
    # Every cut in the first 2 KiB (short elements, sequences), the last 64 bytes (the
    # careful path) and every 97th byte in between.
    cuts = {*range(1, min(2048, len(data))), *range(max(1, len(data) - 64), len(data)),
            *range(2048, len(data), 97)}
    refused = 0
    for cut in sorted(cuts):
        try:
            check_encoding(data[:cut], 0, implicit=implicit, little=little,
                           max_value=1 << 30)
        except EncodingError as exc:
            assert re.search(r"truncated|declares|undefined length|invalid VR|"
                             r"expected a sequence item", str(exc)), (cut, exc)
            refused += 1
        else:  # a boundary: what follows walks on its own
            check_encoding(data[cut:], 0, implicit=implicit, little=little,
                           max_value=1 << 30)
    assert refused > len(cuts) // 2
