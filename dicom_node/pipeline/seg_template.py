"""A DICOM-SEG encoded before its labels exist, filled in once inference is done.

With every frame kept (``omit_empty_frames=False``, see :mod:`dicom_node.pipeline.seg`)
nothing in a SEG but its Pixel Data depends on the labels: the frames, their order and
every per-frame functional group follow from the source series and the segment list
alone. So the inference job encodes the SEG with empty frames while the model runs
(on another thread) and afterwards only packs the label bits into the Pixel Data
value, which is the last element of the encoded object. Building and writing the
per-frame items is most of a SEG's cost (about 0.6 s for 128 slices and 5 segments);
filling in takes milliseconds.

The result is byte for byte what :func:`~dicom_node.pipeline.seg.build_seg` writes for
the same labels, apart from the content date and time (tested).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.pixels.utils import pack_bits
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.errors import DicomNodeError
from dicom_node.pipeline.seg import SegAlgorithm, SegmentSpec, build_seg
from dicom_node.pipeline.volume import Volume

# (7FE0,0010) OB, explicit VR little endian: tag, VR, two reserved bytes, 32-bit length.
_PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00"


class TemplateMismatch(DicomNodeError, RuntimeError):
    """The encoded template is not laid out as filling in requires; build the SEG whole."""


@dataclass(frozen=True)
class SegTemplate:
    """The encoded SEG (Part 10 bytes) with empty frames, and how to fill them in."""

    encoded: bytes
    transfer_syntax_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    shape: tuple[int, int, int]
    lut: np.ndarray  # label value -> segment number (0: none)
    frame_segments: np.ndarray  # per frame: its segment number
    frame_slices: np.ndarray  # per frame: its slice index in the volume
    pixel_offset: int  # where the Pixel Data value starts in ``encoded``

    @classmethod
    def prepare(
        cls, volume: Volume, specs: Sequence[SegmentSpec], algorithm: SegAlgorithm
    ) -> SegTemplate:
        """Encode the SEG of ``volume`` with every frame empty.

        Raises
        ------
        TemplateMismatch
            The object is not explicit VR little endian with an OB Pixel Data as its
            last element, or a frame does not map to one source slice and segment.
        """
        seg = build_seg(volume, np.zeros(volume.shape, np.uint8), specs, algorithm)
        syntax = str(seg.file_meta.TransferSyntaxUID)
        if syntax != ExplicitVRLittleEndian or int(seg.BitsAllocated) != 1:
            raise TemplateMismatch(f"SEG written as {syntax}, {seg.BitsAllocated} bits")
        slice_of = {ref: k for k, ref in enumerate(volume.source_frames)}
        segments, slices = [], []
        # With one segment, highdicom identifies it once, in the shared functional groups.
        shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
        for item in seg.PerFrameFunctionalGroupsSequence:
            source = item.DerivationImageSequence[0].SourceImageSequence[0]
            ident = item.get("SegmentIdentificationSequence") or shared
            if not ident:
                raise TemplateMismatch("a frame has no SegmentIdentificationSequence")
            segments.append(int(ident[0].ReferencedSegmentNumber))
            frame = int(source.get("ReferencedFrameNumber", 0) or 0) if volume.frame_numbers else 0
            slices.append(slice_of[(str(source.ReferencedSOPInstanceUID), frame)])
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        encoded = buffer.getvalue()
        size = len(seg.PixelData)
        header = _PIXEL_DATA_TAG + struct.pack("<I", size)
        offset = len(encoded) - size
        if encoded[offset - len(header):offset] != header or any(encoded[offset:]):
            raise TemplateMismatch("Pixel Data is not the last element of the encoded SEG")
        lut = np.zeros(256, np.uint8)
        for number, spec in enumerate(specs, start=1):
            if spec.label < lut.size:
                lut[spec.label] = number
        return cls(
            encoded=encoded,
            transfer_syntax_uid=syntax,
            sop_instance_uid=str(seg.SOPInstanceUID),
            series_instance_uid=str(seg.SeriesInstanceUID),
            shape=volume.shape,
            lut=lut,
            frame_segments=np.asarray(segments, np.uint8),
            frame_slices=np.asarray(slices, np.intp),
            pixel_offset=offset,
        )

    def fill(self, labels: np.ndarray) -> bytes:
        """The encoded SEG with ``labels`` (uint8, the volume's shape) in its frames."""
        if labels.shape != self.shape:
            raise ValueError(f"labels shape {labels.shape} differs from volume {self.shape}")
        segment_map = self.lut[np.asarray(labels, np.uint8)]
        frames = segment_map[self.frame_slices] == self.frame_segments[:, None, None]
        packed = pack_bits(frames, pad=False)
        size = len(self.encoded) - self.pixel_offset
        if len(packed) > size or size - len(packed) > 1:
            raise TemplateMismatch(f"{len(packed)} bytes of frames for {size} of Pixel Data")
        return b"".join(
            (self.encoded[: self.pixel_offset], packed, bytes(size - len(packed)))
        )
