"""Aggregation: pure functions over numpy arrays, behind one ``Strategy`` interface.

Tensor names follow the node network's convention: ``heads.<head>.…`` belongs to the
group ``heads.<head>``; every other name belongs to the group named by its first dotted
component (``encoder``, ``bottleneck``, …). Groups merge separately: a group changes
only with the updates that carry it, so a head moves only with the nodes that trained it
(partial labels) while the shared groups move with every update.

A group that the current generation does not hold yet (the first weights of a head
added by ``tessera hub add-head``) has no prior to mix with: every strategy takes the
updates that carry it, averaged by sample count and staleness (:func:`adopt_new`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Tensors = dict[str, np.ndarray]

HEADS_PREFIX = "heads."


def group_of(name: str) -> str:
    """Parameter group of a tensor name: ``heads.<head>`` or the first dotted component."""
    parts = name.split(".")
    if parts[0] == "heads" and len(parts) >= 3:
        return f"heads.{parts[1]}"
    return parts[0]


def is_head_group(group: str) -> bool:
    return group.startswith(HEADS_PREFIX)


def groups_of(names: Sequence[str] | Mapping[str, object]) -> dict[str, list[str]]:
    """Map each group to the sorted tensor names in it."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        out.setdefault(group_of(name), []).append(name)
    return out


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedAsync polynomial staleness discount ``(1 + s) ** -a``; ``s`` below 0 counts as 0."""
    return float((1.0 + max(0, staleness)) ** (-exponent))


def sample_weight(num_samples: int, halfpoint: float) -> float:
    """Saturating weight in [0, 1): half at ``halfpoint`` samples, approaching 1 beyond."""
    n = max(0, num_samples)
    return float(n / (n + halfpoint)) if n > 0 else 0.0


def fedasync_mixing(
    num_samples: int, staleness: int, *, alpha: float, halfpoint: float, exponent: float
) -> float:
    """Mixing weight of one update into the current generation (FedAsync)."""
    return alpha * sample_weight(num_samples, halfpoint) * staleness_weight(staleness, exponent)


def _sum_squares(values: np.ndarray) -> float:
    # A dot product in the tensor's own precision is fast (BLAS) and exact enough for a
    # bound; the total is accumulated in Python float (double).
    flat = values.ravel()
    return float(np.dot(flat, flat))


def update_norm(update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - base`` over the floating tensors the update carries."""
    total = 0.0
    for name, value in update.items():
        if np.issubdtype(value.dtype, np.floating):
            total += _sum_squares(value - base[name])
    return math.sqrt(total)


def tensors_norm(tensors: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> float:
    keys = names if names is not None else list(tensors)
    total = 0.0
    for name in keys:
        value = tensors[name]
        if np.issubdtype(value.dtype, np.floating):
            total += _sum_squares(value)
    return math.sqrt(total)


def non_finite_tensors(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Names of floating tensors holding NaN or infinity."""
    return sorted(
        name
        for name, value in tensors.items()
        if np.issubdtype(value.dtype, np.floating) and not bool(np.isfinite(value).all())
    )


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


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean in float64 (weights need not sum to one; their sum must be positive)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for array, weight in zip(arrays, weights, strict=True):
        acc += (weight / total) * array.astype(np.float64)
    return acc


def adopt_new(
    merged: Tensors, contributions: Sequence[Contribution], exponent: float = 0.5
) -> Tensors:
    """Add tensors no generation held before: the mean of the updates carrying them,
    weighted by ``num_samples`` and staleness (one update: its values as they are)."""
    for name in sorted({n for c in contributions for n in c.tensors} - set(merged)):
        carriers = [c for c in contributions if name in c.tensors]
        weights = [max(1, c.num_samples) * staleness_weight(c.staleness, exponent)
                   for c in carriers]
        like = carriers[0].tensors[name]
        merged[name] = _cast_like(weighted_mean([c.tensors[name] for c in carriers], weights),
                                  like)
    return merged


def fedasync_merge(
    current: Mapping[str, np.ndarray],
    contributions: Sequence[Contribution],
    *,
    alpha: float,
    halfpoint: float,
    exponent: float,
) -> Tensors:
    """Fold updates one after another into ``current``, each group only where carried."""
    merged: Tensors = adopt_new(dict(current), contributions, exponent)
    fresh = set(merged) - set(current)
    for contribution in contributions:
        weight = fedasync_mixing(
            contribution.num_samples,
            contribution.staleness,
            alpha=alpha,
            halfpoint=halfpoint,
            exponent=exponent,
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
) -> Tensors:
    """FedBuff: apply the staleness- and sample-weighted mean delta per group.

    Each delta is taken against the update's own base generation; a group's mean uses
    only the updates that carry it.
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
        weights = [
            max(1, c.num_samples) * staleness_weight(c.staleness, exponent) for c in carriers
        ]
        step = weighted_mean(deltas, weights)
        merged[name] = _cast_like(value.astype(np.float64) + server_lr * step, value)
    return adopt_new(merged, contributions, exponent)


def fedavg_merge(
    current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
) -> Tensors:
    """FedAvg: sample-weighted mean of the carried tensors per group; others stay."""
    merged: Tensors = dict(current)
    for name in current:
        carriers = [c for c in contributions if name in c.tensors]
        if not carriers:
            continue
        value = current[name]
        if not np.issubdtype(value.dtype, np.floating):
            merged[name] = carriers[-1].tensors[name].copy()
            continue
        mean = weighted_mean(
            [c.tensors[name] for c in carriers], [max(1, c.num_samples) for c in carriers]
        )
        merged[name] = _cast_like(mean, value)
    return adopt_new(merged, contributions, 0.0)


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
        )


@dataclass(frozen=True)
class FedBuff:
    """Buffer ``buffer_size`` updates, then apply their weighted mean delta."""

    buffer_size: int = 3
    server_lr: float = 1.0
    staleness_exponent: float = 0.5
    name: str = "fedbuff"

    def batch_size(self) -> int:
        return self.buffer_size

    def max_batch(self) -> int:
        return self.buffer_size

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors:
        return fedbuff_merge(
            current, contributions, server_lr=self.server_lr, exponent=self.staleness_exponent
        )


@dataclass(frozen=True)
class FedAvg:
    """Wait for ``round_size`` updates, then take their sample-weighted mean."""

    round_size: int = 3
    name: str = "fedavg"

    def batch_size(self) -> int:
        return self.round_size

    def max_batch(self) -> int:
        return self.round_size

    def merge(
        self, current: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
    ) -> Tensors:
        return fedavg_merge(current, contributions)


def make_strategy(name: str, **options: float | int) -> Strategy:
    """Build a strategy by its configured name (``fedasync``, ``fedbuff``, ``fedavg``)."""
    factories: dict[str, type] = {"fedasync": FedAsync, "fedbuff": FedBuff, "fedavg": FedAvg}
    if name not in factories:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(factories)}")
    strategy: Strategy = factories[name](**options)
    return strategy
