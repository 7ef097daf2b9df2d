"""Part 10 file framing: preamble, ``DICM`` and the file meta group, encoded directly.

The dataset bytes themselves are never touched, so a stored file holds exactly what
the peer sent after a meta group that records how it was sent.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB",):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10(
    dataset: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae: str | None = None,
) -> bytes:
    """Frame raw dataset bytes as a DICOM Part 10 file."""
    elements = [
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _pad(sop_class_uid, b"\x00")),
        _element(0x0002, 0x0003, b"UI", _pad(sop_instance_uid, b"\x00")),
        _element(0x0002, 0x0010, b"UI", _pad(transfer_syntax_uid, b"\x00")),
        _element(0x0002, 0x0012, b"UI", _pad(str(PYNETDICOM_IMPLEMENTATION_UID), b"\x00")),
        _element(0x0002, 0x0013, b"SH", _pad(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ]
    if source_ae:
        elements.append(_element(0x0002, 0x0016, b"AE", _pad(source_ae.strip()[:16], b" ")))
    body = b"".join(elements)
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"".join((b"\x00" * 128, b"DICM", group_length, body, dataset))


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts in a Part 10 byte stream (after preamble and meta group).

    Raises
    ------
    ValueError
        No ``DICM`` prefix or no group length element first in the meta group.
    """
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM Part 10 stream with a file meta group length")
    return 144 + int(struct.unpack_from("<I", data, 140)[0])
