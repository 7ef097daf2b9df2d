"""STOW-RS (PS3.18 10.5): store Part 10 instances from a multipart/related body.

Every instance goes through the same path as a C-STORE (:func:`parse_instance`, the
node's own file meta group, :meth:`InstanceStore.ingest`): an instance listed in
ReferencedSOPSequence is fsync'd and indexed before the answer leaves, and a SEG
stored here reaches the series assembler and the correction intake exactly like
one received over DIMSE. Refused parts are quarantined with an audit event.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pydicom

from dicom_node.dicom.meta import part10
from dicom_node.dicom.parse import RefusedInstance, parse_instance
from dicom_node.dicom.peer_text import escaped
from dicom_node.dicom.status import Status
from dicom_node.prometheus import count_received, count_refused
from dicom_node.store.files import check_uid
from dicom_node.store.instances import IngestOutcome, InstanceStore, Peer
from viewer_bridge.multipart import Part

LOGGER = logging.getLogger(__name__)

DUPLICATE_CONFLICT = 0x0111     # Duplicate SOP Instance (PS3.7 C.4.2.1.6)
SOP_CLASS_NOT_SUPPORTED = 0x0122
DICOM = "application/dicom"


@dataclass
class StowResult:
    stored: list[tuple[str, str]] = field(default_factory=list)   # (class, instance)
    failed: list[tuple[str | None, str | None, int, str]] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored, 409 none stored (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_json(self, retrieve_base: str, study_uid: str | None) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if study_uid:
            doc["00081190"] = {"vr": "UR", "Value": [f"{retrieve_base}/studies/{study_uid}"]}
        if self.failed:
            doc["00081198"] = {"vr": "SQ", "Value": [{
                "00081150": _ui(cls), "00081155": _ui(sop),
                "00081197": {"vr": "US", "Value": [status]},
            } for cls, sop, status, _ in self.failed]}
        if self.stored:
            doc["00081199"] = {"vr": "SQ", "Value": [{
                "00081150": _ui(cls), "00081155": _ui(sop),
            } for cls, sop in self.stored]}
        return doc


def _ui(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"}


def split_part10(data: bytes) -> int:
    """Where the dataset starts after the file meta group (explicit VR little endian).

    The 128-byte preamble and ``DICM`` are optional here: pydicom, and so
    dicomweb-client, writes a dataset read without a preamble without one.

    Raises
    ------
    ValueError
        No file meta group, or one that runs past the end of the data.
    """
    pos = start = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        elif vr.isalpha() and vr.isupper():
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
        else:
            raise ValueError("the file meta group is not explicit VR little endian")
    if pos == start:
        raise ValueError("no DICM prefix and no file meta group")
    if pos > len(data):
        raise ValueError("the file meta group runs past the end of the part")
    return pos


def _uid_or_none(value: object) -> str | None:
    try:
        return check_uid(value, "UID")
    except Exception:
        return None


class StowService:
    """Stores the parts of one STOW-RS request, each with its own outcome."""

    def __init__(self, store: InstanceStore, max_instance_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_instance_bytes

    def store_parts(self, parts: list[Part], study_uid: str | None, peer: Peer) -> StowResult:
        result = StowResult()
        for number, part in enumerate(parts, 1):
            self._store_one(number, part, study_uid, peer, result)
        return result

    def _refuse(self, result: StowResult, data: bytes, peer: Peer, status: int, reason: str,
                sop_class: str | None = None, sop: str | None = None) -> None:
        LOGGER.warning("STOW-RS part refused from %s: 0x%04X %s", escaped(peer.address), status,
                       escaped(reason, 200))
        self.store.quarantine(data, "stow-refused", reason, peer, sop, status=status)
        count_refused("stow", status)
        result.failed.append((sop_class, sop, status, reason))

    def _store_one(self, number: int, part: Part, study_uid: str | None, peer: Peer,
                   result: StowResult) -> None:
        data = part.data
        ctype = part.content_type or DICOM
        if ctype != DICOM:
            self._refuse(result, data, peer, SOP_CLASS_NOT_SUPPORTED,
                         f"part {number}: {ctype} is not {DICOM} (only Part 10 instances "
                         "are accepted)")
            return
        try:
            offset = split_part10(data)
            meta = pydicom.dcmread(BytesIO(data[:offset]), force=True).file_meta
            ts = check_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
        except Exception as exc:
            self._refuse(result, data, peer, int(Status.CANNOT_UNDERSTAND),
                         f"part {number}: not a DICOM Part 10 instance ({exc})")
            return
        meta_class = _uid_or_none(meta.get("MediaStorageSOPClassUID"))
        meta_sop = _uid_or_none(meta.get("MediaStorageSOPInstanceUID"))
        dataset = data[offset:]
        try:
            header = parse_instance(dataset, transfer_syntax_uid=ts,
                                    context_sop_class_uid=meta_class,
                                    command_sop_instance_uid=meta_sop,
                                    max_bytes=self.max_bytes)
        except RefusedInstance as exc:
            self._refuse(result, data, peer, int(exc.status), f"part {number}: {exc.reason}",
                         meta_class, meta_sop)
            return
        if study_uid is not None and header.study_uid != study_uid:
            self._refuse(result, data, peer, int(Status.DATASET_MISMATCH),
                         f"part {number}: StudyInstanceUID {header.study_uid} is not the "
                         f"study of the request URL ({study_uid})",
                         header.sop_class_uid, header.sop_instance_uid)
            return
        framed = part10(dataset, sop_class_uid=header.sop_class_uid,
                        sop_instance_uid=header.sop_instance_uid,
                        transfer_syntax_uid=header.transfer_syntax_uid)
        try:
            outcome = self.store.ingest(framed, header, peer)
        except Exception as exc:
            LOGGER.exception("cannot store %s from %s", header.sop_instance_uid,
                             escaped(peer.address))
            self.store.audit("store-failed", f"cannot store: {exc}", peer,
                             header.sop_instance_uid, header.series_uid,
                             status=int(Status.OUT_OF_RESOURCES))
            result.failed.append((header.sop_class_uid, header.sop_instance_uid,
                                  int(Status.OUT_OF_RESOURCES), f"cannot store: {exc}"))
            return
        if outcome is IngestOutcome.DUPLICATE_CONFLICT:
            result.failed.append((header.sop_class_uid, header.sop_instance_uid,
                                  DUPLICATE_CONFLICT,
                                  "SOP Instance UID already stored with other content"))
            return
        LOGGER.info("STOW-RS stored %s from %s (%s)", header.sop_instance_uid,
                    escaped(peer.address), outcome)
        result.stored.append((header.sop_class_uid, header.sop_instance_uid))
        count_received("stow")
