"""Aggregation: pure functions over numpy arrays, behind one ``Strategy`` interface.

Tensors merge by parameter group (:mod:`federation_grpc.hub.parameters`): a group
changes only with the updates that carry it, so a head moves only with the nodes that
trained it (partial labels) while the shared groups move with every update.

A group that the current generation does not hold yet (the first weights of a head
added by ``tessera hub add-head``) has no prior to mix with: every strategy takes the
updates that carry it, averaged by sample count and staleness (:func:`adopt_new`).

Robust weighting (issue 21): no single update may make more than ``max_update_share`` of
a merge (:func:`capped_shares`, and the FedAsync mixing weight is capped the same way);
an update's delta may be clipped to a norm (:func:`clip_delta`); FedBuff and FedAvg may
take a coordinate-wise trimmed mean instead of the weighted mean (:func:`trimmed_mean`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from federation_grpc.hub.parameters import group_of
from federation_grpc.hub.robust import capped_shares, trim_count, trimmed_mean

Tensors = dict[str, np.ndarray]

def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedAsync polynomial staleness discount ``(1 + s) ** -a``; ``s`` below 0 counts as 0."""
    return float((1.0 + max(0, staleness)) ** (-exponent))


def sample_weight(num_samples: int, halfpoint: float) -> float:
    """Saturating weight in [0, 1): half at ``halfpoint`` samples, approaching 1 beyond."""
    n = max(0, num_samples)
    return float(n / (n + halfpoint)) if n > 0 else 0.0


def fedasync_mixing(
    num_samples: int,
    staleness: int,
    *,
    alpha: float,
    halfpoint: float,
    exponent: float,
    max_share: float = 1.0,
) -> float:
    """Mixing weight of one update into the current generation (FedAsync), at most
    ``max_share``: the merged tensor is ``(1 - w) * current + w * update``."""
    weight = alpha * sample_weight(num_samples, halfpoint) * staleness_weight(staleness, exponent)
    return min(weight, max_share)


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


def _cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
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
            [c.tensors[name] for c in carriers], _weights(carriers, exponent), max_share
        )
        merged[name] = _cast_like(mean, like)
    return merged


def _weights(carriers: Sequence[Contribution], exponent: float) -> list[float]:
    return [max(1, c.num_samples) * staleness_weight(c.staleness, exponent) for c in carriers]


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


def fedasync_merge(
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    *,
    alpha: float,
    halfpoint: float,
    exponent: float,
    max_share: float = 1.0,
) -> Tensors:
    """Fold updates one after another into ``current``, each group only where carried,
    each with a mixing weight of at most ``max_share``."""
    merged: Tensors = adopt_new(dict(current), contributions, exponent, max_share)
    fresh = set(merged) - set(current)
    for contribution in contributions:
        weight = fedasync_mixing(
            contribution.num_samples,
            contribution.staleness,
            alpha=alpha,
            halfpoint=halfpoint,
            exponent=exponent,
            max_share=max_share,
        )
        for name, value in contribution.tensors.items():
            if name not in fresh:
                merged[name] = mix(merged[name], value, weight)
    return merged


def fedbuff_merge(
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    *,
    server_lr: float,
    exponent: float,
    max_share: float = 1.0,
    trim_fraction: float = 0.0,
) -> Tensors:
    """FedBuff: apply the staleness- and sample-weighted mean delta per group.

    Each delta is taken against the update's own base generation; a group's mean uses
    only the updates that carry it, none with a share above ``max_share`` (or the
    coordinate-wise trimmed mean, see :func:`robust_mean`).
    """
    merged: Tensors = dict(current)
    for name in current:
        carriers = [c for c in contributions if name in c.tensors]
        if not carriers:
            continue
        value = current[name]
        if not np.issubdtype(value.dtype, np.floating):
            merged[name] = carriers[-1].tensors[name].copy()
            continue
        # An update from before its head existed at the hub: its delta is taken against
        # the current value (it started from the same seeded weights as the first one).
        deltas = [c.tensors[name].astype(np.float64) - c.base.get(name, value)
                  for c in carriers]
        step = robust_mean(
            deltas, _weights(carriers, exponent), max_share=max_share, trim_fraction=trim_fraction
        )
        merged[name] = _cast_like(value.astype(np.float64) + server_lr * step, value)
    return adopt_new(merged, contributions, exponent, max_share)


def fedavg_merge(
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    *,
    max_share: float = 1.0,
    trim_fraction: float = 0.0,
) -> Tensors:
    """FedAvg: sample-weighted mean of the carried tensors per group, none with a share
    above ``max_share`` (or their trimmed mean, see :func:`robust_mean`); others stay."""
    merged: Tensors = dict(current)
    for name in current:
        carriers = [c for c in contributions if name in c.tensors]
        if not carriers:
            continue
        value = current[name]
        if not np.issubdtype(value.dtype, np.floating):
            merged[name] = carriers[-1].tensors[name].copy()
            continue
        mean = robust_mean(
            [c.tensors[name] for c in carriers],
            _weights(carriers, 0.0),
            max_share=max_share,
            trim_fraction=trim_fraction,
        )
        merged[name] = _cast_like(mean, value)
    return adopt_new(merged, contributions, 0.0, max_share)


class Strategy(Protocol):
    """How pending updates become a candidate generation."""

    name: str

    def batch_size(self) -> int:
        """How many pending updates a merge needs (the aggregator waits for that many)."""
        ...

    def max_batch(self) -> int:
        """The most pending updates one merge may consume."""
        ...

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors: ...


@dataclass(frozen=True)
class FedAsync:
    """Merge each update as it arrives, weighted by sample count and staleness."""

    alpha: float = 0.8
    sample_halfpoint: float = 16.0
    staleness_exponent: float = 0.5
    # Under a burst, fold up to this many waiting updates (one after another, each with
    # its own weight) into one generation instead of publishing each intermediate.
    max_pending_fold: int = 32
    # No update's mixing weight above this (1: no cap beyond alpha).
    max_update_share: float = 1.0
    name: str = "fedasync"

    def batch_size(self) -> int:
        return 1

    def max_batch(self) -> int:
        return max(1, self.max_pending_fold)

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors:
        return fedasync_merge(
            current,
            contributions,
            alpha=self.alpha,
            halfpoint=self.sample_halfpoint,
            exponent=self.staleness_exponent,
            max_share=self.max_update_share,
        )


@dataclass(frozen=True)
class FedBuff:
    """Buffer ``buffer_size`` updates, then apply their weighted mean delta."""

    buffer_size: int = 3
    server_lr: float = 1.0
    staleness_exponent: float = 0.5
    max_update_share: float = 1.0
    trim_fraction: float = 0.0
    name: str = "fedbuff"

    def batch_size(self) -> int:
        return self.buffer_size

    def max_batch(self) -> int:
        return self.buffer_size

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors:
        return fedbuff_merge(
            current,
            contributions,
            server_lr=self.server_lr,
            exponent=self.staleness_exponent,
            max_share=self.max_update_share,
            trim_fraction=self.trim_fraction,
        )


@dataclass(frozen=True)
class FedAvg:
    """Wait for ``round_size`` updates, then take their sample-weighted mean."""

    round_size: int = 3
    max_update_share: float = 1.0
    trim_fraction: float = 0.0
    name: str = "fedavg"

    def batch_size(self) -> int:
        return self.round_size

    def max_batch(self) -> int:
        return self.round_size

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors:
        return fedavg_merge(
            current,
            contributions,
            max_share=self.max_update_share,
            trim_fraction=self.trim_fraction,
        )


def delta_merge(
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    *,
    server_lr: float,
    exponent: float,
) -> Tensors:
    """Add each update's delta against its own base to ``current``, one after another,
    scaled by ``server_lr`` and the staleness discount (asynchronous SGD on the hub).

    Unlike :func:`fedasync_merge`, an update trained from an older generation does not
    pull ``current`` back toward that generation: only what it changed moves.
    """
    merged: Tensors = adopt_new(dict(current), contributions, exponent)
    fresh = set(merged) - set(current)
    for contribution in contributions:
        weight = server_lr * staleness_weight(contribution.staleness, exponent)
        for name, value in contribution.tensors.items():
            if name in fresh:
                continue
            now = merged[name]
            if not np.issubdtype(now.dtype, np.floating):
                merged[name] = value.copy()
                continue
            base = contribution.base.get(name, current[name])
            step = value.astype(np.float64) - base.astype(np.float64)
            merged[name] = _cast_like(now.astype(np.float64) + weight * step, now)
    return merged


@dataclass(frozen=True)
class DeltaAsync:
    """Merge each update as it arrives by adding its delta (``server_lr`` x staleness
    discount), not by mixing its full tensors: a site's gain survives the next site's
    update from the same base (see ``benchmarks/federated_learning.py``, issue 21).
    Harm is bounded by ``[aggregation] clip_norm`` and refused by the gate."""

    server_lr: float = 1.0
    staleness_exponent: float = 0.5
    max_pending_fold: int = 32
    name: str = "delta"

    def batch_size(self) -> int:
        return 1

    def max_batch(self) -> int:
        return max(1, self.max_pending_fold)

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors:
        return delta_merge(current, contributions, server_lr=self.server_lr,
                           exponent=self.staleness_exponent)


@dataclass(frozen=True)
class Dafne:
    """Dafne's merge, for comparison: each update on arrival becomes its own generation,
    ``merged = (1 - weight) * current + weight * update`` (Dafne: weight 0.5), whatever
    its sample count or staleness. Dafne accepted any merge scoring above -0.001 Dice:
    pair it with ``[gate] validation_margin = 0.001``."""

    weight: float = 0.5
    name: str = "dafne"

    def batch_size(self) -> int:
        return 1

    def max_batch(self) -> int:
        return 1

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors:
        merged: Tensors = adopt_new(dict(current), contributions)
        fresh = set(merged) - set(current)
        for contribution in contributions:
            for name, value in contribution.tensors.items():
                if name not in fresh:
                    merged[name] = mix(merged[name], value, self.weight)
        return merged


def capped_shares_report(
    strategy: Strategy, contributions: Sequence[Contribution]
) -> list[tuple[float, float]]:
    """For each update, the share of the merge its declared weight asks for and the share
    ``max_update_share`` leaves it, over the whole batch (a group carried by fewer
    updates may differ): FedAsync's mixing weight, FedBuff's and FedAvg's normalised
    weight. For the hub's log: a capped update is named with both figures."""
    cap = float(getattr(strategy, "max_update_share", 1.0))
    if isinstance(strategy, FedAsync):
        asked = [
            fedasync_mixing(c.num_samples, c.staleness, alpha=strategy.alpha,
                            halfpoint=strategy.sample_halfpoint,
                            exponent=strategy.staleness_exponent)
            for c in contributions
        ]
        return [(a, min(a, cap)) for a in asked]
    weights = _weights(contributions, float(getattr(strategy, "staleness_exponent", 0.0)))
    total = sum(weights)
    given = capped_shares(weights, cap)
    return [(w / total, float(g)) for w, g in zip(weights, given, strict=True)]


def make_strategy(name: str, **options: float | int) -> Strategy:
    """Build a strategy by its configured name (``fedasync``, ``fedbuff``, ``fedavg``,
    ``delta``, ``dafne``)."""
    factories: dict[str, type] = {"fedasync": FedAsync, "fedbuff": FedBuff, "fedavg": FedAvg,
                                  "delta": DeltaAsync, "dafne": Dafne}
    if name not in factories:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(factories)}")
    strategy: Strategy = factories[name](**options)
    return strategy
