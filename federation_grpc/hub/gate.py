"""The gate a candidate passes before it becomes a generation. It can say no.

Checks, in order: every tensor finite; the update's distance from its base within a
bound (absolute and relative to the base norm); the candidate's validation score not
below the current generation's minus a margin, scored by an ``Evaluator`` plug-in on the
hub's validation set. Federated evaluation on nodes reaches the same comparison through
``compare_scores`` with the nodes' paired scores, and refuses a candidate that makes any
one site worse by more than the margin (``site_reasons``).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from federation_grpc.hub.parameters import non_finite_tensors, tensors_norm, update_norm

LOGGER = logging.getLogger(__name__)


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model on the hub's validation set; higher is better (e.g. mean Dice).

    Receives the tensors and the generation's JSON config verbatim; it may import what
    it needs (never torch in the hub process unless the operator chooses to).
    """

    def evaluate(self, tensors: Mapping[str, np.ndarray], config_json: str) -> float: ...


def load_evaluator(spec: str) -> Evaluator:
    """Load ``"package.module:attr"``; a class is instantiated without arguments.

    Raises
    ------
    ValueError
        When the spec has no ``:``, or the object has no ``evaluate`` method.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"evaluator must look like 'package.module:attr', got {spec!r}")
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, type):
        target = target()
    if not isinstance(target, Evaluator):
        raise ValueError(f"{spec!r} has no evaluate(tensors, config_json) method")
    return target


@dataclass(frozen=True)
class GatePolicy:
    max_update_norm: float = 0.0
    max_relative_update_norm: float = 1.0
    validation_margin: float = 0.005


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reasons: list[str] = field(default_factory=list)
    candidate_score: float | None = None
    reference_score: float | None = None


def check_update(
    update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], policy: GatePolicy
) -> list[str]:
    """Reasons to refuse one update on its own (empty when it may be merged)."""
    # The base is finite, so a NaN or infinity in the update makes the norm non-finite:
    # the per-tensor scan runs only then (it also names the tensors).
    norm = update_norm(update, base)
    if not math.isfinite(norm):
        bad = non_finite_tensors(update)
        if bad:
            shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            return [f"non-finite values in {len(bad)} tensor(s): {shown}"]
    reasons = []
    if policy.max_update_norm > 0 and norm > policy.max_update_norm:
        reasons.append(f"update norm {norm:.4g} exceeds the bound {policy.max_update_norm:.4g}")
    if policy.max_relative_update_norm > 0:
        base_norm = tensors_norm(base, list(update))
        relative = norm / base_norm if base_norm > 0 else (math.inf if norm > 0 else 0.0)
        if relative > policy.max_relative_update_norm:
            reasons.append(
                f"relative update norm {relative:.4g} exceeds the bound "
                f"{policy.max_relative_update_norm:.4g}"
            )
    return reasons


def compare_scores(candidate: float, reference: float, margin: float) -> list[str]:
    """Reasons to refuse a candidate scoring ``candidate`` against ``reference``."""
    if not math.isfinite(candidate):
        return [f"validation score of the candidate is not finite ({candidate})"]
    if candidate < reference - margin:
        return [
            f"validation score {candidate:.4f} is below the current {reference:.4f} "
            f"minus margin {margin:.4f}"
        ]
    return []


def paired_mean(candidate: Sequence[float], reference: Sequence[float], weights: Sequence[int]):
    """Case-weighted means of paired node scores, for federated evaluation."""
    total = max(1, sum(weights))
    cand = sum(c * w for c, w in zip(candidate, weights, strict=True)) / total
    ref = sum(r * w for r, w in zip(reference, weights, strict=True)) / total
    return float(cand), float(ref)


@dataclass(frozen=True)
class SiteScore:
    """One node's federated evaluation: both generations on its held-out cases."""

    node_id: str
    candidate: float
    reference: float
    num_cases: int


def site_reasons(
    scores: Sequence[SiteScore], margin: float, min_cases: int
) -> tuple[list[str], list[str]]:
    """Per site, beside the paired mean (issue 21): reasons to refuse a candidate that
    lowers any site's held-out score by more than ``margin`` (named, with its figures),
    and notes on sites whose held-out split has fewer than ``min_cases`` cases, reported
    but too small to judge."""
    reasons: list[str] = []
    notes: list[str] = []
    for s in scores:
        drop = s.reference - s.candidate
        figures = (f"site {s.node_id}: {s.reference:.4f} -> {s.candidate:.4f} on "
                   f"{s.num_cases} held-out case(s)")
        if s.num_cases < min_cases:
            notes.append(f"{figures}, too small to judge (fewer than {min_cases})")
        elif not math.isfinite(s.candidate) or drop > margin:
            reasons.append(f"{figures}, a drop of {drop:.4f}, more than the margin {margin:.4f}")
    return reasons, notes


class UpdateGate:
    """Applies a ``GatePolicy``; caches the reference score per generation."""

    def __init__(self, policy: GatePolicy, evaluator: Evaluator | None = None) -> None:
        self.policy = policy
        self.evaluator = evaluator
        self._scores: dict[int, float] = {}

    def check_update(
        self, update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
    ) -> list[str]:
        return check_update(update, base, self.policy)

    def reference_score(
        self, generation: int, tensors: Mapping[str, np.ndarray], config_json: str
    ) -> float | None:
        if self.evaluator is None:
            return None
        if generation not in self._scores:
            self._scores[generation] = float(self.evaluator.evaluate(tensors, config_json))
        return self._scores[generation]

    def check_candidate(
        self,
        candidate: Mapping[str, np.ndarray],
        current_generation: int,
        current: Mapping[str, np.ndarray],
        config_json: str,
    ) -> Verdict:
        bad = non_finite_tensors(candidate)
        if bad:
            return Verdict(False, [f"merged candidate has non-finite values in {bad[:5]}"])
        if self.evaluator is None:
            return Verdict(True)
        reference = self.reference_score(current_generation, current, config_json)
        assert reference is not None
        try:
            score = float(self.evaluator.evaluate(candidate, config_json))
        except Exception as exc:  # a plug-in failure refuses, it must not crash the hub
            LOGGER.exception("evaluator failed on a candidate")
            return Verdict(False, [f"evaluator failed: {exc}"], None, reference)
        reasons = compare_scores(score, reference, self.policy.validation_margin)
        return Verdict(not reasons, reasons, score, reference)

    def remember(self, generation: int, score: float | None) -> None:
        if score is not None:
            self._scores[generation] = score
