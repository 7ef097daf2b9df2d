"""SEGs as real viewers write them, made readable by highdicom.

OHIF 3.13 saves segmentations through dcmjs's Cornerstone adapter. Two of its
outputs are valid enough to store but cannot be read as they are:

- its Label Map SEG (the default Save) keeps a Dimension Index Sequence but writes no
  per-frame Frame Content Sequence, so highdicom cannot index the frames;
- its binary SEG (``segmentation.store.defaultMode: 'bitmap'``) is RLE Lossless with
  1 bit allocated, which pydicom's and pylibjpeg's RLE decoders refuse.

:func:`readable` returns a copy that highdicom reads (the caller's dataset is left as
it is), or the dataset itself when nothing needs adapting. Pixel values are never
changed: the frames are still placed by their source references or positions.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

LOGGER = logging.getLogger(__name__)


def readable(seg: Dataset) -> Dataset:
    out = seg
    if _frames_without_content(out):
        LOGGER.info("SEG %s: frames without Frame Content Sequence: read without its "
                    "dimension index", seg.get("SOPInstanceUID"))
        out = copy.deepcopy(out)
        del out.DimensionIndexSequence
    if _one_bit_rle(out):
        LOGGER.info("SEG %s: RLE Lossless with 1 bit allocated: decoded here",
                    seg.get("SOPInstanceUID"))
        out = _decoded_one_bit_rle(out if out is not seg else copy.deepcopy(seg))
    return out


def _frames_without_content(seg: Dataset) -> bool:
    return "DimensionIndexSequence" in seg and not all(
        "FrameContentSequence" in item
        for item in seg.get("PerFrameFunctionalGroupsSequence") or [])


def _one_bit_rle(seg: Dataset) -> bool:
    meta = getattr(seg, "file_meta", None)
    return (meta is not None and meta.get("TransferSyntaxUID") == RLELossless
            and int(seg.get("BitsAllocated", 0) or 0) == 1 and "PixelData" in seg)


def _decoded_one_bit_rle(seg: Dataset) -> Dataset:
    """Each RLE frame holds the frame's bits packed into bytes (little-endian bit
    order): decode it as one row of 8-bit bytes with pydicom, unpack the bits, and
    store all frames as native (uncompressed) 1-bit pixel data."""
    frames = int(seg.get("NumberOfFrames", 1) or 1)
    pixels = int(seg.Rows) * int(seg.Columns)
    per_frame = (pixels + 7) // 8
    view = copy.deepcopy(seg)
    view.BitsAllocated, view.BitsStored, view.HighBit = 8, 8, 7
    view.Rows, view.Columns = 1, per_frame
    packed = np.asarray(view.pixel_array, dtype=np.uint8).reshape(frames, per_frame)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :pixels]
    seg.PixelData = np.packbits(bits.ravel(), bitorder="little").tobytes()
    seg["PixelData"].VR = "OB"
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return seg
