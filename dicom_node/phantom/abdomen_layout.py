"""Where the parts of one random abdomen lie: trunk, solid organs, bowel loops, liver vessels.

Each step draws from the subject's generator in a fixed order (the same phantoms for
the same seeds depend on it); :meth:`dicom_node.phantom.anatomy.Anatomy.random` calls
them in turn. Coordinates are patient LPS in mm, the liver at -x, the spleen at +x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.phantom.shapes import Ellipsoid, ellipsoid


@dataclass(frozen=True)
class Bowel:
    shape: Ellipsoid
    content: str  # "gas", "fluid" or "feces"


@dataclass(frozen=True)
class Trunk:
    """Body habitus: overall size, centre offset and the cross-section's semi-axes."""

    size: float
    x: float
    y: float
    a: float  # left-right semi-axis
    b_ant: float
    b_post: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Trunk:
        size = rng.uniform(0.88, 1.12)
        bx, by = rng.uniform(-15, 15), rng.uniform(-12, 12)
        a = 150.0 * size * rng.uniform(0.95, 1.05)
        b_ant = 112.0 * size * rng.uniform(0.92, 1.08)
        b_post = 95.0 * size * rng.uniform(0.95, 1.05)
        return cls(size, bx, by, a, b_ant, b_post)


def draw_warp(rng: np.random.Generator) -> tuple[tuple[float, float, float], ...]:
    """Six sinusoidal deformations: (amplitude mm, wavelength mm, phase)."""
    return tuple(
        (float(rng.uniform(-6, 6)), float(rng.uniform(160, 420)), float(rng.uniform(0, 6.3)))
        for _ in range(6)
    )


@dataclass(frozen=True)
class SolidOrgans:
    """Liver (right and left lobe), spleen, kidneys and stomach."""

    liver_right: Ellipsoid
    liver_left: Ellipsoid
    spleen: Ellipsoid
    kidney_left: Ellipsoid
    kidney_right: Ellipsoid
    stomach: Ellipsoid

    @classmethod
    def draw(cls, rng: np.random.Generator, trunk: Trunk) -> SolidOrgans:
        bx, by, a, b_ant, b_post = trunk.x, trunk.y, trunk.a, trunk.b_ant, trunk.b_post
        sr = 17.0 * trunk.size
        ys = by + b_post - (sr + 52.0 * trunk.size)
        s = trunk.size
        liver_r = ellipsoid(
            rng,
            (bx - 0.42 * a, by + 0.0 * b_ant, 45 * s),
            (0.40 * a, 0.60 * (b_ant + b_post) / 2, 80 * s),
            jitter=8,
        )
        liver_l = ellipsoid(
            rng,
            (bx - 0.02 * a, by - 0.48 * b_ant, 58 * s),
            (0.36 * a, 0.28 * b_ant, 42 * s),
            jitter=8,
        )
        spleen = ellipsoid(
            rng,
            (bx + 0.63 * a, by + 0.38 * b_post, 58 * s),
            (28 * s, 50 * s, 46 * s),
            jitter=7,
            about_z=-35,
        )
        kid_l = ellipsoid(
            rng,
            (bx + 0.42 * a, ys + 6, -12 * s),
            (25 * s, 30 * s, 54 * s),
            jitter=6,
            scale=0.10,
            about_z=25,
            bump=0.15,
        )
        kid_r = ellipsoid(
            rng,
            (bx - 0.42 * a, ys + 6, -27 * s),
            (25 * s, 30 * s, 54 * s),
            jitter=6,
            scale=0.10,
            about_z=-25,
            bump=0.15,
        )
        stomach = ellipsoid(
            rng, (bx + 0.30 * a, by - 0.32 * b_ant, 35 * s), (42 * s, 34 * s, 48 * s), jitter=10
        )
        return cls(liver_r, liver_l, spleen, kid_l, kid_r, stomach)


def draw_bowel(rng: np.random.Generator, trunk: Trunk) -> tuple[Bowel, ...]:
    """12 to 19 bowel loops, each gas-, fluid- or feces-filled."""
    bx, by, a, b_ant = trunk.x, trunk.y, trunk.a, trunk.b_ant
    bowel = []
    for _ in range(int(rng.integers(12, 20))):
        c = (
            bx + rng.uniform(-0.6, 0.6) * a,
            by + rng.uniform(-0.65, 0.25) * b_ant,
            rng.uniform(-150, 5),
        )
        r = float(rng.uniform(12, 26))
        bowel.append(
            Bowel(
                ellipsoid(rng, c, (r, r * 0.8, r * 1.3), jitter=0, max_deg=40),
                str(rng.choice(["gas", "fluid", "feces"], p=[0.3, 0.35, 0.35])),
            )
        )
    return tuple(bowel)


def draw_liver_vessels(
    rng: np.random.Generator, liver_right: Ellipsoid
) -> tuple[tuple[np.ndarray, np.ndarray, float], ...]:
    """Three straight vessels through the right lobe: (point, unit direction, radius mm)."""
    vessels = []
    for _ in range(3):
        p0 = liver_right.center + rng.uniform(-20, 20, 3)
        d = rng.normal(size=3)
        vessels.append((p0, d / np.linalg.norm(d), float(rng.uniform(3.0, 5.0))))
    return tuple(vessels)
