"""Updates as aggregation sees them (:class:`Contribution`), their weight, and the means
over updates that every strategy in :mod:`federation_grpc.hub.strategies` is built from.

An update weighs its sample count times the FedAsync polynomial staleness discount
(:func:`staleness_weight`); a mean over updates gives no update more than
``max_update_share`` of it (:func:`weighted_mean`, via
:func:`~federation_grpc.hub.robust.capped_shares`) or drops the extremes at each
coordinate (:func:`robust_mean`). A tensor no generation held before (the first weights
of a head added by ``tessera hub add-head``) has no prior to mix with: it becomes the
mean of the updates that carry it (:func:`adopt_new`). Pure functions over numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from federation_grpc.hub.parameters import group_of
from federation_grpc.hub.robust import capped_shares, trim_count, trimmed_mean

Tensors = dict[str, np.ndarray]


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedAsync polynomial staleness discount ``(1 + s) ** -a``; ``s`` below 0 counts as 0."""
    return float((1.0 + max(0, staleness)) ** (-exponent))


@dataclass(frozen=True)
class Contribution:
    """One update as aggregation sees it.

    ``tensors`` holds the full tensors of the groups the node trained; ``base`` the
    tensors of the generation it trained from (needed by delta-based strategies).
    """

    tensors: Mapping[str, np.ndarray]
    base: Mapping[str, np.ndarray]
    num_samples: int
    staleness: int

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(group_of(name) for name in self.tensors)


def contribution_weights(carriers: Sequence[Contribution], exponent: float) -> list[float]:
    """Each update's weight in a mean: its sample count (at least 1) times its staleness
    discount (``exponent`` 0: the sample count alone)."""
    return [max(1, c.num_samples) * staleness_weight(c.staleness, exponent) for c in carriers]


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``value`` in ``like``'s dtype, contiguous (a merged tensor keeps its precision)."""
    return np.ascontiguousarray(value.astype(like.dtype, copy=False))


def mix(current: np.ndarray, update: np.ndarray, weight: float) -> np.ndarray:
    """``current + w * (update - current)`` in the tensor's precision.

    Non-floating tensors (counters) take the update's value.
    """
    if not np.issubdtype(current.dtype, np.floating):
        return update.copy()
    out = update.astype(current.dtype, copy=True)
    out -= current
    out *= current.dtype.type(weight)
    out += current
    return out


def weighted_mean(
    arrays: Sequence[np.ndarray], weights: Sequence[float], max_share: float = 1.0
) -> np.ndarray:
    """Weighted mean in float64 (weights need not sum to one; their sum must be positive),
    no array's share above ``max_share`` (:func:`capped_shares`)."""
    shares = capped_shares(weights, max_share)
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for array, share in zip(arrays, shares, strict=True):
        acc += float(share) * array.astype(np.float64)
    return acc


def robust_mean(
    arrays: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    max_share: float = 1.0,
    trim_fraction: float = 0.0,
) -> np.ndarray:
    """The trimmed mean when ``trim_fraction`` drops at least one value at each end,
    otherwise the weighted mean with capped shares."""
    if trim_fraction > 0 and trim_count(len(arrays), trim_fraction) > 0:
        return trimmed_mean(arrays, trim_fraction)
    return weighted_mean(arrays, weights, max_share)


def adopt_new(
    merged: Tensors,
    contributions: Sequence[Contribution],
    exponent: float = 0.5,
    max_share: float = 1.0,
) -> Tensors:
    """Add tensors no generation held before: the mean of the updates carrying them,
    weighted by ``num_samples`` and staleness, none above ``max_share`` (one update: its
    values as they are)."""
    for name in sorted({n for c in contributions for n in c.tensors} - set(merged)):
        carriers = [c for c in contributions if name in c.tensors]
        like = carriers[0].tensors[name]
        mean = weighted_mean(
            [c.tensors[name] for c in carriers],
            contribution_weights(carriers, exponent),
            max_share,
        )
        merged[name] = cast_like(mean, like)
    return merged
