"""Input a model was not made for, recognised from its own output before the SEG goes out.

A model segments whatever it is given: a head CT routed to the abdomen model comes back
as a "body" with almost no organs in it. The check reads the label volumes of the result
(the quality metrics' ``volume_ml``): the structures other than the largest label (the
body of an abdomen model, one hemisphere of a head model) must cover at least
``min_structure_fraction`` of the segmented foreground.

Measured with the shipped abdomen starter (``benchmarks/domain.py``): on phantom sites
A-D, 3 unseen subjects each, 0.074-0.178 of the foreground lies outside the body (the
lowest at the shifted site C, whose kidneys the starter misses); on Debian's
invesalius-examples head CT, 0.020. The default threshold, 0.05, flags none of the 12
phantom studies and flags the head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["DomainVerdict", "check_domain"]


@dataclass(frozen=True)
class DomainVerdict:
    in_domain: bool
    reason: str | None
    structure_fraction: float
    foreground_ml: float

    def to_json(self) -> dict[str, object]:
        return {"in_domain": self.in_domain, "reason": self.reason,
                "structure_fraction": round(self.structure_fraction, 4),
                "foreground_ml": round(self.foreground_ml, 1)}


def check_domain(labels: np.ndarray, spacing: tuple[float, float, float],
                 label_values: Mapping[str, int], min_structure_fraction: float
                 ) -> DomainVerdict:
    """Judge a label volume; ``min_structure_fraction`` 0 turns the check off. A model
    with one label has nothing to compare and is always in its domain."""
    counts = np.bincount(labels.ravel().astype(np.intp, copy=False),
                         minlength=max(label_values.values(), default=0) + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = {name: int(counts[value]) for name, value in label_values.items()}
    foreground = sum(volumes.values())
    if foreground == 0:
        return DomainVerdict(False, "the model found nothing it segments", 0.0, 0.0)
    largest = max(volumes, key=lambda name: volumes[name])
    fraction = (foreground - volumes[largest]) / foreground
    ml = foreground * voxel_ml
    if len(volumes) < 2 or min_structure_fraction <= 0 or fraction >= min_structure_fraction:
        return DomainVerdict(True, None, fraction, ml)
    return DomainVerdict(
        False, f"structures other than {largest} cover {fraction:.3f} of what was segmented "
               f"(at least {min_structure_fraction:g} expected): input this model was not "
               "made for?", fraction, ml)
