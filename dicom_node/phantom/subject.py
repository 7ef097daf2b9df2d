"""The phantom subject: an image, its label volume and the geometry to write it as DICOM."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Orientation(enum.StrEnum):
    """Acquisition plane of a phantom series."""

    AXIAL = "axial"
    SAGITTAL = "sagittal"
    CORONAL = "coronal"


# ImageOrientationPatient (row direction, column direction) per plane, patient LPS.
# Rows run along the first triplet (image left to right), columns down the second.
ORIENTATION_COSINES: dict[Orientation, tuple[float, float, float, float, float, float]] = {
    Orientation.AXIAL: (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    Orientation.SAGITTAL: (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    Orientation.CORONAL: (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
}


def slice_normal(cosines: tuple[float, ...]) -> np.ndarray:
    """Unit normal of the image plane: row direction x column direction."""
    row = np.asarray(cosines[:3], dtype=float)
    col = np.asarray(cosines[3:6], dtype=float)
    n = np.cross(row, col)
    return np.asarray(n / np.linalg.norm(n))


@dataclass(frozen=True, eq=False)
class PhantomSubject:
    """One synthetic subject as acquired by one site.

    ``image`` is in modality units (HU for CT, arbitrary for MR) with shape
    ``(slices, rows, cols)``; ``labels`` has the same shape. Voxel ``(k, r, c)`` lies at
    ``origin + k*spacing[0]*normal + r*spacing[1]*column_cosine + c*spacing[2]*row_cosine``
    in patient coordinates (LPS, mm), so ``origin`` is slice 0's ImagePositionPatient.
    """

    site: str
    index: int
    seed: int
    modality: str
    orientation: Orientation
    image: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation_cosines: tuple[float, float, float, float, float, float]
    body_part: str
    acquisition: dict[str, float | str] = field(default_factory=dict)

    @property
    def subject_id(self) -> str:
        """Stable name of the subject, e.g. ``A-0007``."""
        return f"{self.site}-{self.index:04d}"

    @property
    def normal(self) -> np.ndarray:
        return slice_normal(self.orientation_cosines)

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping ``(slice, row, col, 1)`` indices to patient mm (LPS)."""
        a = np.eye(4)
        row_cos = np.asarray(self.orientation_cosines[:3])
        col_cos = np.asarray(self.orientation_cosines[3:6])
        a[:3, 0] = self.normal * self.spacing[0]
        a[:3, 1] = col_cos * self.spacing[1]
        a[:3, 2] = row_cos * self.spacing[2]
        a[:3, 3] = self.origin
        return a

    def slice_positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, shape ``(slices, 3)``."""
        k = np.arange(self.image.shape[0], dtype=float)
        return (
            np.asarray(self.origin)[None, :] + k[:, None] * self.spacing[0] * self.normal[None, :]
        )
