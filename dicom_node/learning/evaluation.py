"""Scoring a model on held-out corrected cases, whatever kind of sample they are.

Two kinds of stored sample exist: slice samples of the multi-head U-Net
(:class:`~dicom_node.learning.incremental.StoredSample`, scored slice by slice with
:func:`~dicom_node.learning.incremental.slice_overlaps`) and whole corrected volumes of
external networks (:class:`~dicom_node.learning.volume_samples.VolumeSample`, segmented
as the inference job does, through :func:`~dicom_node.learning.volume_inference.segment_any`:
the sliding window for a 3D network). Both give voxel counts per annotated label, summed
over every case before the ratio, so one pooled Dice per label and their ``mean`` come
out the same way for both: the node's acceptance gate and its answers to the hub's
federated evaluation tasks use :func:`evaluate_samples`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dicom_node.learning.incremental import (
    Overlaps,
    StoredSample,
    add_overlaps,
    decode_sample,
    pooled_dice,
    slice_overlaps,
)
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import SegmentationNetwork
from dicom_node.learning.volume_inference import segment_any
from dicom_node.learning.volume_samples import (
    VolumeSample,
    decode_volume_sample,
    is_volume_sample,
)

__all__ = ["HeldOutSample", "decode_any_sample", "evaluate_samples", "volume_overlaps"]

LOGGER = logging.getLogger(__name__)

HeldOutSample = StoredSample | VolumeSample


def decode_any_sample(data: bytes) -> HeldOutSample:
    """A stored sample of either kind; never unpickles.

    Raises
    ------
    ValueError, KeyError
        ``data`` is neither kind of sample.
    """
    return decode_volume_sample(data) if is_volume_sample(data) else decode_sample(data)


def volume_overlaps(model: SegmentationNetwork, config: ModelConfig,
                    samples: Sequence[VolumeSample], *, device: str | torch.device = "cpu"
                    ) -> Overlaps:
    """Per annotated label, voxel counts of the model's segmentation of each whole
    volume against its corrected labels, summed over the volumes."""
    overlaps: Overlaps = {}
    for sample in samples:
        result = segment_any(model, config, sample.image.astype("float32"), sample.spacing,
                             affine=sample.affine, device=device)
        add_overlaps(overlaps, result.labels, sample.labels, config,
                     sorted(n for n in sample.annotated if n in config.label_values))
    return overlaps


def evaluate_samples(model: SegmentationNetwork, config: ModelConfig,
                     samples: Sequence[HeldOutSample], *, device: str | torch.device = "cpu"
                     ) -> dict[str, float]:
    """Dice per annotated label pooled over every case of ``samples`` (slices or
    volumes), plus ``mean``; ``{}`` when no sample annotates a label. Slice samples on
    a 2D multi-head U-Net give exactly ``evaluate_slices``."""
    slices = [s for s in samples if isinstance(s, StoredSample)]
    volumes = [s for s in samples if isinstance(s, VolumeSample)]
    overlaps = slice_overlaps(model, config, slices) if slices else {}
    for name, (inter, total) in volume_overlaps(model, config, volumes,
                                                device=device).items():
        before = overlaps.get(name, (0, 0))
        overlaps[name] = (before[0] + inter, before[1] + total)
    return pooled_dice(overlaps)
