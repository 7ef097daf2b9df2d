"""One correction as a node learns from it, for the learning benchmarks: the slices the
correction touched (plus neighbours) cut into training samples, and the replay buffer of
earlier corrections within the node's slice budget."""

from __future__ import annotations

import numpy as np

from dicom_node.learning.incremental import cut_sample, touched_slices, with_neighbours
from dicom_node.learning.inference import segment_volume
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork
from dicom_node.learning.slices import SliceSample


def correction_sample(model: MultiHeadNetwork, config: ModelConfig, image: np.ndarray,
                      labels: np.ndarray, spacing: tuple, neighbours: int
                      ) -> tuple[np.ndarray, list[SliceSample]]:
    """The model's segmentation of ``image`` and the training samples of its correction
    to ``labels``: the touched slices and ``neighbours`` on each side."""
    ai = segment_volume(model, config, image, spacing).labels
    changed = touched_slices(ai, labels, list(config.label_values.values()))
    keep = with_neighbours(changed, neighbours, image.shape[0])
    return ai, cut_sample(image, labels, keep, list(config.label_values), config).slice_samples()


def replay_within(replay: list[list[SliceSample]], budget: int) -> list[SliceSample]:
    """Earlier corrections' samples, newest first (as the node's trainer), as many whole
    corrections as fit in ``budget`` slices."""
    out: list[SliceSample] = []
    for sample in replay:
        if len(out) + len(sample) <= budget:
            out += sample
    return out
