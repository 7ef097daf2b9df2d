"""WADO-RS metadata (PS3.18 8.7.2): instance headers as DICOM JSON, pixel data by BulkDataURI."""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset

from viewer_bridge.index import InstanceRef
from viewer_bridge.negotiation import NATIVE

LOGGER = logging.getLogger(__name__)

PIXEL_DATA = "7FE00010"
AVAILABLE_TRANSFER_SYNTAX = "00083002"


def instance_url(base: str, ref: InstanceRef) -> str:
    return (f"{base}/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_instance_uid}")


def instance_metadata(header: Dataset, ref: InstanceRef, base: str) -> dict[str, Any]:
    """``header`` (read without pixel data) as DICOM JSON; PixelData as a BulkDataURI."""
    doc: dict[str, Any] = header.to_json_dict(bulk_data_threshold=1 << 30,
                                              suppress_invalid_tags=True)
    doc[AVAILABLE_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [ref.transfer_syntax_uid]}
    if "Rows" in header and "Columns" in header:
        native = ref.transfer_syntax_uid in NATIVE
        vr = "OW" if native and int(header.get("BitsAllocated", 8)) > 8 else "OB"
        doc[PIXEL_DATA] = {"vr": vr,
                           "BulkDataURI": f"{instance_url(base, ref)}/bulkdata/{PIXEL_DATA}"}
    return dict(sorted(doc.items()))
