"""Analytic abdominal anatomy for the CT phantom, evaluated on an acquisition grid.

Every structure is drawn only inside the grid box that can contain it (its bounding
box plus the largest displacement of the deformation), which keeps a 160x256x256
subject well under two seconds on one core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dicom_node.phantom.anatomy import Anatomy

BODY = 1
LIVER = 2
SPLEEN = 3
KIDNEY_LEFT = 4
KIDNEY_RIGHT = 5

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Tissue:
    """HU of each tissue for a given contrast phase (``enh``) and iodine gain."""

    enh: float
    gain: float
    fat: float = -100.0
    visceral_fat: float = -88.0
    muscle: float = 52.0
    cortex: float = 650.0
    trabecular: float = 210.0
    disc: float = 85.0
    csf: float = 12.0
    gas: float = -850.0
    fluid: float = 12.0

    def iodine(self, hu: float) -> float:
        return hu * self.enh * self.gain

    @property
    def aorta(self) -> float:
        return 42.0 + self.iodine(190.0)

    @property
    def ivc(self) -> float:
        return 42.0 + self.iodine(110.0)

    @property
    def bowel_wall(self) -> float:
        return 45.0 + self.iodine(40.0)


class Grid:
    """An axis-aligned acquisition grid: array axes (slice, row, col) -> patient x, y, z."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        origin: tuple[float, float, float],
        cosines: tuple[float, ...],
        spacing: tuple[float, float, float],
    ) -> None:
        self.shape = shape
        self.origin = (float(origin[0]), float(origin[1]), float(origin[2]))
        self.spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        row = np.asarray(cosines[:3], dtype=float)
        col = np.asarray(cosines[3:6], dtype=float)
        dirs = [np.cross(row, col), col, row]
        # patient axis -> (array axis, sign, step)
        self._map: dict[int, tuple[int, float, float]] = {}
        for ax, d in enumerate(dirs):
            p = int(np.argmax(np.abs(d)))
            self._map[p] = (ax, float(np.sign(d[p])), self.spacing[ax])
        if len(self._map) != 3:
            raise ValueError("phantom grids must be axis-aligned")

    def coord(self, p: int) -> np.ndarray:
        """Patient coordinate ``p`` (0=x, 1=y, 2=z) as an array broadcastable to the grid."""
        ax, sign, step = self._map[p]
        c = self.origin[p] + sign * step * np.arange(self.shape[ax], dtype=np.float64)
        shape = [1, 1, 1]
        shape[ax] = -1
        return c.astype(np.float32).reshape(shape)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Index box covering the patient-space box ``[lo, hi]``; None if it misses the grid."""
        sl: list[slice] = [slice(0, 0)] * 3
        for p in range(3):
            ax, sign, step = self._map[p]
            i0 = (lo[p] - self.origin[p]) / (sign * step)
            i1 = (hi[p] - self.origin[p]) / (sign * step)
            a, b = sorted((i0, i1))
            start = max(int(np.floor(a)), 0)
            stop = min(int(np.ceil(b)) + 1, self.shape[ax])
            if stop <= start:
                return None
            sl[ax] = slice(start, stop)
        return (sl[0], sl[1], sl[2])

    def warped(self, anat: Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Deformed patient coordinates at which the anatomy is evaluated (float32, full grid)."""
        x, y, z = self.coord(0), self.coord(1), self.coord(2)
        w = anat.warp
        two_pi = np.float32(2 * np.pi)

        def wave(c: np.ndarray, i: int) -> np.ndarray:
            amp, lam, phase = w[i]
            return np.float32(amp) * np.sin(two_pi * c / np.float32(lam) + np.float32(phase))

        px = (x + wave(z, 0)) + wave(y, 1)
        py = (y + wave(z, 2)) + wave(x, 3)
        pz = (z + wave(x, 4)) + wave(y, 5)
        full = np.broadcast_shapes(px.shape, py.shape, pz.shape)
        return (
            np.ascontiguousarray(np.broadcast_to(px, full)),
            np.ascontiguousarray(np.broadcast_to(py, full)),
            np.ascontiguousarray(np.broadcast_to(pz, full)),
        )


@dataclass(frozen=True)
class Ellipsoid:
    """A rotated ellipsoid with a mild polynomial bump so no two organs look alike."""

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray  # columns are the ellipsoid axes in patient space
    bump: np.ndarray  # coefficients of u0*u1, u1*u2, u0*u2, u2**3

    def bounds(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.semi.max()) * 1.25 + margin
        return self.center - r, self.center + r

    def q(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        """Normalised radius squared: <= 1 inside."""
        d = (
            px - np.float32(self.center[0]),
            py - np.float32(self.center[1]),
            pz - np.float32(self.center[2]),
        )
        u = [
            sum(d[j] * np.float32(self.rot[j, i]) for j in range(3)) / np.float32(self.semi[i])
            for i in range(3)
        ]
        b = self.bump
        q = np.asarray(
            u[0] * u[0]
            + u[1] * u[1]
            + u[2] * u[2]
            + np.float32(b[0]) * u[0] * u[1]
            + np.float32(b[1]) * u[1] * u[2]
            + np.float32(b[2]) * u[0] * u[2]
            + np.float32(b[3]) * u[2] * u[2] * u[2]
        )
        return q


def rotation(rng: np.random.Generator, max_deg: float, about_z: float = 0.0) -> np.ndarray:
    """Small random rotation plus a chosen rotation about z (degrees)."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    az += np.deg2rad(about_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx)


def ellipsoid(
    rng: np.random.Generator,
    center: tuple[float, float, float],
    semi: tuple[float, float, float],
    *,
    jitter: float,
    scale: float = 0.12,
    max_deg: float = 10.0,
    about_z: float = 0.0,
    bump: float = 0.25,
) -> Ellipsoid:
    c = np.asarray(center) + rng.uniform(-jitter, jitter, 3)
    s = np.asarray(semi) * rng.uniform(1 - scale, 1 + scale, 3)
    return Ellipsoid(c, s, rotation(rng, max_deg, about_z), rng.uniform(-bump, bump, 4))
