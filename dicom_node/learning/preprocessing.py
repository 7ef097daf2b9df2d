"""Slice preprocessing shared by training and inference, so both see the same input.

Slices are resampled in-plane to ``input_size`` x ``input_size`` (bilinear with
antialiasing for images, nearest for label maps), then normalised: CT by HU windows
(one channel each, mapped to [-1, 1]), MR by the volume's percentiles.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.learning.preprocessing_spec import Modality, Preprocessing


def resize_images(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear in-plane resampling of ``(N, C, H, W)`` float slices."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    antialias = slices.shape[-2] > size[0] or slices.shape[-1] > size[1]
    return F.interpolate(
        slices, size=size, mode="bilinear", align_corners=False, antialias=antialias
    )


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour in-plane resampling of ``(N, H, W)`` integer label slices."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    return out[:, 0].to(labels.dtype)


def intensity_range(volume: np.ndarray, pp: Preprocessing) -> tuple[float, float] | None:
    """Per-volume normalisation range: MR percentiles; ``None`` for CT (fixed windows)."""
    if pp.modality is Modality.CT:
        return None
    lo, hi = np.percentile(volume, pp.mr_percentiles)
    return float(lo), float(max(hi, lo + 1e-3))


def normalise(
    slices: torch.Tensor, pp: Preprocessing, mr_range: tuple[float, float] | None = None
) -> torch.Tensor:
    """``(N, 1, H, W)`` HU (or MR signal) -> ``(N, in_channels, H, W)`` in [-1, 1]."""
    if pp.modality is Modality.CT:
        windows = pp.ct_windows
    else:
        if mr_range is None:
            raise ValueError("MR normalisation needs the volume's percentile range")
        windows = (mr_range,)
    channels = [((slices - lo) * (2.0 / (hi - lo)) - 1.0).clamp_(-1.0, 1.0) for lo, hi in windows]
    return torch.cat(channels, dim=1)


def prepare_slices(
    slices: np.ndarray | torch.Tensor,
    pp: Preprocessing,
    mr_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``(N, H, W)`` raw slices -> model input ``(N, in_channels, size, size)`` float32."""
    x = torch.as_tensor(np.asarray(slices, dtype=np.float32))[:, None]
    x = resize_images(x, (pp.input_size, pp.input_size))
    return normalise(x, pp, mr_range)
