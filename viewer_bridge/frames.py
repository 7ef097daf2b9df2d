"""Pixel data frames of a stored instance, as stored or decoded to native little endian."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from viewer_bridge.errors import BridgeError
from viewer_bridge.negotiation import NATIVE

LOGGER = logging.getLogger(__name__)


class NoSuchFrame(BridgeError, LookupError):
    """A frame number outside 1..NumberOfFrames, or no pixel data (answered 404)."""


def _native_frames(ds: Dataset, numbers: Sequence[int], count: int) -> list[bytes]:
    data: bytes = ds.PixelData
    bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) \
        * int(ds.BitsAllocated)
    big = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    out = []
    for n in numbers:
        if bits % 8 == 0:
            size = bits // 8
            frame = data[(n - 1) * size:n * size]
            if big and int(ds.BitsAllocated) > 8:
                dtype = np.dtype(f">u{int(ds.BitsAllocated) // 8}")
                frame = np.frombuffer(frame, dtype).astype(dtype.newbyteorder("<")).tobytes()
        else:  # 1-bit data (SEG): frames need not start on a byte boundary
            flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
            frame = np.packbits(flat[(n - 1) * bits:n * bits], bitorder="little").tobytes()
        out.append(frame)
    return out


def read_frames(path: Path, numbers: Sequence[int], transfer_syntax: str) -> list[bytes]:
    """Frames ``numbers`` (1-based) in ``transfer_syntax``: the stored one, or explicit
    VR little endian (compressed data is decoded then).

    Raises
    ------
    NoSuchFrame
        No pixel data, or a frame number out of range.
    """
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise NoSuchFrame("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    bad = [n for n in numbers if n < 1 or n > count]
    if bad:
        raise NoSuchFrame(f"frame {bad[0]} out of range 1..{count}")
    stored = str(ds.file_meta.TransferSyntaxUID)
    if stored in NATIVE:
        return _native_frames(ds, numbers, count)
    if transfer_syntax == stored:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [frames[n - 1] for n in numbers]
    if transfer_syntax != ExplicitVRLittleEndian:
        raise NoSuchFrame(f"cannot convert {stored} to {transfer_syntax}")
    arr = ds.pixel_array
    if count == 1:
        arr = arr[np.newaxis]
    return [np.ascontiguousarray(arr[n - 1]).astype(arr.dtype.newbyteorder("<")).tobytes()
            for n in numbers]


def parse_frame_list(text: str) -> list[int]:
    """``'1,3,5'`` -> ``[1, 3, 5]``; raises ValueError on anything else."""
    numbers = [int(p) for p in text.split(",") if p.strip()]
    if not numbers or len(numbers) > 10_000:
        raise ValueError("a frame list is 1 to 10000 comma-separated numbers")
    return numbers
