"""Seeded CT-like abdominal phantoms with ground-truth organ labels.

Anatomy is defined analytically in patient coordinates (LPS, mm) and sampled on the
acquisition grid of a site, so an axial and a sagittal acquisition of the same subject
show the same anatomy at the same patient positions. Subjects vary in size, position,
a smooth deformation and organ shapes; sites differ in noise, contrast enhancement,
kVp-like iodine/HU shifts, slice thickness, field of view (pixel spacing) and
reconstruction sharpness, so domain shift between sites is real but moderate.

Radiological convention: the patient's right (-x in LPS) appears on the image left of
an axial slice, so the liver is drawn on the image left.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicom_node.phantom import shapes as shp
from dicom_node.phantom.anatomy import Anatomy
from dicom_node.phantom.subject import ORIENTATION_COSINES, Orientation, PhantomSubject

LOGGER = logging.getLogger(__name__)

BACKGROUND = 0
BODY = 1
LIVER = 2
SPLEEN = 3
KIDNEY_LEFT = 4
KIDNEY_RIGHT = 5

LABELS: dict[int, str] = {
    BACKGROUND: "background",
    BODY: "body",
    LIVER: "liver",
    SPLEEN: "spleen",
    KIDNEY_LEFT: "kidney_left",
    KIDNEY_RIGHT: "kidney_right",
}

IN_PLANE = 256
MIN_SLICES = 64
MAX_SLICES = 160


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital's scanner and protocol render the same anatomy."""

    name: str
    noise_hu: float
    enhancement: float  # 0 = non-contrast, 1 = portal venous phase
    iodine_gain: float  # lower kVp shows iodine brighter
    hu_offset: float  # calibration shift of the whole scale
    slice_thickness_mm: float
    fov_mm: float
    blur_px: float  # reconstruction kernel: larger is softer
    manufacturer: str
    kvp: float

    @property
    def pixel_mm(self) -> float:
        return self.fov_mm / IN_PLANE


SITES: dict[str, SiteProfile] = {
    "A": SiteProfile("A", 10.0, 1.00, 1.00, 0.0, 3.0, 380.0, 0.6, "Tessera Phantom A", 120.0),
    "B": SiteProfile("B", 18.0, 0.75, 1.15, 6.0, 2.5, 350.0, 0.5, "Tessera Phantom B", 100.0),
    "C": SiteProfile("C", 8.0, 0.50, 0.95, -4.0, 5.0, 420.0, 0.9, "Tessera Phantom C", 130.0),
    "D": SiteProfile("D", 24.0, 1.20, 1.05, 10.0, 2.0, 400.0, 0.4, "Tessera Phantom D", 110.0),
}


def site_profile(site: str) -> SiteProfile:
    """Look a site up by name; the error lists the known sites."""
    try:
        return SITES[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; known sites: {', '.join(SITES)}") from None


def subject_rng(kind: str, site: str, index: int, seed: int, stream: int) -> np.random.Generator:
    """Deterministic generator per (kind, site, index, seed, stream); independent of hash()."""
    return np.random.default_rng(
        [seed, zlib.crc32(kind.encode()), zlib.crc32(site.encode()), index, stream]
    )


def generate_subject(
    site: str, index: int, seed: int = 0, *, orientation: str | Orientation = "axial",
    profile: SiteProfile | None = None,
) -> PhantomSubject:
    """Generate subject ``index`` of ``site`` as an int16 HU volume with organ labels.

    Same arguments give the same bytes. The anatomy depends on ``(site, index, seed)``
    only; ``orientation`` changes the acquisition grid, not the patient. ``profile``
    renders with other scanner settings than the site's (benchmarks vary them per case).

    Raises
    ------
    ValueError
        Unknown site or orientation, or a negative index.
    """
    profile = profile or site_profile(site)
    plane = Orientation(orientation)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    anat = Anatomy.random(subject_rng("ct", site, index, seed, 0))

    grid = _acquisition_grid(profile, plane, anat)
    px, py, pz = grid.warped(anat)
    image, labels = _render(grid, anat, profile, px, py, pz)

    noise_rng = subject_rng("ct", site, index, seed, 1 + list(Orientation).index(plane))
    if profile.blur_px > 0:
        sigma = (0.0, profile.blur_px, profile.blur_px)
        image = ndimage.gaussian_filter(image, sigma=sigma, truncate=2.5)
    noise = noise_rng.standard_normal(image.shape, dtype=np.float32)
    noise = ndimage.uniform_filter1d(noise, 2, axis=2)  # mild in-plane correlation
    image += noise * np.float32(profile.noise_hu * 1.3) + np.float32(profile.hu_offset)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    return PhantomSubject(
        site=site,
        index=index,
        seed=seed,
        modality="CT",
        orientation=plane,
        image=image,
        labels=labels,
        label_names=dict(LABELS),
        spacing=grid.spacing,
        origin=grid.origin,
        orientation_cosines=ORIENTATION_COSINES[plane],
        body_part="ABDOMEN",
        acquisition={
            "kvp": profile.kvp,
            "manufacturer": profile.manufacturer,
            "contrast": "IV contrast" if profile.enhancement > 0 else "",
        },
    )


def _acquisition_grid(profile: SiteProfile, plane: Orientation, anat: Anatomy) -> shp.Grid:
    ps = profile.pixel_mm
    st = profile.slice_thickness_mm
    half_plane = (IN_PLANE - 1) / 2 * ps
    if plane is Orientation.AXIAL:
        extent = anat.coverage_mm
    elif plane is Orientation.SAGITTAL:
        extent = 2 * anat.body_a + 40.0
    else:
        extent = anat.body_b_ant + anat.body_b_post + 40.0
    n = int(np.clip(round(extent / st), MIN_SLICES, MAX_SLICES))
    half_stack = (n - 1) / 2 * st
    cz = anat.scan_center_z
    cosines = ORIENTATION_COSINES[plane]
    if plane is Orientation.AXIAL:
        origin = (-half_plane, -half_plane, cz - half_stack)
    elif plane is Orientation.SAGITTAL:
        origin = (anat.body_x + half_stack, -half_plane, cz + half_plane)
    else:
        origin = (-half_plane, anat.body_y - half_stack, cz + half_plane)
    return shp.Grid((n, IN_PLANE, IN_PLANE), origin, cosines, (st, ps, ps))


def _render(
    grid: shp.Grid,
    anat: Anatomy,
    profile: SiteProfile,
    px: np.ndarray,
    py: np.ndarray,
    pz: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    enh = profile.enhancement
    gain = profile.iodine_gain
    hu = shp.Tissue(enh=enh, gain=gain)
    image = np.full(grid.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)

    rho = anat.body_radius(px, py, pz)
    body = rho <= 1.0
    labels[body] = BODY
    image[body] = hu.fat
    wall_in = 1.0 - anat.fat_frac
    visceral_edge = wall_in - anat.muscle_frac
    image[body & (rho <= wall_in)] = hu.muscle
    interior = rho <= visceral_edge
    image[interior] = hu.visceral_fat
    del rho, body

    anat.paint_background_structures(grid, px, py, pz, image, interior, hu)
    anat.paint_organs(grid, px, py, pz, image, labels, interior, hu)
    return image, labels
