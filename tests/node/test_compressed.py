"""Compressed instances (JPEG baseline/extended/lossless, JPEG 2000, RLE) are stored and
forwarded exactly as received: same transfer syntax, same dataset bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.node import Node
from dicom_node.store.models import SeriesState
from tests.node.conftest import (
    Index,
    StoreSCP,
    as_storescu_sends,
    dataset_bytes,
    forward_rule,
    node_config_data,
    storescu,
    wait_until,
)
from tests.peers import missing

pytestmark = pytest.mark.peers

# file name -> transfer syntax it carries
SOURCES = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",           # JPEG baseline
    "JPEG-lossy.dcm": "1.2.840.10008.1.2.4.51",                  # JPEG extended 12 bit
    "JPEG-LL.dcm": "1.2.840.10008.1.2.4.70",                     # JPEG lossless SV1
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "1.2.840.10008.1.2.4.70",  # pydicom-data, US
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",       # JPEG 2000 lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",                    # JPEG 2000
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",                   # RLE lossless
    "SC_rgb_rle.dcm": "1.2.840.10008.1.2.5",
}

# storescu option that proposes each transfer syntax first
PROPOSE = {
    "1.2.840.10008.1.2.4.50": "--propose-jpeg8",
    "1.2.840.10008.1.2.4.51": "--propose-jpeg12",
    "1.2.840.10008.1.2.4.70": "--propose-lossless",
    "1.2.840.10008.1.2.4.90": "--propose-j2k-lossless",
    "1.2.840.10008.1.2.4.91": "--propose-j2k-lossy",
    "1.2.840.10008.1.2.5": "--propose-rle",
}


def fresh_copies(directory: Path) -> dict[Path, str]:
    """Copies with fresh UIDs (some test files share a SOP Instance UID); the
    compressed pixel data is written back unchanged. Returns path -> transfer syntax."""
    directory.mkdir()
    out: dict[Path, str] = {}
    for name, ts in SOURCES.items():
        source = get_testdata_file(name)
        if source is None:
            missing(f"pydicom test file {name} (pydicom-data) is not installed")
        ds = pydicom.dcmread(source)
        assert ds.file_meta.TransferSyntaxUID == ts
        as_storescu_sends(ds)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        path = directory / name
        ds.save_as(path, enforce_file_format=True)
        out[path] = ts
    return out


def test_compressed_instances_stored_and_forwarded_unchanged(
    tmp_path: Path, storescp_factory: Callable[..., StoreSCP],
    start_node: Callable[..., Node], open_index: Callable[[Path], Index],
) -> None:
    files = fresh_copies(tmp_path / "compressed")
    scp = storescp_factory()
    data_dir = tmp_path / "node"
    node = start_node(node_config_data(
        data_dir,
        destinations={"scp": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}},
        rules=[forward_rule("all", "scp")],
    ))
    for path, ts in files.items():
        # -R with the file's own transfer syntax proposed first: sent as it is.
        sent = storescu(node.port, path, options=("-R", PROPOSE[ts], "-v"))
        output = sent.stdout + sent.stderr
        assert sent.returncode == 0, output
        assert "Received Store Response (Success)" in output, output
        conversions = [line.split("transfer syntax:", 1)[1].split("->")
                       for line in output.splitlines() if "Converting transfer syntax" in line]
        assert all(a.strip() == b.strip() for a, b in conversions), output

    index = open_index(data_dir)
    stored = index.instance_paths()
    sources: dict[str, tuple[Path, str]] = {}
    for path, ts in files.items():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        sources[uid] = (path, ts)
        copy = stored[uid]
        assert pydicom.dcmread(copy, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
        assert dataset_bytes(copy) == dataset_bytes(path), f"{path.name} changed when stored"

    wait_until(lambda: len(scp.received()) >= len(files), timeout=60,
               what="every compressed instance at storescp")
    for path in scp.received():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        source, ts = sources[str(ds.SOPInstanceUID)]
        assert ds.file_meta.TransferSyntaxUID == ts, f"{source.name} re-encoded on export"
        assert dataset_bytes(path) == dataset_bytes(source), f"{source.name} changed on export"
    assert len(scp.received()) == len(files)
    for uid in {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                for p in files}:
        wait_until(lambda u=uid: index.series_state(u) == SeriesState.FORWARDED, timeout=30,
                   what=f"series {uid} forwarded")
