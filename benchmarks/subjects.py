"""Phantom subjects for the learning benchmarks, generated once and kept on disk.

The generators are deterministic and the MR one takes tens of seconds per subject, so
``(site, index, seed)`` is kept under :data:`CACHE` as ``(image float32, labels,
spacing)``, shared by ``partial_labels.py`` and ``federated_learning.py``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Case = tuple[np.ndarray, np.ndarray, tuple]  # (image float32, labels, spacing)
CACHE = Path(tempfile.gettempdir()) / "tessera-partial-labels-cache"


def cached(kind: str, generate_subject: Callable[..., Any]) -> Callable[[str, int, int], Case]:
    """Subjects as ``(image float32, labels, spacing)``, kept under :data:`CACHE` (the
    generators are deterministic; the MR one takes tens of seconds per subject)."""

    def gen(site: str, index: int, seed: int) -> Case:
        path = CACHE / f"{kind}-{site}-{index}-{seed}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                return z["image"].astype(np.float32), z["labels"], tuple(z["spacing"].tolist())
        s = generate_subject(site, index, seed)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, image=s.image, labels=s.labels, spacing=np.asarray(s.spacing))
        tmp.replace(path)
        return s.image.astype(np.float32), s.labels, s.spacing

    return gen
