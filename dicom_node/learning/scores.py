"""Segmentation metrics in numpy only (the hub may reuse them without torch).

Everything returns plain ``dict[str, float]``: these numbers go to the hub for quality
monitoring, so they carry no UIDs and nothing about the patient.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

LOGGER = logging.getLogger(__name__)

UNCERTAIN_BELOW = 0.6


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def dice_per_label(
    pred: np.ndarray, truth: np.ndarray, labels: Mapping[str, int]
) -> dict[str, float]:
    """``{label name: Dice}`` of two label maps of the same shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    return {name: dice(pred == value, truth == value) for name, value in labels.items()}


def label_volumes_ml(
    labels: np.ndarray, spacing: tuple[float, float, float], names: Mapping[str, int]
) -> dict[str, float]:
    """Volume of each label in millilitres (spacing in mm)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=256)
    return {name: float(counts[value]) * voxel_ml for name, value in names.items()}


def count_components(mask: np.ndarray) -> int:
    """Connected components of a boolean mask (faces touching: 6-connectivity in 3D).

    Runs along the last axis are the nodes; runs that touch across the other axes are
    joined by union-find, done with vectorised min-label propagation and pointer
    jumping, so it needs numpy only.
    """
    mask = np.atleast_1d(np.asarray(mask, bool))
    if not mask.any():
        return 0
    starts = mask.copy()
    starts[..., 1:] &= ~mask[..., :-1]
    ids = np.cumsum(starts, dtype=np.int64).reshape(mask.shape) * mask  # run id, 0 = none
    n = int(ids.max())
    us, vs = [], []
    for axis in range(mask.ndim - 1):
        a = np.moveaxis(ids, axis, 0)
        left, right = a[:-1], a[1:]
        both = (left > 0) & (right > 0)
        first = both.copy()  # one pair per stretch of overlap between two runs
        first[..., 1:] &= ~both[..., :-1]
        us.append(left[first] - 1)
        vs.append(right[first] - 1)
    if not us:
        return n
    u, v = np.concatenate(us), np.concatenate(vs)
    parent = np.arange(n)
    while True:
        pu, pv = parent[u], parent[v]
        low = np.minimum(pu, pv)
        before = parent.copy()
        np.minimum.at(parent, pu, low)
        np.minimum.at(parent, pv, low)
        while True:  # pointer jumping until every node points at a root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        if np.array_equal(parent, before):
            break
    return int(np.count_nonzero(parent == np.arange(n)))


def slice_consistency(mask: np.ndarray) -> float:
    """Mean Dice between adjacent slices' masks, over pairs where either is non-empty.

    1.0 for a mask in at most one slice pair-free (nothing to compare).
    """
    mask = np.asarray(mask, bool)
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    scores = [
        dice(mask[k], mask[k + 1]) for k in range(mask.shape[0] - 1) if area[k] or area[k + 1]
    ]
    return float(np.mean(scores)) if scores else 1.0


def quality_metrics(
    labels: np.ndarray,
    confidence: np.ndarray,
    entropy: Mapping[str, np.ndarray],
    spacing: tuple[float, float, float],
    names: Mapping[str, int],
    *,
    uncertain_below: float = UNCERTAIN_BELOW,
) -> dict[str, float]:
    """Cheap per-segmentation quality figures for the hub's quality model.

    Keys: ``volume_ml.<label>``, ``components.<label>``, ``slice_consistency.<label>``,
    ``confidence.<label>`` (mean confidence over the label's voxels, 0 when it is empty),
    ``uncertain_fraction.<label>`` (its voxels with confidence below ``uncertain_below``),
    ``entropy.<head>`` (mean normalised entropy over the foreground), ``mean_entropy``,
    ``uncertain_fraction`` (foreground voxels with confidence below ``uncertain_below``)
    and ``foreground_ml``.
    """
    foreground = labels > 0
    out: dict[str, float] = {}
    for name, ml in label_volumes_ml(labels, spacing, names).items():
        out[f"volume_ml.{name}"] = ml
    for name, value in names.items():
        mask = labels == value
        out[f"components.{name}"] = float(count_components(mask))
        out[f"slice_consistency.{name}"] = slice_consistency(mask)
        # Per label, not only pooled: one organ gone wrong hides in the foreground mean.
        conf = confidence[mask]
        out[f"confidence.{name}"] = float(conf.astype(np.float64).mean()) if conf.size else 0.0
        out[f"uncertain_fraction.{name}"] = (
            float(np.count_nonzero(conf < uncertain_below)) / conf.size if conf.size else 0.0)
    n_fg = int(foreground.sum())
    head_means = []
    for head, ent in entropy.items():
        mean = float(ent[foreground].astype(np.float64).mean()) if n_fg else 0.0
        out[f"entropy.{head}"] = mean
        head_means.append(mean)
    out["mean_entropy"] = float(np.mean(head_means)) if head_means else 0.0
    out["uncertain_fraction"] = (
        float(np.count_nonzero(confidence[foreground] < uncertain_below)) / n_fg if n_fg else 0.0
    )
    out["foreground_ml"] = n_fg * float(np.prod(spacing)) / 1000.0
    return out
