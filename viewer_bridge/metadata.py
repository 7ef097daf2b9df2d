"""WADO-RS metadata (PS3.18 8.7.2): instance headers as DICOM JSON, pixel data by BulkDataURI."""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.dicom.peer_text import escaped
from viewer_bridge.index import InstanceRef
from viewer_bridge.negotiation import NATIVE

LOGGER = logging.getLogger(__name__)

PIXEL_DATA = "7FE00010"
AVAILABLE_TRANSFER_SYNTAX = "00083002"


def instance_url(base: str, ref: InstanceRef) -> str:
    return (f"{base}/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_instance_uid}")


def json_elements(header: Dataset, ref: InstanceRef) -> dict[str, Any]:
    """Each element of ``header`` in the DICOM JSON model; one that cannot be converted is
    left out and logged, so one bad value does not cost the viewer the whole instance.

    Not ``Dataset.to_json_dict(suppress_invalid_tags=True)``: that wraps the conversion in
    ``pydicom.config.strict_reading()``, which sets pydicom's *process-wide* reading mode
    to RAISE and puts back what it saw. Two requests served at once in the bridge's thread
    pool interleave those saves and restores and can leave the whole process strict (and
    meanwhile every other thread reads strictly)."""
    doc: dict[str, Any] = {}
    for tag in header.keys():  # noqa: SIM118 (iterating a Dataset converts outside the try)
        try:
            doc[f"{tag:08X}"] = header[tag].to_json_dict(
                bulk_data_element_handler=None, bulk_data_threshold=1 << 30)
        except Exception as exc:  # a value a peer sent that pydicom cannot convert
            LOGGER.warning("metadata of instance %s: element %08X left out: %s",
                           escaped(ref.sop_instance_uid), int(tag), escaped(exc))
    return doc


def instance_metadata(header: Dataset, ref: InstanceRef, base: str) -> dict[str, Any]:
    """``header`` (read without pixel data) as DICOM JSON; PixelData as a BulkDataURI."""
    doc = json_elements(header, ref)
    doc[AVAILABLE_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [ref.transfer_syntax_uid]}
    if "Rows" in header and "Columns" in header:
        native = ref.transfer_syntax_uid in NATIVE
        vr = "OW" if native and int(header.get("BitsAllocated", 8)) > 8 else "OB"
        doc[PIXEL_DATA] = {"vr": vr,
                           "BulkDataURI": f"{instance_url(base, ref)}/bulkdata/{PIXEL_DATA}"}
    return dict(sorted(doc.items()))
