"""Reading the identifying header of a received instance, with its checks."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_node.dicom.encoding import EncodingError, check_encoding
from dicom_node.dicom.status import Status
from dicom_node.errors import InvalidDatasetError
from dicom_node.store.files import check_uid


class RefusedInstance(InvalidDatasetError):
    """An instance the node will not store; ``status`` is the DIMSE answer."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What the index needs to know of an instance (no patient data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    series_number: int | None
    instance_number: int | None
    study_date: str | None


def dataset_offset(data: bytes) -> int:
    """Offset of the dataset after the preamble and file meta group of a Part 10 file."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, "no DICOM file meta information")
    tag = struct.unpack_from("<HH", data, 132)
    if tag != (0x0002, 0x0000):
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, "file meta group length missing")
    group_length = struct.unpack_from("<I", data, 140)[0]
    offset = 144 + group_length
    if offset > len(data):
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, "file meta group is truncated")
    return offset


def _text(ds: pydicom.Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def parse_instance(
    data: bytes,
    *,
    transfer_syntax_uid: str,
    context_sop_class_uid: str | None,
    command_sop_instance_uid: str | None,
    max_bytes: int,
) -> InstanceHeader:
    """Check and read a received Part 10 byte stream.

    Raises
    ------
    RefusedInstance
        0xA700 over the size limit; 0xC210 the bytes cannot be decoded (garbage,
        truncated, an element longer than the data); 0xA900 SOP Class differs from the
        presentation context, SOP Instance UID differs from the command, or a required
        UID is missing or invalid.
    """
    if len(data) > max_bytes:
        raise RefusedInstance(
            Status.OUT_OF_RESOURCES, f"dataset of {len(data)} bytes exceeds {max_bytes}"
        )
    offset = dataset_offset(data)
    body = data
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            body = data[:offset] + zlib.decompress(data[offset:], -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise RefusedInstance(Status.CANNOT_UNDERSTAND, f"cannot inflate: {exc}") from exc
    try:
        check_encoding(
            body,
            offset,
            implicit=transfer_syntax_uid == ImplicitVRLittleEndian,
            little=transfer_syntax_uid != ExplicitVRBigEndian,
            max_value=max_bytes,
        )
    except EncodingError as exc:
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, str(exc)) from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sop_class = ds.get("SOPClassUID")
        sop_instance = ds.get("SOPInstanceUID")
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
    except (InvalidDicomError, ValueError, KeyError, EOFError, struct.error, TypeError) as exc:
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, f"cannot decode dataset: {exc}") from exc
    try:
        header = InstanceHeader(
            sop_class_uid=check_uid(sop_class, "SOPClassUID"),
            sop_instance_uid=check_uid(sop_instance, "SOPInstanceUID"),
            study_uid=check_uid(study_uid, "StudyInstanceUID"),
            series_uid=check_uid(series_uid, "SeriesInstanceUID"),
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(ds, "Modality", 16),
            body_part=_text(ds, "BodyPartExamined", 64),
            series_description=_text(ds, "SeriesDescription", 128),
            series_number=_int(ds, "SeriesNumber"),
            instance_number=_int(ds, "InstanceNumber"),
            study_date=_text(ds, "StudyDate", 8),
        )
    except InvalidDatasetError as exc:
        raise RefusedInstance(Status.DATASET_MISMATCH, str(exc)) from exc
    except (ValueError, TypeError) as exc:
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, f"cannot decode dataset: {exc}") from exc
    if context_sop_class_uid and header.sop_class_uid != context_sop_class_uid:
        raise RefusedInstance(
            Status.DATASET_MISMATCH,
            f"SOP Class {header.sop_class_uid} does not match the presentation context "
            f"{context_sop_class_uid}",
        )
    if command_sop_instance_uid and header.sop_instance_uid != command_sop_instance_uid:
        raise RefusedInstance(
            Status.DATASET_MISMATCH,
            "SOP Instance UID in the dataset differs from the C-STORE request",
        )
    return header
