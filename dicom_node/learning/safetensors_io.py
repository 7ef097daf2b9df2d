"""Raw safetensors I/O that needs nothing of the model: the header's metadata, read
without parsing tensors (so a pickle is refused before anything loads it, invariant 4).
Weights-like files are written with :func:`dicom_node.store.durable.write_atomic`.

A leaf module: it imports only the standard library and the learning errors, so the
weights, training and optimiser-state modules can all use it without importing each other.
"""

from __future__ import annotations

import json
import struct

from dicom_node.learning.errors import WeightsError

__all__ = ["MAX_HEADER_BYTES", "read_metadata"]

MAX_HEADER_BYTES = 16 * 1024 * 1024


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob; refuses anything else (pickles, zips)."""
    # A header length of 0x..80 makes safetensors start with the byte a pickle starts
    # with, so the refusal applies only to what is not shaped like safetensors.
    shaped = len(data) >= 9 and data[8:9] == b"{"
    if not shaped and (data[:1] == b"\x80" or data[:2] == b"PK"):
        raise WeightsError(
            "refusing a pickle/torch.save file: weights must be safetensors (no code is loaded)"
        )
    if len(data) < 8:
        raise WeightsError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8) or data[8:9] != b"{":
        raise WeightsError("not a safetensors file: bad header length or header")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"not a safetensors file: header is not JSON ({exc})") from exc
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise WeightsError("safetensors __metadata__ must be an object")
    return {str(k): str(v) for k, v in meta.items()}

