"""3D inference: the whole volume through MONAI's sliding-window inferer.

Steps, each undone in reverse on the way back so the label map has exactly the
input's shape and geometry: reorient (``preprocessing.volume.orientation``), resample
to the model's spacing or shape (trilinear), intensity steps (MONAI transforms), then
:func:`monai.inferers.sliding_window_inference` with overlap and Gaussian blending over
windows of ``roi_size``, ``sw_batch_size`` at a time; the blended softmax is resampled
back (trilinear) and reoriented before the label is chosen. Memory is bounded by the
window (activations) plus one probability volume per channel at the model's grid.

MONAI is imported where it is used (3 s): a node serving only 2D models, and every
``tessera`` command, start without it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.learning.device import autocast, on_device
from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.inference import (
    SegmentationResult,
    combine_heads,
    normalised_entropy,
    segment_volume,
    split_heads,
    stacked_softmax,
)
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import SegmentationNetwork
from dicom_node.learning.preprocessing_spec import IntensityStep, VolumePreprocessing

LOGGER = logging.getLogger(__name__)

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def ras_axes(affine: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """How to bring a ``(k, r, c)`` array to RAS+: ``(permutation, flips)``.

    ``flips[j]``: array axis *j* runs against its closest RAS axis; ``permutation``:
    output axis *i* is input axis ``permutation[i]`` (after the flips).
    """
    dirs = affine[:3, :3] * _LPS_TO_RAS[:, None]
    dirs = dirs / np.linalg.norm(dirs, axis=0, keepdims=True)
    world = [int(np.argmax(np.abs(dirs[:, j]))) for j in range(3)]
    if sorted(world) != [0, 1, 2]:
        raise ModelConfigError("volume axes are too oblique to reorient to RAS")
    flips = tuple(bool(dirs[world[j], j] < 0) for j in range(3))
    permutation = tuple(world.index(i) for i in range(3))
    return permutation, flips


def to_ras(array: torch.Tensor, permutation: tuple[int, ...], flips: tuple[bool, ...]
           ) -> torch.Tensor:
    """``(C, k, r, c)`` -> ``(C, R, A, S)``."""
    flipped = [j + 1 for j, f in enumerate(flips) if f]
    if flipped:
        array = array.flip(flipped)
    return array.permute(0, *(p + 1 for p in permutation))


def from_ras(array: torch.Tensor, permutation: tuple[int, ...], flips: tuple[bool, ...]
             ) -> torch.Tensor:
    inverse = [permutation.index(j) for j in range(3)]
    array = array.permute(0, *(i + 1 for i in inverse))
    flipped = [j + 1 for j, f in enumerate(flips) if f]
    return array.flip(flipped) if flipped else array


def apply_intensity(x: torch.Tensor, steps: tuple[IntensityStep, ...]) -> torch.Tensor:
    """The configured intensity steps, in order, as MONAI transforms (``(C, ...)``).

    The result is a plain tensor: MONAI's MetaTensor would carry its metadata through
    every layer of the network (measured: most of a training step's time).
    """
    from monai.transforms import (
        NormalizeIntensity,
        ScaleIntensityRange,
        ScaleIntensityRangePercentiles,
    )

    for step in steps:
        if step.op == "window":
            x = _plain(ScaleIntensityRange(step.lower, step.upper, -1.0, 1.0, clip=True)(x))
        elif step.op == "percentiles":
            x = _plain(ScaleIntensityRangePercentiles(step.lower, step.upper, 0.0, 1.0,
                                                      clip=True)(x))
        elif step.op == "zscore":
            x = _plain(NormalizeIntensity()(x))
        else:
            x = x * step.scale + step.offset
    return x


def _plain(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).as_subclass(torch.Tensor)


def _model_grid(shape: tuple[int, ...], spacing: tuple[float, ...], vp: VolumePreprocessing
                ) -> tuple[int, int, int]:
    if vp.shape is not None:
        return vp.shape
    if vp.spacing is not None:
        return tuple(max(1, round(n * s / t))  # type: ignore[return-value]
                     for n, s, t in zip(shape, spacing, vp.spacing, strict=True))
    return tuple(shape)  # type: ignore[return-value]


def prepare_volume(
    volume: np.ndarray, spacing: tuple[float, float, float], vp: VolumePreprocessing,
    affine: np.ndarray | None,
) -> tuple[torch.Tensor, tuple[tuple[int, ...], tuple[bool, ...]] | None]:
    """Raw ``(k, r, c)`` -> network input ``(1, 1, *grid)`` and the reorientation used."""
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None]
    sp: tuple[float, ...] = spacing
    orient = None
    if vp.orientation == "RAS":
        if affine is None:
            raise ModelConfigError("orientation RAS needs the volume's affine")
        orient = ras_axes(affine)
        x = to_ras(x, *orient)
        sp = tuple(spacing[p] for p in orient[0])
    grid = _model_grid(tuple(x.shape[1:]), sp, vp)
    if grid != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=grid, mode="trilinear", align_corners=False)[0]
    return apply_intensity(x, vp.intensity)[None].float(), orient


def segment_volume_3d(
    model: SegmentationNetwork,
    config: ModelConfig,
    volume: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    affine: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
) -> SegmentationResult:
    """Segment a ``(slices, rows, cols)`` volume with a 3D network (see module doc),
    its heads' softmax blended side by side and combined as in 2D; ``amp``: float16
    autocast on CUDA."""
    vp = config.preprocessing.volume
    if vp is None or volume.ndim != 3:
        raise ModelConfigError("3D inference needs preprocessing.volume and a 3D volume")
    device = torch.device(device)
    model = on_device(model, device).eval()
    x, orient = prepare_volume(volume, spacing, vp, affine)
    heads = list(config.active_head_names)  # pending added heads never run

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = model(window, heads)
        return stacked_softmax(logits, heads)

    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        probs = sliding_window_inference(
            x.to(device), roi_size=vp.roi_size, sw_batch_size=vp.sw_batch_size,
            predictor=predictor, overlap=vp.overlap, mode="gaussian",
            padding_mode="constant", cval=float(x.min()), sw_device=device, device="cpu")
        probs = torch.as_tensor(probs)[0]
        size = volume.shape if orient is None else tuple(volume.shape[p] for p in orient[0])
        if tuple(probs.shape[1:]) != tuple(size):
            probs = F.interpolate(probs[None], size=size, mode="trilinear",
                                  align_corners=False)[0]
        if orient is not None:
            probs = from_ras(probs, *orient)
        probs = probs.permute(1, 0, 2, 3).contiguous()  # (slices, C, rows, cols)
        per_head = split_heads(probs, heads, config)
        labels, confidence = combine_heads(per_head, config)
        entropy = {h: normalised_entropy(p).numpy().astype(np.float16)
                   for h, p in per_head.items()}
    LOGGER.debug("segmented a %s volume with %s generation %d", volume.shape, config.name,
                 config.generation)
    return SegmentationResult(
        labels=labels.numpy(),
        confidence=confidence.float().numpy(),
        entropy=entropy,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        model_name=config.name,
        generation=config.generation,
    )


def segment_any(
    model: SegmentationNetwork,
    config: ModelConfig,
    volume: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    affine: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
) -> SegmentationResult:
    """Slice by slice for 2D networks, sliding window for 3D ones; on ``device`` (a copy
    of the shared model when that is not the CPU), with float16 autocast on CUDA when
    ``amp``."""
    device = torch.device(device)
    if config.spatial_dims == 3:
        return segment_volume_3d(model, config, volume, spacing, affine=affine, device=device,
                                 amp=amp)
    with autocast(device, amp):
        return segment_volume(on_device(model, device), config, volume, spacing,
                              device=device)
