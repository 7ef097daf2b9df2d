"""Robust weighting: pure functions that bound what one update can do to a merge.

- :func:`capped_shares`: normalised weights, none above a maximum share, the rest
  renormalised, so a node that lies about its sample count cannot dominate a merge.
- :func:`clip_delta`: an update's change from its base scaled down to a maximum norm
  (:func:`delta_norm`, :func:`clip_scale`, :func:`scale_delta` do it block by block).
- :func:`trimmed_mean`: a coordinate-wise trimmed mean, so an outlier at any coordinate
  is dropped rather than averaged in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from federation_grpc.hub.tensorfile import BlockReader, flat_blocks


def capped_shares(weights: Sequence[float], max_share: float = 1.0) -> np.ndarray:
    """Normalised weights in which none exceeds ``max_share``, the rest renormalised.

    Shares above the cap are set to it and the remainder is spread over the others in
    proportion to their weights, repeated until no share exceeds the cap (water-filling).
    When the cap cannot hold (fewer than ``1 / max_share`` weights) every weight gets an
    equal share, the closest the cap allows; a lone weight gets 1.

    Raises
    ------
    ValueError
        When the weights are empty, negative or sum to zero, or ``max_share`` is not in
        (0, 1].
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], not {max_share}")
    n = w.size
    if n * max_share < 1.0:
        return np.full(n, 1.0 / n)
    capped = np.zeros(n, dtype=bool)
    while not capped.all():
        free_weight = float(w[~capped].sum())
        remaining = 1.0 - max_share * int(capped.sum())
        if free_weight > 0:
            shares = np.where(capped, max_share, remaining * w / free_weight)
        else:  # only zero weights left uncapped: they split what remains evenly
            shares = np.where(capped, max_share, remaining / int((~capped).sum()))
        over = ~capped & (shares > max_share * (1 + 1e-12))
        if not over.any():
            return np.asarray(shares, dtype=np.float64)
        capped |= over
    return np.full(n, 1.0 / n)


def trim_count(count: int, trim_fraction: float) -> int:
    """How many values a trimmed mean drops at each end: ``floor(fraction * count)``,
    leaving at least one value."""
    return min(math.floor(trim_fraction * count + 1e-9), (count - 1) // 2)


def trimmed_mean(arrays: Sequence[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Coordinate-wise trimmed mean in float64: at every coordinate the
    :func:`trim_count` highest and lowest values are dropped and the rest averaged
    (unweighted, so a sample count cannot buy influence). With nothing to trim it is the
    plain mean.

    Raises
    ------
    ValueError
        When ``trim_fraction`` is not in [0, 0.5).
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), not {trim_fraction}")
    stacked = np.stack([a.astype(np.float64) for a in arrays])
    k = trim_count(len(arrays), trim_fraction)
    if k:
        stacked = np.sort(stacked, axis=0)[k : len(arrays) - k]
    return np.asarray(stacked.mean(axis=0))


_BLOCK = 1 << 18


def delta_norm(tensors: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm (float64) of ``tensors - base`` over the floating tensors ``base`` holds,
    taken block by block (a model in a file is read one block at a time)."""
    total = 0.0
    for name, value in tensors.items():
        if name not in base or not np.issubdtype(value.dtype, np.floating):
            continue
        mine, theirs = BlockReader(value, _BLOCK), BlockReader(base[name], _BLOCK)
        for part in flat_blocks(mine.flat.size, _BLOCK):
            delta = mine.read(part).astype(np.float64) - theirs.read(part)
            total += float(np.dot(delta, delta))
    return math.sqrt(total)


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that scales a delta of ``norm`` down to ``max_norm`` (1: leave it)."""
    if max_norm <= 0 or norm <= max_norm:
        return 1.0
    return max_norm / norm


def scale_delta(value: np.ndarray, start: np.ndarray, scale: float) -> np.ndarray:
    """``start + scale * (value - start)`` in float64, cast back to ``value``'s dtype."""
    begin = start.astype(np.float64)
    moved = begin + scale * (value.astype(np.float64) - begin)
    return np.ascontiguousarray(moved.astype(value.dtype))


def clip_delta(
    tensors: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], max_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """``tensors`` with their delta from ``base`` scaled down to L2 norm ``max_norm``.

    The norm is taken over the floating tensors that ``base`` holds (a new head's first
    weights have no base and pass unchanged). Returns the tensors and the delta's norm
    before clipping; a delta within the bound (or ``max_norm`` 0) returns them as they are.
    """
    norm = delta_norm(tensors, base)
    scale = clip_scale(norm, max_norm)
    if scale == 1.0:
        return dict(tensors), norm
    out = dict(tensors)
    for name, value in tensors.items():
        if name in base and np.issubdtype(value.dtype, np.floating):
            out[name] = scale_delta(value, base[name], scale)
    return out, norm
