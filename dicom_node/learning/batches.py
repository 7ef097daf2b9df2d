"""How a training batch is put together: new samples, replayed and anchor slices, augmentation.

Every batch keeps at least one new sample; replay and anchor slices are drawn with
replacement from their sets. One generator draws everything in a fixed order (the
epoch's permutation, then per batch the replay draw, the anchor draw, augmentation),
so a seed repeats a round exactly.

Augmentation is a small random affine (rotation, scale, shift) plus intensity scale,
shift and noise. There is no flipping: left and right kidney are lateral labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dicom_node.learning.slices import PreparedSlices


@dataclass(frozen=True)
class BatchPlan:
    """Samples per batch from each source, and batches per epoch of the new samples."""

    new: int
    replay: int
    anchors: int
    steps_per_epoch: int


def plan_batches(
    batch_size: int,
    replay_fraction: float,
    anchor_fraction: float,
    samples: int,
    replay: PreparedSlices | None,
    anchors: PreparedSlices | None,
) -> BatchPlan:
    """Split ``batch_size`` between ``samples`` new samples, replay and anchors."""
    n_anchor = round(batch_size * anchor_fraction) if anchors is not None else 0
    n_anchor = min(n_anchor, batch_size - 1)  # every batch keeps a new sample
    n_replay = round(batch_size * replay_fraction) if replay is not None else 0
    n_replay = min(n_replay, batch_size - 1 - n_anchor)
    n_new = batch_size - n_replay - n_anchor
    return BatchPlan(n_new, n_replay, n_anchor, math.ceil(samples / n_new))


@dataclass
class BatchSource:
    """Draws a round's batches from ``data`` plus ``replay`` and ``anchors``."""

    data: PreparedSlices
    replay: PreparedSlices | None
    anchors: PreparedSlices | None
    plan: BatchPlan
    generator: torch.Generator
    augment: bool

    def epoch_order(self) -> torch.Tensor:
        """The order in which an epoch visits the new samples."""
        return torch.randperm(len(self.data), generator=self.generator)

    def batch(
        self, order: torch.Tensor, b: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``b`` of an epoch in ``order``: float images, label maps, annotation masks."""
        n_new = self.plan.new
        idx = order[b * n_new : (b + 1) * n_new]
        x, y, ann = self.data.images[idx], self.data.labels[idx], self.data.annotated[idx]
        for extra, n in ((self.replay, self.plan.replay), (self.anchors, self.plan.anchors)):
            if n and extra is not None:
                r = torch.randint(len(extra), (n,), generator=self.generator)
                x = torch.cat([x, extra.images[r]])
                y = torch.cat([y, extra.labels[r]])
                ann = torch.cat([ann, extra.annotated[r]])
        x = x.float()
        if self.augment:
            x, y = augment_batch(x, y, self.generator)
        return x, y, ann


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random affine + intensity changes; never mirrors (lateral labels)."""
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-0.17, 0.17)  # about +-10 degrees
    scale_x, scale_y = uniform(0.88, 1.12), uniform(0.88, 1.12)
    shift_x, shift_y = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * scale_x, -sin * scale_x, shift_x], dim=1),
            torch.stack([sin * scale_y, cos * scale_y, shift_y], dim=1),
        ],
        dim=1,
    ).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1) with zero padding so that outside the slice reads -1 (air)
    images = (
        F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        - 1
    )
    labels = F.grid_sample(
        labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].to(labels.dtype)
    gain = uniform(0.9, 1.1).to(images.device)[:, None, None, None]
    offset = uniform(-0.08, 0.08).to(images.device)[:, None, None, None]
    sigma = uniform(0.0, 0.05).to(images.device)[:, None, None, None]
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    images = ((images + 1) * gain - 1 + offset + sigma * noise).clamp_(-1, 1)
    return images, labels
