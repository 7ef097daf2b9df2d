"""A minimal NIfTI-1 reader (numpy + gzip), enough for atlases and dcmqi output.

nibabel is not a dependency; this reads single-file ``.nii``/``.nii.gz`` with the
common integer and float data types and returns the voxel array in file order
``(i, j, k)`` with the voxel-to-RAS affine (sform, else qform, else pixdim).
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)

_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}


@dataclass(frozen=True, eq=False)
class NiftiImage:
    data: np.ndarray  # indexed (i, j, k[, t])
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    pixdim: tuple[float, float, float]


def read_nifti(path: str | Path) -> NiftiImage:
    """Read a NIfTI-1 file; ``ValueError`` names what is unsupported."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 348:
        raise ValueError(f"{path}: too short for a NIfTI-1 header")
    endian = "<" if int(np.frombuffer(raw, "<i4", 1, 0)[0]) == 348 else ">"
    if int(np.frombuffer(raw, endian + "i4", 1, 0)[0]) != 348:
        raise ValueError(f"{path}: not a NIfTI-1 file (sizeof_hdr != 348)")
    if raw[344:347] not in (b"n+1", b"ni1"):
        raise ValueError(f"{path}: missing NIfTI-1 magic")

    def arr(fmt: str, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(raw, endian + fmt, count, offset)

    dim = arr("i2", 40, 8)
    ndim = int(dim[0])
    shape = tuple(int(d) for d in dim[1 : 1 + ndim])
    datatype = int(arr("i2", 70, 1)[0])
    if datatype not in _DTYPES:
        raise ValueError(f"{path}: unsupported NIfTI datatype {datatype}")
    pixdim = arr("f4", 76, 8)
    vox_offset = int(arr("f4", 108, 1)[0])
    slope, inter = (float(v) for v in arr("f4", 112, 2))
    qform_code, sform_code = (int(v) for v in arr("i2", 252, 2))
    count = int(np.prod(shape))
    data = np.frombuffer(raw, endian + _DTYPES[datatype], count, vox_offset)
    data = data.reshape(shape, order="F")
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * np.float32(slope or 1.0) + np.float32(inter)
    if sform_code > 0:
        affine = np.eye(4)
        affine[:3, :] = arr("f4", 280, 12).reshape(3, 4)
    elif qform_code > 0:
        affine = _qform(arr("f4", 256, 6), pixdim)
    else:
        affine = np.diag([*(float(p) for p in pixdim[1:4]), 1.0])
    return NiftiImage(
        np.asarray(data), affine, (float(pixdim[1]), float(pixdim[2]), float(pixdim[3]))
    )


def _qform(q: np.ndarray, pixdim: np.ndarray) -> np.ndarray:
    b, c, d = (float(v) for v in q[:3])
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    affine = np.eye(4)
    affine[:3, :3] = r * np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
    affine[:3, 3] = [float(v) for v in q[3:6]]
    return affine
