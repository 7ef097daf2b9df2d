"""One random abdomen: body habitus, deformation, skeleton, vessels, bowel and organs.

Coordinates are patient LPS in mm: +x is the patient's left, +y posterior, +z head.
The liver sits at -x (patient right), the spleen at +x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.phantom.abdomen_layout import (
    Bowel,
    SolidOrgans,
    Trunk,
    draw_bowel,
    draw_liver_vessels,
    draw_warp,
)
from dicom_node.phantom.shapes import (
    BODY,
    KIDNEY_LEFT,
    KIDNEY_RIGHT,
    LIVER,
    SPLEEN,
    Box,
    Ellipsoid,
    Grid,
    Tissue,
)


@dataclass(frozen=True)
class Anatomy:
    body_x: float
    body_y: float
    body_a: float  # left-right semi-axis
    body_b_ant: float
    body_b_post: float
    fat_frac: float
    muscle_frac: float
    coverage_mm: float
    scan_center_z: float
    warp: tuple[tuple[float, float, float], ...]
    spine_r: float
    disc_phase: float
    liver: tuple[Ellipsoid, Ellipsoid]
    spleen: Ellipsoid
    kidney_left: Ellipsoid
    kidney_right: Ellipsoid
    stomach: Ellipsoid
    bowel: tuple[Bowel, ...]
    liver_vessels: tuple[tuple[np.ndarray, np.ndarray, float], ...]
    liver_hu: float
    spleen_hu: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> Anatomy:
        """One abdomen; the draws follow a fixed order (same seed, same phantom)."""
        trunk = Trunk.draw(rng)
        warp = draw_warp(rng)
        organs = SolidOrgans.draw(rng, trunk)
        bowel = draw_bowel(rng, trunk)
        vessels = draw_liver_vessels(rng, organs.liver_right)
        return cls(
            body_x=trunk.x,
            body_y=trunk.y,
            body_a=trunk.a,
            body_b_ant=trunk.b_ant,
            body_b_post=trunk.b_post,
            fat_frac=float(rng.uniform(0.06, 0.14)),
            muscle_frac=float(rng.uniform(0.05, 0.07)),
            coverage_mm=float(rng.uniform(280, 320)),
            scan_center_z=float(rng.uniform(-25, 5)),
            warp=warp,
            spine_r=17.0 * trunk.size,
            disc_phase=float(rng.uniform(0, 33)),
            liver=(organs.liver_right, organs.liver_left),
            spleen=organs.spleen,
            kidney_left=organs.kidney_left,
            kidney_right=organs.kidney_right,
            stomach=organs.stomach,
            bowel=bowel,
            liver_vessels=vessels,
            liver_hu=float(rng.uniform(-12, 8)),
            spleen_hu=float(rng.uniform(-6, 6)),
        )

    @property
    def margin(self) -> float:
        return float(sum(abs(w[0]) for w in self.warp)) + 3.0

    @property
    def spine_y(self) -> float:
        return self.body_y + self.body_b_post - (self.spine_r + 52.0 * self.spine_r / 17.0)

    def body_radius(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        """Normalised elliptic radius of the trunk cross-section (<= 1 inside the skin)."""
        dx = (px - np.float32(self.body_x)) / np.float32(self.body_a)
        dy = py - np.float32(self.body_y)
        b = np.where(dy < 0, np.float32(self.body_b_ant), np.float32(self.body_b_post))
        dy /= b
        # the back is flatter than the belly: a higher power posteriorly
        post = np.maximum(dy, 0)
        r2 = dx * dx + np.minimum(dy, 0) ** 2 + post * post * (1 + post * post)
        return np.asarray(np.sqrt(r2, out=r2), dtype=np.float32)

    def _box(self, grid: Grid, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        return grid.box(lo - self.margin, hi + self.margin)

    def _cyl_box(
        self, grid: Grid, x: float, y: float, r: float, z0: float, z1: float
    ) -> Box | None:
        return self._box(grid, np.array([x - r, y - r, z0]), np.array([x + r, y + r, z1]))

    def paint_background_structures(
        self,
        grid: Grid,
        px: np.ndarray,
        py: np.ndarray,
        pz: np.ndarray,
        image: np.ndarray,
        interior: np.ndarray,
        hu: Tissue,
    ) -> None:
        body = image > -1000
        bx, ys, sr = self.body_x, self.spine_y, self.spine_r
        zlo, zhi = -1e4, 1e4
        # bowel and stomach first: organs drawn later take precedence
        for loop in self.bowel:
            self._paint_hollow(grid, px, py, pz, image, interior, loop.shape, loop.content, hu)
        self._paint_hollow(grid, px, py, pz, image, interior, self.stomach, "stomach", hu)
        # psoas muscles grow towards the pelvis
        for side in (-1, 1):
            cx = bx + side * (sr + 20)
            box = self._cyl_box(grid, cx, ys - 3, 40, zlo, -25)
            if box is not None:
                z = pz[box]
                rad = np.clip(8 + 0.2 * (-30 - z), 0, 28)
                m = (px[box] - cx) ** 2 + (py[box] - (ys - 3)) ** 2 <= rad * rad
                _put(image, box, m & interior[box], hu.muscle)
        # paraspinal muscles
        for side in (-1, 1):
            cx, cy = bx + side * 30 * sr / 17, ys + sr + 25
            box = self._cyl_box(grid, cx, cy, 30, zlo, zhi)
            if box is not None:
                m = ((px[box] - cx) / 25) ** 2 + ((py[box] - cy) / 20) ** 2 <= 1
                _put(image, box, m & body[box], hu.muscle)
        # vertebral bodies with discs, canal, posterior elements
        box = self._cyl_box(grid, bx, ys + sr, sr + 45, zlo, zhi)
        if box is not None:
            dx, dy, z = px[box] - bx, py[box] - ys, pz[box]
            d = np.sqrt(dx * dx + dy * dy)
            disc = np.cos(2 * np.pi * (z - self.disc_phase) / 33.0) > 0.86
            vb = d <= sr
            _put(image, box, vb, hu.trabecular)
            _put(image, box, vb & (d > sr - 2.5), hu.cortex)
            _put(image, box, vb & disc, hu.disc)
            dc = np.sqrt(dx * dx + (dy - sr - 9) ** 2)
            _put(image, box, (dc > 8) & (dc <= 13) & (dy > sr + 4), 500.0)
            _put(image, box, (np.abs(dx) < 4) & (dy > sr + 20) & (dy < sr + 42) & body[box], 500.0)
            _put(image, box, dc <= 8, hu.csf)
        # aorta and inferior vena cava in front of the spine
        for cx, cy, r, val in (
            (bx + 12, ys - sr - 14, 11.0, hu.aorta),
            (bx - 24, ys - sr - 12, 12.0, hu.ivc),
        ):
            box = self._cyl_box(grid, cx, cy, r, zlo, zhi)
            if box is not None:
                m = (px[box] - cx) ** 2 + ((py[box] - cy) * 1.15) ** 2 <= r * r
                _put(image, box, m & interior[box], val)
        self._paint_ribs_and_pelvis(grid, px, py, pz, image, hu)

    def _paint_ribs_and_pelvis(
        self,
        grid: Grid,
        px: np.ndarray,
        py: np.ndarray,
        pz: np.ndarray,
        image: np.ndarray,
        hu: Tissue,
    ) -> None:
        a, bx, by = self.body_a, self.body_x, self.body_y
        b = max(self.body_b_ant, self.body_b_post)
        wall = 1.0 - self.fat_frac
        box = self._box(grid, np.array([bx - a, by - b, -40.0]), np.array([bx + a, by + b, 1e4]))
        if box is not None:
            rho = self.body_radius(px[box], py[box], pz[box])
            theta = np.arctan2(py[box] - by, px[box] - bx)
            band = (rho > wall - 0.055) & (rho <= wall - 0.01)
            helix = np.cos(2 * np.pi * (pz[box] + 18 * theta) / 30.0) > 0.55
            not_front = np.abs(theta + np.pi / 2) > 0.55
            _put(image, box, band & helix & not_front, 480.0)
        for side in (-1, 1):
            cx, cy = bx + side * 0.55 * a, by + 0.25 * self.body_b_post
            box = self._box(
                grid, np.array([cx - 40, cy - 70, -1e4]), np.array([cx + 40, cy + 70, -95])
            )
            if box is None:
                continue
            ang = np.deg2rad(25 * side)
            dx, dy = px[box] - cx, py[box] - cy
            u = (dx * np.cos(ang) + dy * np.sin(ang)) / 14.0
            v = (-dx * np.sin(ang) + dy * np.cos(ang)) / (0.5 * self.body_b_post)
            q = u * u + v * v
            _put(image, box, q <= 1, hu.trabecular)
            _put(image, box, (q <= 1) & (q > 0.55), 520.0)

    def _paint_hollow(
        self,
        grid: Grid,
        px: np.ndarray,
        py: np.ndarray,
        pz: np.ndarray,
        image: np.ndarray,
        interior: np.ndarray,
        shape: Ellipsoid,
        content: str,
        hu: Tissue,
    ) -> None:
        box = self._box(grid, *shape.bounds(0.0))
        if box is None:
            return
        q = shape.q(px[box], py[box], pz[box])
        inside = (q <= 1) & interior[box]
        _put(image, box, inside, hu.bowel_wall)
        lumen = inside & (q <= 0.72)
        if content == "stomach":
            _put(image, box, lumen, hu.fluid + hu.iodine(10))
            gas = lumen & (py[box] < shape.center[1] - 0.45 * shape.semi[1])
            _put(image, box, gas, hu.gas)
        elif content == "gas":
            _put(image, box, lumen, hu.gas)
        elif content == "fluid":
            _put(image, box, lumen, hu.fluid)
        else:
            mottle = np.sin(px[box] * 0.9) * np.sin(py[box] * 1.1) * np.sin(pz[box] * 0.7)
            _put(image, box, lumen & (mottle > 0.1), -500.0)
            _put(image, box, lumen & (mottle <= 0.1), 20.0)

    def paint_organs(
        self,
        grid: Grid,
        px: np.ndarray,
        py: np.ndarray,
        pz: np.ndarray,
        image: np.ndarray,
        labels: np.ndarray,
        interior: np.ndarray,
        hu: Tissue,
    ) -> None:
        liver_hu = 58.0 + self.liver_hu + hu.iodine(50.0)
        for lobe in self.liver:
            box = self._box(grid, *lobe.bounds(0.0))
            if box is None:
                continue
            m = (lobe.q(px[box], py[box], pz[box]) <= 1) & interior[box]
            _put(labels, box, m, LIVER)
            _put(image, box, m, liver_hu)
        lvbox = self._box(grid, *self.liver[0].bounds(0.0))
        if lvbox is not None:
            is_liver = labels[lvbox] == LIVER
            for p0, d, r in self.liver_vessels:
                rel = (px[lvbox] - p0[0], py[lvbox] - p0[1], pz[lvbox] - p0[2])
                t = rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]
                dist2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - t * t
                _put(image, lvbox, is_liver & (dist2 <= r * r), 42.0 + hu.iodine(150.0))
        self._paint_solid(
            grid,
            px,
            py,
            pz,
            image,
            labels,
            interior,
            self.spleen,
            SPLEEN,
            48.0 + self.spleen_hu + hu.iodine(70.0),
        )
        for kidney, label, side in (
            (self.kidney_left, KIDNEY_LEFT, 1),
            (self.kidney_right, KIDNEY_RIGHT, -1),
        ):
            box = self._box(grid, *kidney.bounds(0.0))
            if box is None:
                continue
            q = kidney.q(px[box], py[box], pz[box])
            m = (q <= 1) & interior[box]
            _put(labels, box, m, label)
            _put(image, box, m, 33.0 + hu.iodine(150.0))
            _put(image, box, m & (q <= 0.55), 33.0 + hu.iodine(80.0))
            medial = (px[box] - np.float32(kidney.center[0])) * side < 0
            _put(image, box, m & (q <= 0.25) & medial, -40.0)

    def _paint_solid(
        self,
        grid: Grid,
        px: np.ndarray,
        py: np.ndarray,
        pz: np.ndarray,
        image: np.ndarray,
        labels: np.ndarray,
        interior: np.ndarray,
        shape: Ellipsoid,
        label: int,
        value: float,
    ) -> None:
        box = self._box(grid, *shape.bounds(0.0))
        if box is None:
            return
        m = (shape.q(px[box], py[box], pz[box]) <= 1) & interior[box]
        _put(labels, box, m, label)
        _put(image, box, m, value)


def _put(arr: np.ndarray, box: Box, mask: np.ndarray, value: float) -> None:
    view = arr[box]
    view[mask] = value


__all__ = ["BODY", "Anatomy"]
