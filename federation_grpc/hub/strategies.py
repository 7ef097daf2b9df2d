"""Aggregation strategies: how pending updates become a candidate generation, behind one
``Strategy`` interface (FedAsync, FedBuff, FedAvg, delta, Dafne; :func:`make_strategy`
builds one by its configured name). Pure functions over numpy arrays.

Tensors merge by parameter group (:mod:`federation_grpc.hub.parameters`): a group
changes only with the updates that carry it, so a head moves only with the nodes that
trained it (partial labels) while the shared groups move with every update. A group
that the current generation does not hold yet takes the mean of the updates that carry
it (:func:`~federation_grpc.hub.contributions.adopt_new`).

Robust weighting (issue 21): no single update may make more than ``max_update_share`` of
a merge (:func:`~federation_grpc.hub.robust.capped_shares`, and the FedAsync mixing
weight is capped the same way); an update's delta may be clipped to a norm (the
aggregator, :func:`~federation_grpc.hub.robust.clip_delta`); FedBuff and FedAvg may take a
coordinate-wise trimmed mean instead of the weighted mean
(:func:`~federation_grpc.hub.contributions.robust_mean`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from federation_grpc.hub.contributions import (
    Contribution,
    Tensors,
    adopt_new,
    cast_like,
    contribution_weights,
    mix,
    robust_mean,
    staleness_weight,
)
from federation_grpc.hub.robust import capped_shares


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
            deltas,
            contribution_weights(carriers, exponent),
            max_share=max_share,
            trim_fraction=trim_fraction,
        )
        merged[name] = cast_like(value.astype(np.float64) + server_lr * step, value)
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
            contribution_weights(carriers, 0.0),
            max_share=max_share,
            trim_fraction=trim_fraction,
        )
        merged[name] = cast_like(mean, value)
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
    sample_halfpoint: float = 1.0
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
            merged[name] = cast_like(now.astype(np.float64) + weight * step, now)
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
    exponent = float(getattr(strategy, "staleness_exponent", 0.0))
    weights = contribution_weights(contributions, exponent)
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
