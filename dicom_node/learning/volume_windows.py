"""Training windows for 3D networks: whole volumes brought to the model's grid once,
then one class-balanced window of ``preprocessing.volume.roi_size`` per step.

A volume is prepared exactly as for inference (:func:`~dicom_node.learning.
volume_inference.prepare_volume`: reorientation, resampling, intensity); its label map
follows it (nearest neighbour). :class:`PreparedVolumes` keeps label *values*, as
:class:`~dicom_node.learning.slices.PreparedSlices` does, so the per-head targets and
the partial-label masking of :mod:`~dicom_node.learning.losses` apply unchanged.
:class:`WindowSource` hands :func:`~dicom_node.learning.training.train` one window per
step, from each volume in turn in a random order (no augmentation, as the external
networks' 3D training has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.learning.batches import BatchPlan
from dicom_node.learning.errors import TrainingError
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.preprocessing_spec import VolumePreprocessing
from dicom_node.learning.volume_inference import prepare_volume, to_ras
from dicom_node.learning.volume_samples import VolumeSample


def volume_pair(sample: VolumeSample, labels: np.ndarray, vp: VolumePreprocessing
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample``'s image ``(1, 1, *grid)`` as the network sees it and ``labels`` (any
    integer map on the sample's grid) brought to that grid, ``(1, *grid)`` uint8."""
    if sample.image.shape != labels.shape:
        raise TrainingError(f"volume {sample.image.shape} and labels {labels.shape} differ")
    x, orient = prepare_volume(sample.image, sample.spacing, vp, sample.affine)
    t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8))[None].float()
    if orient is not None:
        t = to_ras(t, *orient)
    t = F.interpolate(t[None], size=tuple(x.shape[2:]), mode="nearest-exact")[0]
    return x, t.to(torch.uint8)


def class_balanced_window(x: torch.Tensor, y: torch.Tensor, roi: Sequence[int],
                          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``roi`` window (padded where the volume is smaller), 3D, centred on a voxel of a
    class drawn uniformly from those the target shows (as MONAI's
    ``RandCropByLabelClasses`` with equal ratios): a small organ is in as many windows
    as the background, which a uniform window would give it only by its volume."""
    pad = [max(0, r - s) for r, s in zip(roi, x.shape[2:], strict=True)]
    if any(pad):
        spec = [p for d in reversed(pad) for p in (0, d)]
        x = F.pad(x, spec, value=float(x.min()))
        y = F.pad(y, spec, value=0)
    classes = torch.unique(y[0])
    picked = classes[int(torch.randint(0, len(classes), (1,), generator=gen))]
    voxels = torch.nonzero(y[0] == picked)
    centre = voxels[int(torch.randint(0, len(voxels), (1,), generator=gen))].tolist()
    starts = [min(max(c - r // 2, 0), s - r)
              for c, r, s in zip(centre, roi, x.shape[2:], strict=True)]
    sl = tuple(slice(a, a + r) for a, r in zip(starts, roi, strict=True))
    return x[(slice(None), slice(None), *sl)], y[(slice(None), *sl)]


@dataclass
class PreparedVolumes:
    """Volumes at the model's grid: images, label maps (values), annotation masks."""

    images: list[torch.Tensor]  # each (1, 1, *grid) float32
    labels: list[torch.Tensor]  # each (1, *grid) uint8
    annotated: torch.Tensor  # (N, L) bool, L in config.labels order

    def __len__(self) -> int:
        return len(self.labels)


def prepare_volumes(samples: Sequence[VolumeSample], config: ModelConfig) -> PreparedVolumes:
    """``samples`` at ``config``'s 3D grid; they must name only the model's labels.

    Raises
    ------
    TrainingError
        The model is not 3D, a sample names a label the model lacks, or an image and its
        labels differ in shape.
    """
    vp = config.preprocessing.volume
    if config.spatial_dims != 3 or vp is None:
        raise TrainingError(f"model {config.name!r} is 2D: it trains on slices, not volumes")
    names = [lab.name for lab in config.labels]
    unknown = {n for s in samples for n in s.annotated} - set(names)
    if unknown:
        raise TrainingError(f"annotated labels {sorted(unknown)} are not in model {config.name}")
    pairs = [volume_pair(s, s.labels, vp) for s in samples]
    annotated = torch.tensor([[n in s.annotated for n in names] for s in samples],
                             dtype=torch.bool).reshape(len(samples), len(names))
    return PreparedVolumes([x for x, _ in pairs], [y for _, y in pairs], annotated)


@dataclass
class WindowSource:
    """Draws a round's windows: per step one window of one volume (an epoch visits each
    volume once, in a random order)."""

    data: PreparedVolumes
    roi: tuple[int, ...]
    generator: torch.Generator

    @property
    def plan(self) -> BatchPlan:
        return BatchPlan(new=1, replay=0, anchors=0, steps_per_epoch=len(self.data))

    def epoch_order(self) -> torch.Tensor:
        return torch.randperm(len(self.data), generator=self.generator)

    def batch(self, order: torch.Tensor, b: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``b``'s window: image ``(1, 1, *roi)``, labels ``(1, *roi)``, annotation."""
        i = int(order[b])
        x, y = class_balanced_window(self.data.images[i], self.data.labels[i], self.roi,
                                     self.generator)
        return x, y, self.data.annotated[i:i + 1]
