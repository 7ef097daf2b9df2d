"""Malformed C-STORE data: the right failure status, quarantined with an audit event,
and neither the association nor the service goes down.

The bad datasets are sent with pynetdicom as the SCU in "chunked" mode
(``STORE_SEND_CHUNKED_DATASET``): it streams the bytes after a file's meta group as
they are, without decoding, so the node sees exactly the malformed bytes.
"""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from dicom_node.node import Node
from tests.node.conftest import (
    Index,
    dataset_bytes,
    echoscu,
    make_ct_series,
    node_config_data,
)

pytestmark = [pytest.mark.peers, pytest.mark.filterwarnings("ignore:Invalid value for VR UI")]

C210, A900, A700 = 0xC210, 0xA900, 0xA700
MAX_INSTANCE_MB = 0.1  # CT_small (~39 KB) fits; the "too large" case carries 200 KB


@dataclass(frozen=True)
class BadInstance:
    name: str
    expected: int
    context: str          # the SOP Class of the presentation context (and the command)
    sop_uid: str          # Affected SOP Instance UID of the command
    body: bytes           # the encoded dataset, sent as is


def part10(body: bytes, sop_class: str, sop_uid: str) -> bytes:
    """A Part 10 file around ``body``: valid file meta, then the bytes unchanged."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue() + body


def encode(ds: pydicom.Dataset) -> bytes:
    """Explicit VR little endian dataset bytes, without validating values."""
    buf = pydicom.filebase.DicomBytesIO()
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        write_dataset(buf, ds, pydicom.filewriter._EncodingOptions(False, True))  # type: ignore[attr-defined]
    except AttributeError:
        write_dataset(buf, ds)
    finally:
        pydicom.config.settings.writing_validation_mode = old
    return bytes(buf.getvalue())


def bad_instances(template_path: Path) -> list[BadInstance]:
    good = pydicom.dcmread(template_path)
    uid = str(good.SOPInstanceUID)
    body = dataset_bytes(template_path)

    # An OB element declaring 1 000 000 bytes followed by 16: longer than the data.
    oversized = body + struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, 1_000_000) + b"\0" * 16

    traversal = copy.deepcopy(good)
    traversal.SOPInstanceUID = "../../etc"
    traversal_study = copy.deepcopy(good)
    traversal_study.StudyInstanceUID = "../../../../tmp"
    traversal_study.SOPInstanceUID = fresh = generate_uid()

    large = copy.deepcopy(good)
    large.SOPInstanceUID = large_uid = generate_uid()
    large.add_new((0x0009, 0x0010), "LO", "TESSERA TEST")
    large.add_new((0x0009, 0x1000), "OB", b"\x00" * 200_000)

    return [
        BadInstance("truncated", C210, CTImageStorage, uid, body[: len(body) // 2]),
        BadInstance("sop-class-mismatch", A900, MRImageStorage, uid, body),
        BadInstance("garbage", C210, CTImageStorage, uid, b"this is not DICOM " * 64),
        BadInstance("oversized-element", C210, CTImageStorage, uid, oversized),
        BadInstance("too-large", A700, CTImageStorage, large_uid, encode(large)),
        BadInstance("traversal-sop-uid", A900, CTImageStorage, "../../etc", encode(traversal)),
        BadInstance("traversal-study-uid", A900, CTImageStorage, fresh,
                    encode(traversal_study)),
    ]


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """Make pynetdicom send file bytes undecoded (restored afterwards)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


CASES = ["truncated", "sop-class-mismatch", "garbage", "oversized-element", "too-large",
         "traversal-sop-uid", "traversal-study-uid"]


@pytest.mark.parametrize("case", CASES)
def test_malformed_instance_is_refused_quarantined_and_service_lives_on(
    case: str, tmp_path: Path, chunked_send: None, start_node: Callable[..., Node],
    open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "good", 2)
    bad = next(b for b in bad_instances(series.files[0]) if b.name == case)
    bad_file = tmp_path / "bad.dcm"
    bad_file.write_bytes(part10(bad.body, bad.context, bad.sop_uid))
    good_file = series.files[1]

    data_dir = tmp_path / "node"
    node = start_node(node_config_data(data_dir, dicom={"max_instance_mb": MAX_INSTANCE_MB}))

    ae = AE(ae_title="MALFORMED")
    ae.add_requested_context(bad.context, ExplicitVRLittleEndian)
    if bad.context != CTImageStorage:
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(bad_file)
        assert status and int(status.Status) == bad.expected, \
            f"{case}: got {getattr(status, 'Status', None)!r}, want 0x{bad.expected:04X}"
        # The same association keeps working for a good instance.
        status = assoc.send_c_store(good_file)
        assert status and int(status.Status) == 0x0000
    finally:
        assoc.release()

    assert echoscu(node.port).returncode == 0

    index = open_index(data_dir)
    assert index.sop_uids() == {series.sop_uids[1]}
    events = index.audit("instance-refused")
    assert len(events) == 1, [e.reason for e in events]
    assert events[0].status == bad.expected
    assert events[0].peer_ae == "MALFORMED"
    quarantine = data_dir / "quarantine"
    bins, metas = list(quarantine.glob("*.bin")), list(quarantine.glob("*.json"))
    assert len(bins) == 1 and len(metas) == 1
    assert events[0].quarantine_path == str(bins[0].resolve())
    kept = bins[0].read_bytes()
    if kept[128:132] == b"DICM":  # kept as a Part 10 file, or as the bare dataset
        kept = dataset_bytes(kept)
    assert kept == bad.body, "the quarantine must keep the bytes as received"
    assert f'"status": {bad.expected}' in metas[0].read_text()

    # Nothing was written outside the instance root (path traversal).
    stored = {p.resolve() for p in tmp_path.rglob("*.dcm")}
    allowed = {good_file.resolve(), bad_file.resolve()} | {
        p.resolve() for p in (series.files[0],)}
    instances_root = (data_dir / "instances").resolve()
    outside = {p for p in stored - allowed if not p.is_relative_to(instances_root)}
    assert not outside, outside
    assert not list(instances_root.rglob("*etc*"))
    assert not list(instances_root.rglob("*tmp*"))
