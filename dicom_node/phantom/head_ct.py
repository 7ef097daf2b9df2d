"""A real head CT from Debian's ``invesalius-examples`` (``Cranium.inv3``, GPL-2), as a
subject the phantom DICOM writer can send: input the abdomen model was not made for.

The ``.inv3`` file is a gzip tar holding ``main.plist`` (shape, dtype, spacing as x, y, z)
and the raw volume. It is read from the installed package and never redistributed.
"""

from __future__ import annotations

import plistlib
import tarfile
from pathlib import Path

import numpy as np

from dicom_node.errors import DicomNodeError
from dicom_node.phantom.subject import ORIENTATION_COSINES, Orientation, PhantomSubject

__all__ = ["CRANIUM", "head_ct_subject"]

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def head_ct_subject(path: Path = CRANIUM, *, index: int = 0, seed: int = 0) -> PhantomSubject:
    """The head CT as a subject (HU, axial slices); no labels (nothing is known of it).

    Raises
    ------
    DicomNodeError
        The package is not installed, or the file is not an InVesalius project.
    """
    if not path.exists():
        raise DicomNodeError(f"{path} is missing: apt-get install invesalius-examples")
    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            main = plistlib.loads(_read(tar, members["main.plist"]))
            matrix = main["matrix"]
            raw = _read(tar, members[matrix["filename"]])
        image = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"])).reshape(matrix["shape"])
        sx, sy, sz = (float(v) for v in main["spacing"])
    except (KeyError, ValueError, TypeError, OSError, tarfile.TarError,
            plistlib.InvalidFileException) as exc:
        raise DicomNodeError(f"{path} is not a readable InVesalius project: {exc}") from exc
    return PhantomSubject(
        site="head-ct", index=index, seed=seed, modality="CT", orientation=Orientation.AXIAL,
        image=image.astype(np.int16), labels=np.zeros(image.shape, np.uint8), label_names={},
        spacing=(sz, sy, sx), origin=(0.0, 0.0, 0.0),
        orientation_cosines=ORIENTATION_COSINES[Orientation.AXIAL], body_part="HEAD")


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise ValueError(f"{member.name} is not a file")
    return handle.read()
