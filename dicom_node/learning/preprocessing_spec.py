"""What a model expects as input: modality, input size and intensity normalisation of 2D
slices, and the geometry, intensity steps and sliding window of 3D networks.

The functions that apply it to slices are in :mod:`~dicom_node.learning.preprocessing`,
to volumes in :mod:`~dicom_node.learning.volume_inference`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dicom_node.learning.errors import ModelConfigError


class Modality(StrEnum):
    CT = "CT"
    MR = "MR"


INTENSITY_OPS = ("window", "percentiles", "zscore", "affine")


@dataclass(frozen=True)
class IntensityStep:
    """One intensity transform of a 3D model's input, applied in order.

    ``window``: ``[lower, upper]`` (HU) mapped to [-1, 1], clipped. ``percentiles``:
    the volume's ``[lower, upper]`` percentiles mapped to [0, 1], clipped. ``zscore``:
    zero mean, unit variance. ``affine``: ``x * scale + offset``.
    """

    op: str
    lower: float = 0.0
    upper: float = 0.0
    scale: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.op not in INTENSITY_OPS:
            raise ModelConfigError(
                f"preprocessing.volume.intensity: op {self.op[:32]!r} is not one of "
                f"{INTENSITY_OPS}")
        if self.op in ("window", "percentiles") and not self.lower < self.upper:
            raise ModelConfigError(
                f"preprocessing.volume.intensity.{self.op}: lower must be < upper")
        if self.op == "percentiles" and not 0 <= self.lower < self.upper <= 100:
            raise ModelConfigError("preprocessing.volume.intensity.percentiles: 0..100")

    def to_dict(self) -> dict[str, Any]:
        if self.op in ("window", "percentiles"):
            return {"op": self.op, "lower": self.lower, "upper": self.upper}
        if self.op == "affine":
            return {"op": self.op, "scale": self.scale, "offset": self.offset}
        return {"op": self.op}


@dataclass(frozen=True)
class VolumePreprocessing:
    """Geometry, intensity and sliding window of a 3D network's input.

    ``orientation``: ``"RAS"`` reorders and flips the volume's axes so that they run
    toward the patient's right, anterior and superior (NIfTI's canonical RAS+ order, what
    models trained on NIfTI files expect); ``None`` keeps the
    acquisition order (slice, row, column). Then either ``spacing`` (mm per axis,
    trilinear resampling) or ``shape`` (voxels per axis) sets the grid; neither keeps it.
    ``roi_size`` is the sliding window (voxels), run ``sw_batch_size`` windows at a time
    with ``overlap`` and Gaussian blending; these bound inference memory on CPU.
    """

    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    shape: tuple[int, int, int] | None = None
    intensity: tuple[IntensityStep, ...] = ()
    roi_size: tuple[int, int, int] = (96, 96, 96)
    sw_batch_size: int = 1
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.orientation not in (None, "RAS"):
            raise ModelConfigError("preprocessing.volume.orientation must be 'RAS' or null")
        if self.spacing is not None and self.shape is not None:
            raise ModelConfigError("preprocessing.volume: give spacing or shape, not both")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ModelConfigError("preprocessing.volume.spacing: three positive numbers")
        if self.shape is not None and (len(self.shape) != 3 or min(self.shape) < 1):
            raise ModelConfigError("preprocessing.volume.shape: three positive integers")
        if len(self.roi_size) != 3 or min(self.roi_size) < 8 or max(self.roi_size) > 512:
            raise ModelConfigError("preprocessing.volume.roi_size: three integers in 8..512")
        if not 1 <= self.sw_batch_size <= 16:
            raise ModelConfigError("preprocessing.volume.sw_batch_size must be 1..16")
        if not 0 <= self.overlap < 1:
            raise ModelConfigError("preprocessing.volume.overlap must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "orientation": self.orientation,
            "spacing": None if self.spacing is None else list(self.spacing),
            "shape": None if self.shape is None else list(self.shape),
            "intensity": [step.to_dict() for step in self.intensity],
            "roi_size": list(self.roi_size),
            "sw_batch_size": self.sw_batch_size,
            "overlap": self.overlap,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VolumePreprocessing:
        spacing, shape = data.get("spacing"), data.get("shape")
        return cls(
            orientation=data.get("orientation"),
            spacing=None if spacing is None else tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            shape=None if shape is None else tuple(int(v) for v in shape),  # type: ignore[arg-type]
            intensity=tuple(
                IntensityStep(op=str(step["op"]), lower=float(step.get("lower", 0.0)),
                              upper=float(step.get("upper", 0.0)),
                              scale=float(step.get("scale", 1.0)),
                              offset=float(step.get("offset", 0.0)))
                for step in data.get("intensity", ())),
            roi_size=tuple(int(v) for v in data.get("roi_size", (96, 96, 96))),  # type: ignore[arg-type]
            sw_batch_size=int(data.get("sw_batch_size", 1)),
            overlap=float(data.get("overlap", 0.25)),
        )


@dataclass(frozen=True)
class Preprocessing:
    """Input geometry and intensity normalisation.

    CT: one input channel per HU window, each mapped linearly to [-1, 1] and clipped.
    MR: one channel, the volume's ``mr_percentiles`` mapped to [-1, 1] and clipped.

    3D networks (:mod:`dicom_node.learning.volume_inference`) use ``volume`` instead of
    ``input_size``: target orientation, spacing or shape, intensity steps and the
    sliding window.
    """

    modality: Modality = Modality.CT
    input_size: int = 128
    ct_windows: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-160.0, 240.0))
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    volume: VolumePreprocessing | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", Modality(self.modality))
        if self.input_size < 16:
            raise ModelConfigError("preprocessing.input_size must be >= 16")
        if not self.ct_windows:
            raise ModelConfigError("preprocessing.ct_windows needs at least one window")
        for lo, hi in self.ct_windows:
            if not lo < hi:
                raise ModelConfigError(f"preprocessing.ct_windows: {lo} must be < {hi}")
        lo, hi = self.mr_percentiles
        if not 0 <= lo < hi <= 100:
            raise ModelConfigError("preprocessing.mr_percentiles must be 0 <= low < high <= 100")

    @property
    def in_channels(self) -> int:
        return len(self.ct_windows) if self.modality is Modality.CT else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality.value,
            "input_size": self.input_size,
            "ct_windows": [list(w) for w in self.ct_windows],
            "mr_percentiles": list(self.mr_percentiles),
            **({"volume": self.volume.to_dict()} if self.volume is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            modality=Modality(data.get("modality", "CT")),
            input_size=int(data.get("input_size", 128)),
            ct_windows=tuple(
                (float(lo), float(hi))
                for lo, hi in data.get("ct_windows", ((-1000, 1000), (-160, 240)))
            ),
            mr_percentiles=tuple(float(p) for p in data.get("mr_percentiles", (1, 99))),  # type: ignore[arg-type]
            volume=(VolumePreprocessing.from_dict(data["volume"])
                    if data.get("volume") is not None else None),
        )
