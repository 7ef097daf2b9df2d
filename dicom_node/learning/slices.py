"""Training slices: volumes cut into 2D samples, and samples brought to the model's input.

A :class:`SliceSample` is one slice's raw intensities, its label map and which labels it
annotates (partial labels). :func:`prepare_samples` resamples and normalises samples to
the model's input once, as :class:`PreparedSlices`, which training draws batches from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dicom_node.learning.errors import TrainingError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.preprocessing import (
    intensity_range,
    normalise,
    resize_images,
    resize_labels,
)


@dataclass(frozen=True)
class SliceSample:
    """One training slice: raw intensities (HU for CT), its label map, what is annotated.

    ``labels`` holds label values (see ``ModelConfig.labels``); ``annotated`` names the
    labels whose voxels are all marked, so any other voxel is known not to be them.
    ``mr_range`` is the volume's percentile range for MR (``None`` for CT).
    """

    image: np.ndarray
    labels: np.ndarray
    annotated: frozenset[str]
    mr_range: tuple[float, float] | None = None


def samples_from_volume(
    volume: np.ndarray,
    labels: np.ndarray,
    annotated: Iterable[str],
    config: ModelConfig,
    slices: Iterable[int] | None = None,
) -> list[SliceSample]:
    """Cut a volume and its label map into slice samples (all slices by default)."""
    if volume.shape != labels.shape:
        raise TrainingError(f"volume {volume.shape} and labels {labels.shape} differ")
    mr_range = intensity_range(volume, config.preprocessing)
    names = frozenset(annotated)
    unknown = names - set(config.label_values)
    if unknown:
        raise TrainingError(f"annotated labels {sorted(unknown)} are not in model {config.name}")
    idx = range(volume.shape[0]) if slices is None else slices
    return [
        SliceSample(volume[i].astype(np.float32), labels[i].astype(np.uint8), names, mr_range)
        for i in idx
    ]


@dataclass
class PreparedSlices:
    """Samples at model resolution: normalised images, label maps, annotation masks."""

    images: torch.Tensor  # (N, C, S, S) float16
    labels: torch.Tensor  # (N, S, S) uint8
    annotated: torch.Tensor  # (N, L) bool, L in config.labels order

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def prepare_samples(samples: Sequence[SliceSample], config: ModelConfig) -> PreparedSlices:
    pp = config.preprocessing
    size = (pp.input_size, pp.input_size)
    names = [lab.name for lab in config.labels]
    images, labels = [], []
    start = 0
    while start < len(samples):  # resample runs of same-shaped slices together
        shape, rng = samples[start].image.shape, samples[start].mr_range
        stop = start
        while (
            stop < len(samples)
            and samples[stop].image.shape == shape
            and samples[stop].mr_range == rng
            and stop - start < 256
        ):
            stop += 1
        chunk = samples[start:stop]
        x = torch.from_numpy(np.stack([s.image for s in chunk]).astype(np.float32))[:, None]
        images.append(normalise(resize_images(x, size), pp, rng).half())
        y = torch.from_numpy(np.stack([s.labels for s in chunk]).astype(np.uint8))
        labels.append(resize_labels(y, size))
        start = stop
    annotated = torch.tensor(
        [[n in s.annotated for n in names] for s in samples], dtype=torch.bool
    ).reshape(len(samples), len(names))
    return PreparedSlices(torch.cat(images), torch.cat(labels), annotated)


def prepared_or_none(
    samples: Sequence[SliceSample] | PreparedSlices, config: ModelConfig
) -> PreparedSlices | None:
    """``samples`` prepared (as given when already prepared); ``None`` when empty."""
    if isinstance(samples, PreparedSlices):
        return samples if len(samples) else None
    return prepare_samples(samples, config) if len(samples) else None
