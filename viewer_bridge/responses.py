"""Small response helpers shared by the DICOMweb routes."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

DICOM_JSON = "application/dicom+json"


def dicom_json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), status_code=status,
                    media_type=DICOM_JSON, headers=headers)


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    """A 4xx/5xx answer whose body says why (JSON: ``{"error": reason}``)."""
    return Response(json.dumps({"error": reason}), status_code=status,
                    media_type="application/json", headers=headers)
