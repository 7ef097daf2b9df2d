"""Accept-header negotiation for WADO-RS (PS3.18 8.7): media types and transfer syntaxes."""

from __future__ import annotations

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from viewer_bridge.errors import BridgeError
from viewer_bridge.multipart import media_type

NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                    DeflatedExplicitVRLittleEndian})
OCTET = "application/octet-stream"
DICOM = "application/dicom"

# Compressed pixel data media types by transfer syntax (PS3.18 Table 8.7.3-4/5).
IMAGE_MEDIA: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class NotAcceptable(BridgeError, ValueError):
    """No representation the client accepts can be produced (answered 406)."""


def _ranges(accept: str | None) -> list[tuple[str, str | None, str | None]]:
    """``(media type, multipart part type, transfer-syntax)`` for each Accept entry."""
    out = []
    for entry in (accept or "*/*").split(","):
        if not entry.strip():
            continue
        mtype, params = media_type(entry)
        out.append((mtype, params.get("type"), params.get("transfer-syntax")))
    return out


def choose_instance_syntax(accept: str | None, stored: str) -> str:
    """Transfer syntax to send a whole instance in: the stored one or explicit VR LE."""
    for mtype, part_type, ts in _ranges(accept):
        dicom_part = (part_type or DICOM).lower() in (DICOM, "*/*")
        if (mtype in ("multipart/related", DICOM) and dicom_part) or \
                mtype in ("*/*", "multipart/*"):
            if ts == "*" or ts == stored or (ts is None and stored == ExplicitVRLittleEndian):
                return stored
            if ts in (None, ExplicitVRLittleEndian):
                return ExplicitVRLittleEndian
    raise NotAcceptable(f"cannot send this instance ({stored}) as {accept!r}; "
                        f"accepted: {DICOM} in {stored} or {ExplicitVRLittleEndian}")


def choose_frame_media(accept: str | None, stored: str) -> tuple[str, str]:
    """``(part media type, transfer syntax)`` for frames and pixel bulk data.

    Native stored data is sent as ``application/octet-stream`` (explicit VR little
    endian byte order); compressed data as stored (its image/* type, or octet-stream
    with ``transfer-syntax=*``) or decoded to native when only that is accepted.
    """
    native = stored in NATIVE
    stored_media = OCTET if native else IMAGE_MEDIA.get(stored, OCTET)
    for mtype, part_type, ts in _ranges(accept):
        wanted = (part_type or OCTET).lower() if mtype == "multipart/related" else mtype
        if mtype in ("*/*", "multipart/*"):
            wanted = "*/*"
        if wanted in (OCTET, "*/*", "application/*"):
            if ts == "*" and wanted != "*/*":
                return stored_media, ExplicitVRLittleEndian if native else stored
            if ts in (None, "*", ExplicitVRLittleEndian):
                return OCTET, ExplicitVRLittleEndian
            if ts == stored and not native:
                return stored_media, stored
        elif not native and wanted == stored_media and ts in (None, "*", stored):
            return stored_media, stored
    raise NotAcceptable(f"cannot send frames stored as {stored} as {accept!r}; "
                        f"accepted: {OCTET} ({ExplicitVRLittleEndian}) or {stored_media}")
