"""Frames of an enhanced multi-frame image (Enhanced CT/MR, Legacy Converted Enhanced)
as the slices of a series.

Each frame's geometry comes from its functional groups, per frame or shared: Plane
Position (ImagePositionPatient), Plane Orientation (ImageOrientationPatient) and Pixel
Measures (PixelSpacing). Pixel values go through highdicom's frame access with the
modality (rescale) transform, so CT frames are in HU as single-frame slices are.
Whether the frames form one regular grid is decided by :func:`build_volume
<dicom_node.pipeline.volume.build_volume>`, with the same checks as for a series of
single-frame instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import DicomNodeError


class FrameGeometryError(DicomNodeError, ValueError):
    """A frame's geometry is missing or unreadable; the message says which frame."""


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies: 1-based frame number, IPP, IOP and PixelSpacing."""

    frame_number: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray


def is_multi_frame(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1


def _group(item: Dataset, shared: Dataset, keyword: str) -> Dataset | None:
    seq = item.get(keyword) or shared.get(keyword)
    return seq[0] if seq else None


def float_values(group: Dataset | None, keyword: str, n: int) -> np.ndarray | None:
    """``group``'s ``keyword`` as ``n`` floats, or ``None`` when missing or malformed."""
    value = group.get(keyword) if group is not None else None
    if value is None or len(value) != n:
        return None
    try:
        return np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None


def frame_geometry(ds: Dataset) -> list[FrameGeometry]:
    """The geometry of every frame of ``ds``, in frame order.

    Raises
    ------
    FrameGeometryError
        No per-frame functional groups, or a frame without plane position,
        orientation or pixel spacing.
    """
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not frames:
        raise FrameGeometryError(f"no per-frame functional groups: the position of its "
                                 f"{count} frames is unknown")
    if len(frames) != count:
        raise FrameGeometryError(
            f"{len(frames)} per-frame functional group items for {count} frames")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    out = []
    for n, item in enumerate(frames, start=1):
        ipp = float_values(_group(item, shared, "PlanePositionSequence"), "ImagePositionPatient", 3)
        iop = float_values(_group(item, shared, "PlaneOrientationSequence"),
                      "ImageOrientationPatient", 6)
        ps = float_values(_group(item, shared, "PixelMeasuresSequence"), "PixelSpacing", 2)
        if ipp is None or iop is None or ps is None:
            raise FrameGeometryError(
                f"frame {n} has no plane position, plane orientation or pixel spacing "
                "in its functional groups")
        out.append(FrameGeometry(n, ipp, iop, ps))
    return out


def frame_pixels(ds: Dataset, frame_numbers: Sequence[int]) -> np.ndarray:
    """The frames ``frame_numbers`` (1-based) of ``ds`` in modality units, stacked."""
    image = hd.Image.from_dataset(ds, copy=False)
    return np.stack([
        image.get_frame(n, dtype=np.float32, apply_real_world_transform=False)
        for n in frame_numbers])
