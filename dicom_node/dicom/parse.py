"""Reading the identifying header of a received dataset, with its checks.

The dataset is walked once by :func:`check_encoding`, which both proves it is
structurally sound and picks out the few top-level values the index needs; no
full decode happens on the receive path.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

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


SOP_CLASS = 0x00080016
SOP_INSTANCE = 0x00080018
STUDY_DATE = 0x00080020
MODALITY = 0x00080060
SERIES_DESCRIPTION = 0x0008103E
BODY_PART = 0x00180015
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SERIES_NUMBER = 0x00200011
INSTANCE_NUMBER = 0x00200013
_WANTED = frozenset({SOP_CLASS, SOP_INSTANCE, STUDY_DATE, MODALITY, SERIES_DESCRIPTION,
                     BODY_PART, STUDY_UID, SERIES_UID, SERIES_NUMBER, INSTANCE_NUMBER})


def _text(raw: bytes | None, limit: int) -> str | None:
    if not raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.strip(" \x00")
    return text[:limit] or None


def _int(raw: bytes | None) -> int | None:
    text = _text(raw, 16)
    if text is None:
        return None
    try:
        return int(text.split("\\")[0])
    except ValueError:
        return None


def parse_instance(
    dataset: bytes,
    *,
    transfer_syntax_uid: str,
    context_sop_class_uid: str | None,
    command_sop_instance_uid: str | None,
    max_bytes: int,
) -> InstanceHeader:
    """Check and read a received dataset (without file meta).

    Raises
    ------
    RefusedInstance
        0xA700 over the size limit; 0xC210 the bytes cannot be decoded (garbage,
        truncated, an element longer than the data); 0xA900 SOP Class differs from the
        presentation context, SOP Instance UID differs from the command, or a required
        UID is missing or invalid.
    """
    body = _sized_body(dataset, transfer_syntax_uid, max_bytes)
    values = _wanted_values(body, transfer_syntax_uid, max_bytes)
    header = _header(values, transfer_syntax_uid)
    _check_request_match(header, context_sop_class_uid, command_sop_instance_uid)
    return header


def _sized_body(dataset: bytes, transfer_syntax_uid: str, max_bytes: int) -> bytes:
    """The dataset's bytes, inflated for the deflated syntax, within ``max_bytes``."""
    if len(dataset) > max_bytes:
        raise RefusedInstance(
            Status.OUT_OF_RESOURCES, f"dataset of {len(dataset)} bytes exceeds {max_bytes}"
        )
    if not dataset:
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, "empty dataset")
    body = dataset
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            body = inflater.decompress(dataset, max_bytes + 1)
        except zlib.error as exc:
            raise RefusedInstance(Status.CANNOT_UNDERSTAND, f"cannot inflate: {exc}") from exc
        if len(body) > max_bytes:
            raise RefusedInstance(Status.OUT_OF_RESOURCES, "inflated dataset exceeds the limit")
    return body


def _wanted_values(body: bytes, transfer_syntax_uid: str, max_bytes: int) -> dict[int, bytes]:
    """The one walk over the dataset: proves its encoding, picks out the wanted values."""
    try:
        return check_encoding(
            body,
            0,
            implicit=transfer_syntax_uid == ImplicitVRLittleEndian,
            little=transfer_syntax_uid != ExplicitVRBigEndian,
            max_value=max_bytes,
            wanted=_WANTED,
        )
    except EncodingError as exc:
        raise RefusedInstance(Status.CANNOT_UNDERSTAND, str(exc)) from exc


def _header(values: dict[int, bytes], transfer_syntax_uid: str) -> InstanceHeader:
    """The header from the picked values; a missing or invalid UID is a mismatch."""
    try:
        return InstanceHeader(
            sop_class_uid=check_uid(_text(values.get(SOP_CLASS), 80), "SOPClassUID"),
            sop_instance_uid=check_uid(_text(values.get(SOP_INSTANCE), 80), "SOPInstanceUID"),
            study_uid=check_uid(_text(values.get(STUDY_UID), 80), "StudyInstanceUID"),
            series_uid=check_uid(_text(values.get(SERIES_UID), 80), "SeriesInstanceUID"),
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(values.get(MODALITY), 16),
            body_part=_text(values.get(BODY_PART), 64),
            series_description=_text(values.get(SERIES_DESCRIPTION), 128),
            series_number=_int(values.get(SERIES_NUMBER)),
            instance_number=_int(values.get(INSTANCE_NUMBER)),
            study_date=_text(values.get(STUDY_DATE), 8),
        )
    except InvalidDatasetError as exc:
        raise RefusedInstance(Status.DATASET_MISMATCH, str(exc)) from exc


def _check_request_match(header: InstanceHeader, context_sop_class_uid: str | None,
                         command_sop_instance_uid: str | None) -> None:
    """The dataset's SOP Class and Instance UID agree with the association and command."""
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
