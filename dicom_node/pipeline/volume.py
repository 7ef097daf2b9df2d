"""Series -> volume: sort slices along the slice normal and check geometry.

Slices are single-frame instances, or the frames of one enhanced multi-frame instance
(Enhanced CT/MR, Legacy Converted Enhanced; geometry from its functional groups, see
:mod:`dicom_node.pipeline.multiframe`); both pass the same checks.

A series that cannot be turned into one regular volume is refused with
:class:`~dicom_node.errors.SeriesRefused` whose message says why, so the reason can be
shown to the PACS administrator (``tessera node status``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from dicom_node.errors import SeriesRefused
from dicom_node.pipeline.multiframe import (
    FrameGeometryError,
    float_values,
    frame_geometry,
    frame_pixels,
    is_multi_frame,
)

LOGGER = logging.getLogger(__name__)

# Tolerances: direction cosines are often written with 6 decimals, positions in 0.01 mm.
COSINE_TOL = 1e-3
POSITION_TOL_MM = 0.05
GAP_FACTOR_MISSING = 1.5
GAP_REL_TOL = 0.1


@dataclass(frozen=True, eq=False)
class Volume:
    """A regular stack of slices in modality units (HU for CT).

    ``pixels[k, r, c]`` lies at ``affine @ (k, r, c, 1)`` in patient coordinates (LPS,
    mm). Slices are ordered by increasing position along ``normal`` (row x column
    direction); ``datasets`` and ``sop_instance_uids`` follow that order.

    A volume of one multi-frame instance has that one dataset in ``datasets``; its
    SOP Instance UID is repeated in ``sop_instance_uids`` and ``frame_numbers`` gives
    each slice's (1-based) frame. Single-frame volumes have no ``frame_numbers``.
    """

    pixels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    orientation_cosines: tuple[float, float, float, float, float, float]
    positions: np.ndarray
    datasets: tuple[Dataset, ...]
    sop_instance_uids: tuple[str, ...]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    frame_numbers: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.pixels.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def normal(self) -> np.ndarray:
        return np.asarray(self.affine[:3, 0] / np.linalg.norm(self.affine[:3, 0]))

    @property
    def source_frames(self) -> tuple[tuple[str, int], ...]:
        """Per slice: (SOP Instance UID, frame number; 0 for a single-frame instance)."""
        frames = self.frame_numbers or (0,) * len(self.sop_instance_uids)
        return tuple(zip(self.sop_instance_uids, frames, strict=True))

    def index_of(self, sop_instance_uid: str) -> int:
        """Slice index of a source instance; ``KeyError`` if it is not in the volume."""
        return self.sop_instance_uids.index(sop_instance_uid)


def _refuse(reason: str, series_uid: str) -> SeriesRefused:
    LOGGER.warning("series %s refused: %s", series_uid, reason)
    return SeriesRefused(reason)


def build_volume(
    datasets: Sequence[Dataset], *, allowed_modalities: Collection[str] | None = None
) -> Volume:
    """Assemble single-frame datasets of one series into a :class:`Volume`.

    Parameters
    ----------
    datasets
        The instances of one series, in any order.
    allowed_modalities
        Modalities the caller can process (e.g. ``{"CT"}``); ``None`` accepts any.

    Raises
    ------
    SeriesRefused
        Empty series; several series mixed; unsupported modality; a multi-frame
        instance that is not alone in its series, or whose frames lack geometry in
        their functional groups; colour instances; missing
        ImagePositionPatient/ImageOrientationPatient/PixelSpacing;
        mixed orientations, frame sizes or pixel spacings; duplicate positions; slices
        not stacked along the normal (gantry tilt); missing slices (a gap larger than
        1.5x the median gap); otherwise inconsistent slice spacing; undecodable pixels.
    """
    series_uid, modality, multi = _check_series(datasets, allowed_modalities)
    planes = _planes(datasets, multi, series_uid)
    iop0, normal = _orientation(planes, series_uid)
    row_cos, col_cos = iop0[:3], iop0[3:]

    positions = np.asarray(planes.positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    unit = "frames" if multi else "instances"
    first = multi if multi is not None else datasets[int(order[0])]
    slice_spacing = _slice_spacing(first, positions, along, normal, series_uid, unit)

    sorted_frames = tuple(planes.frame_numbers[int(i)] for i in order) if multi else ()
    sorted_ds = (multi,) if multi is not None else tuple(datasets[int(i)] for i in order)
    pixels = _pixels(multi, sorted_frames, sorted_ds, series_uid)

    row_mm, col_mm = float(planes.spacings[0][0]), float(planes.spacings[0][1])
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_spacing
    affine[:3, 1] = col_cos * row_mm
    affine[:3, 2] = row_cos * col_mm
    affine[:3, 3] = positions[0]
    first = sorted_ds[0]
    uids = tuple(str(ds.SOPInstanceUID) for ds in sorted_ds)
    LOGGER.debug("series %s: volume %s, spacing %.3f mm", series_uid, pixels.shape, slice_spacing)
    return Volume(
        pixels=pixels,
        affine=affine,
        spacing=(slice_spacing, row_mm, col_mm),
        orientation_cosines=tuple(float(v) for v in iop0),  # type: ignore[arg-type]
        positions=positions,
        datasets=sorted_ds,
        sop_instance_uids=uids * len(sorted_frames) if multi else uids,
        series_instance_uid=series_uid,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=modality,
        frame_numbers=sorted_frames,
    )


def _check_series(datasets: Sequence[Dataset], allowed_modalities: Collection[str] | None
                  ) -> tuple[str, str, Dataset | None]:
    """One series, one allowed modality, greyscale pixels; returns its UID, its modality
    and its multi-frame instance (``None`` for single-frame slices)."""
    if not datasets:
        raise SeriesRefused("the series has no instances")
    series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) > 1:
        raise _refuse("instances of several series were mixed", series_uid)
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if len(modalities) > 1:
        raise _refuse(f"mixed modalities {sorted(modalities)}", series_uid)
    modality = modalities.pop()
    if allowed_modalities is not None and modality not in allowed_modalities:
        allowed = ", ".join(sorted(allowed_modalities))
        raise _refuse(
            f"unsupported modality {modality or '(none)'}; allowed: {allowed}", series_uid
        )
    multi = [ds for ds in datasets if is_multi_frame(ds)]
    if multi and len(datasets) > 1:
        raise _refuse("a multi-frame instance must be the only instance of its series "
                      f"({len(datasets)} instances, {len(multi)} multi-frame)", series_uid)
    for ds in datasets:
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise _refuse("only single-sample (greyscale) images are supported", series_uid)
        if "PixelData" not in ds:
            raise _refuse("an instance has no pixel data", series_uid)
    return series_uid, modality, multi[0] if multi else None


@dataclass
class _Planes:
    """Each slice's (or frame's) plane, in the order the instances or frames came."""

    positions: list[np.ndarray] = field(default_factory=list)
    orientations: list[np.ndarray] = field(default_factory=list)
    spacings: list[np.ndarray] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    frame_numbers: list[int] = field(default_factory=list)


def _planes(datasets: Sequence[Dataset], multi: Dataset | None, series_uid: str) -> _Planes:
    planes = _Planes()
    if multi is not None:
        try:
            frames = frame_geometry(multi)
        except FrameGeometryError as exc:
            raise _refuse(f"multi-frame instance: {exc}", series_uid) from exc
        for frame in frames:
            planes.positions.append(frame.position)
            planes.orientations.append(frame.orientation)
            planes.spacings.append(frame.pixel_spacing)
            planes.sizes.append((int(multi.Rows), int(multi.Columns)))
            planes.frame_numbers.append(frame.frame_number)
        return planes
    for ds in datasets:
        ipp = float_values(ds, "ImagePositionPatient", 3)
        iop = float_values(ds, "ImageOrientationPatient", 6)
        ps = float_values(ds, "PixelSpacing", 2)
        if ipp is None or iop is None or ps is None:
            raise _refuse(
                "missing geometry (ImagePositionPatient, ImageOrientationPatient or "
                f"PixelSpacing) in instance {ds.get('SOPInstanceUID', '?')}",
                series_uid,
            )
        planes.positions.append(ipp)
        planes.orientations.append(iop)
        planes.spacings.append(ps)
        planes.sizes.append((int(ds.Rows), int(ds.Columns)))
    return planes


def _orientation(planes: _Planes, series_uid: str) -> tuple[np.ndarray, np.ndarray]:
    """The series' one orientation and its unit slice normal; refuses mixed planes."""
    iop0 = planes.orientations[0]
    if any(np.max(np.abs(iop - iop0)) > COSINE_TOL for iop in planes.orientations):
        raise _refuse("mixed image orientations in one series", series_uid)
    if len(set(planes.sizes)) > 1:
        raise _refuse(f"different frame sizes {sorted(set(planes.sizes))}", series_uid)
    if any(np.max(np.abs(ps - planes.spacings[0])) > 1e-3 for ps in planes.spacings):
        raise _refuse("different pixel spacings in one series", series_uid)
    row_cos, col_cos = iop0[:3], iop0[3:]
    normal = np.cross(row_cos, col_cos)
    norm = np.linalg.norm(normal)
    if norm < 0.5 or abs(float(np.dot(row_cos, col_cos))) > 1e-2:
        raise _refuse("ImageOrientationPatient is not orthonormal", series_uid)
    return iop0, normal / norm


def _pixels(multi: Dataset | None, frames: tuple[int, ...], sorted_ds: tuple[Dataset, ...],
            series_uid: str) -> np.ndarray:
    """Pixels in modality units (HU for CT), slices in volume order."""
    try:
        if multi is not None:
            return frame_pixels(multi, frames)
        return np.stack([np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
                         for ds in sorted_ds])
    except Exception as exc:  # any decoder failure is a refusal, not a crash
        raise _refuse(f"cannot decode pixel data: {exc}", series_uid) from exc


def _slice_spacing(
    first: Dataset, positions: np.ndarray, along: np.ndarray, normal: np.ndarray, series_uid: str,
    unit: str = "instances",
) -> float:
    if len(along) == 1:
        return float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    gaps = np.diff(along)
    if np.any(gaps < POSITION_TOL_MM):
        raise _refuse(f"two {unit} share one slice position", series_uid)
    # every slice must sit on the line through the first one along the normal
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if np.max(np.linalg.norm(offsets, axis=1)) > max(POSITION_TOL_MM, 0.01 * float(gaps.min())):
        raise _refuse("slices are not stacked along the slice normal (gantry tilt)", series_uid)
    median = float(np.median(gaps))
    if np.any(gaps > GAP_FACTOR_MISSING * median):
        k = int(np.argmax(gaps))
        raise _refuse(
            f"missing slice(s): gap of {gaps[k]:.2f} mm after slice {k} "
            f"(median spacing {median:.2f} mm)",
            series_uid,
        )
    if np.any(np.abs(gaps - median) > max(GAP_REL_TOL * median, POSITION_TOL_MM)):
        raise _refuse(
            f"inconsistent slice spacing: {gaps.min():.2f}-{gaps.max():.2f} mm", series_uid
        )
    return float(np.mean(gaps))
