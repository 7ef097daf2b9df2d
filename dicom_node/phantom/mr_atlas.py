"""MR head "subjects" from real anatomy: Debian's mricron-data (Colin27 T1 + AAL atlas).

The atlas is read from the installed package at run time (nothing derived is shipped).
Each subject is the Colin27 head under a random smooth deformation (global affine plus
a low-frequency displacement field), resampled on a site's acquisition grid, with a
bias field, intensity changes and Rician-like noise.

Label groups (AAL index -> group), filled so that white matter belongs to its region:

====  ==============  ==========================================================
 1    cerebrum_left   AAL 1-90 ending in ``_L`` except 71-78, plus left white matter
 2    cerebrum_right  AAL 1-90 ending in ``_R`` except 71-78, plus right white matter
 3    cerebellum      AAL 91-116 (Cerebelum_*, Vermis_*)
 4    deep_grey       AAL 71-78 (caudate, putamen, pallidum, thalamus, both sides)
====  ==============  ==========================================================

Unlabelled voxels inside the brain (white matter, ventricles) take the group of the
nearest labelled voxel; the brain is the closed, hole-filled union of AAL labels.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicom_node.errors import DicomNodeError
from dicom_node.phantom.ct import subject_rng
from dicom_node.phantom.nifti import read_nifti
from dicom_node.phantom.subject import ORIENTATION_COSINES, Orientation, PhantomSubject
from dicom_node.pipeline.seg import SegmentSpec

LOGGER = logging.getLogger(__name__)

TEMPLATES = Path("/usr/share/mricron/templates")
DEBIAN_PACKAGE = "mricron-data"

CEREBRUM_LEFT, CEREBRUM_RIGHT, CEREBELLUM, DEEP_GREY = 1, 2, 3, 4
MR_LABELS: dict[int, str] = {
    0: "background",
    CEREBRUM_LEFT: "cerebrum_left",
    CEREBRUM_RIGHT: "cerebrum_right",
    CEREBELLUM: "cerebellum",
    DEEP_GREY: "deep_grey",
}
_ANATOMY = codes.SCT.AnatomicalStructure
MR_SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec.from_rgb(
        CEREBRUM_LEFT,
        "cerebrum_left",
        _ANATOMY,
        codes.SCT.CerebralHemisphere,
        (250, 250, 225),
        modifier=codes.SCT.Left,
    ),
    SegmentSpec.from_rgb(
        CEREBRUM_RIGHT,
        "cerebrum_right",
        _ANATOMY,
        codes.SCT.CerebralHemisphere,
        (205, 190, 110),
        modifier=codes.SCT.Right,
    ),
    SegmentSpec.from_rgb(CEREBELLUM, "cerebellum", _ANATOMY, codes.SCT.Cerebellum, (230, 148, 34)),
    SegmentSpec.from_rgb(DEEP_GREY, "deep_grey", _ANATOMY, codes.SCT.GrayMatter, (122, 186, 220)),
)


class AtlasNotInstalled(DicomNodeError):
    """The Colin27/AAL files of Debian's mricron-data are missing."""


@dataclass(frozen=True)
class MRSite:
    name: str
    pixel_mm: float
    matrix: int
    slice_thickness_mm: float
    noise: float  # fraction of white-matter signal
    gain: float
    gamma: float
    bias: float  # peak-to-peak of the multiplicative bias field
    field_t: str


SITES: dict[str, MRSite] = {
    "A": MRSite("A", 1.0, 224, 2.0, 0.03, 1.0, 1.0, 0.10, "3"),
    "B": MRSite("B", 1.25, 192, 3.0, 0.05, 0.8, 1.15, 0.20, "1.5"),
    "C": MRSite("C", 0.9375, 256, 2.5, 0.04, 1.2, 0.9, 0.15, "3"),
}


@dataclass(frozen=True, eq=False)
class Atlas:
    t1: np.ndarray  # float32 on the atlas grid (i, j, k)
    groups: np.ndarray  # uint8 label groups on the same grid
    ras_to_index: np.ndarray  # 4x4


def _require(name: str) -> Path:
    path = TEMPLATES / name
    if not path.is_file():
        raise AtlasNotInstalled(
            f"{path} is missing: install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE})"
        )
    return path


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """Read Colin27 T1 + AAL and build the label groups (cached per process).

    Raises
    ------
    AtlasNotInstalled
        A file of ``mricron-data`` is missing.
    """
    t1 = read_nifti(_require("ch2.nii.gz"))
    aal = read_nifti(_require("aal.nii.gz"))
    names = {}
    for line in _require("aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    lut = np.zeros(max(names) + 1, np.uint8)
    for index, name in names.items():
        if 71 <= index <= 78:
            lut[index] = DEEP_GREY
        elif name.startswith(("Cerebelum", "Vermis")):
            lut[index] = CEREBELLUM
        elif name.endswith("_L"):
            lut[index] = CEREBRUM_LEFT
        elif name.endswith("_R"):
            lut[index] = CEREBRUM_RIGHT
    labels = np.asarray(aal.data).astype(np.intp)
    groups = lut[labels]
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(groups > 0, iterations=4))
    _, nearest = ndimage.distance_transform_edt(groups == 0, return_indices=True)
    filled = groups[tuple(nearest)]
    groups = np.where(brain, filled, 0).astype(np.uint8)
    return Atlas(np.asarray(t1.data, np.float32), groups, np.linalg.inv(t1.affine))


def generate_subject(
    site: str, index: int, seed: int = 0, *, orientation: str | Orientation = "axial",
    profile: MRSite | None = None,
) -> PhantomSubject:
    """A deformed Colin27 head acquired by an MR ``site``; labels are :data:`MR_LABELS`.

    ``profile`` acquires with other settings than the site's (benchmarks vary them).

    Raises
    ------
    AtlasNotInstalled
        ``mricron-data`` is not installed.
    ValueError
        Unknown site or orientation.
    """
    if site not in SITES:
        raise ValueError(f"unknown MR site {site!r}; known sites: {', '.join(SITES)}")
    profile = profile or SITES[site]
    plane = Orientation(orientation)
    atlas = load_atlas()
    rng = subject_rng("mr", site, index, seed, 0)
    lin, shift = _subject_transform(rng)
    grid = _SiteGrid.of(profile, plane)
    t1, labels = _sample_atlas(atlas, grid, lin, shift, rng)
    noise_rng = subject_rng("mr", site, index, seed, 1 + list(Orientation).index(plane))
    image = _acquire(t1, profile, grid, rng, noise_rng)
    return PhantomSubject(
        site=site,
        index=index,
        seed=seed,
        modality="MR",
        orientation=plane,
        image=image,
        labels=labels.astype(np.uint8),
        label_names=dict(MR_LABELS),
        spacing=(grid.st, grid.ps, grid.ps),
        origin=tuple(float(v) for v in grid.origin),  # type: ignore[arg-type]
        orientation_cosines=grid.cos,
        body_part="HEAD",
        acquisition={"manufacturer": f"Tessera Atlas MR {site}", "field_t": profile.field_t},
    )


_BRAIN_CENTRE = np.array([0.0, 18.0, 18.0])  # brain centre in LPS mm


def _subject_transform(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The subject's global affine, patient LPS -> atlas LPS (inverse mapping, used for
    sampling): ``(linear part, shift mm)``."""
    ang = np.deg2rad(rng.uniform(-6, 6, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rot = (
        np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    )
    lin = rot @ np.diag(1.0 / rng.uniform(0.92, 1.08, 3))
    shift = rng.uniform(-5, 5, 3)
    return lin, shift


class _SiteGrid(NamedTuple):
    """A site's acquisition grid for one plane, centred on the brain."""

    n: int  # slices
    n_plane: int  # rows and columns
    ps: float  # pixel spacing mm
    st: float  # slice thickness mm
    origin: np.ndarray
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    cos: tuple[float, float, float, float, float, float]

    @classmethod
    def of(cls, profile: MRSite, plane: Orientation) -> _SiteGrid:
        n_plane = profile.matrix
        ps, st = profile.pixel_mm, profile.slice_thickness_mm
        extent = {Orientation.AXIAL: 150.0, Orientation.SAGITTAL: 150.0,
                  Orientation.CORONAL: 185.0}
        n = round(extent[plane] / st)
        cos = ORIENTATION_COSINES[plane]
        row, col = np.asarray(cos[:3]), np.asarray(cos[3:])
        normal = np.cross(row, col)
        half = (n_plane - 1) / 2 * ps
        origin = _BRAIN_CENTRE - half * row - half * col - (n - 1) / 2 * st * normal
        return cls(n, n_plane, ps, st, origin, row, col, normal, cos)


def _patient_points(grid: _SiteGrid) -> list[np.ndarray]:
    """Patient LPS x, y, z (mm) of every voxel of the grid."""
    k, r, c = np.meshgrid(
        np.arange(grid.n, dtype=np.float32),
        np.arange(grid.n_plane, dtype=np.float32),
        np.arange(grid.n_plane, dtype=np.float32),
        indexing="ij",
    )
    origin, st, ps = grid.origin, grid.st, grid.ps
    normal, col, row = grid.normal, grid.col, grid.row
    return [
        origin[i] + k * (st * normal[i]) + r * (ps * col[i]) + c * (ps * row[i]) for i in range(3)
    ]


def _sample_atlas(atlas: Atlas, grid: _SiteGrid, lin: np.ndarray, shift: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """T1 and label groups of the deformed atlas on the grid."""
    centre = _BRAIN_CENTRE
    pts = _patient_points(grid)
    # smooth displacement from a coarse random control grid (about 4 mm)
    coarse = rng.normal(0, 4.0, (3, 4, 4, 4)).astype(np.float32)
    frac = [np.clip((pts[i] - centre[i] + 100) / 200 * 3, 0, 3) for i in range(3)]
    disp = [ndimage.map_coordinates(coarse[i], frac, order=3, mode="nearest") for i in range(3)]
    del frac
    q = [
        sum(lin[i, j] * (pts[j] - centre[j] + disp[j]) for j in range(3)) + centre[i] + shift[i]
        for i in range(3)
    ]
    del pts, disp
    ras = np.stack([-q[0], -q[1], q[2]])
    m = atlas.ras_to_index
    idx = [m[i, 0] * ras[0] + m[i, 1] * ras[1] + m[i, 2] * ras[2] + m[i, 3] for i in range(3)]
    del ras, q
    t1 = ndimage.map_coordinates(atlas.t1, idx, order=1, mode="constant", cval=0.0)
    labels = ndimage.map_coordinates(atlas.groups, idx, order=0, mode="constant", cval=0)
    return t1, labels


def _acquire(t1: np.ndarray, profile: MRSite, grid: _SiteGrid, rng: np.random.Generator,
             noise_rng: np.random.Generator) -> np.ndarray:
    """The site's signal: contrast, a smooth bias field and Rician-like noise, as int16."""
    n, n_plane = grid.n, grid.n_plane
    signal = (np.clip(t1 / 255.0, 0, None) ** profile.gamma) * profile.gain
    zz = np.linspace(-1, 1, n, dtype=np.float32)[:, None, None]
    yy = np.linspace(-1, 1, n_plane, dtype=np.float32)[None, :, None]
    xx = np.linspace(-1, 1, n_plane, dtype=np.float32)[None, None, :]
    phase = rng.uniform(0, 2 * np.pi, 3)
    bias = 1 + profile.bias / 2 * np.sin(1.3 * xx + phase[0]) * np.cos(
        1.1 * yy + phase[1]
    ) * np.cos(0.9 * zz + phase[2])
    signal = signal * bias
    sigma = np.float32(profile.noise * profile.gain)
    real = signal + sigma * noise_rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * noise_rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.rint(np.hypot(real, imag) * 1000), 0, 32767).astype(np.int16)
