"""Quality monitoring at the hub: a linear model of Dice from per-segmentation metrics.

Nodes report two kinds of metric records (numbers only, never images or UIDs):

- ``segmentation``: the cheap metrics of one AI segmentation (label volumes, entropy,
  confidence, components, slice-to-slice consistency, ...), with ``segmentation_seq``,
  a per-node counter that means nothing outside that node;
- ``correction``: the same metrics of the segmentation a radiologist corrected, plus
  ``dice.<label>`` of the AI result against the correction.

The hub fits ridge regression of the mean correction Dice on standardised metrics over
every node's corrections, picks a threshold on the predicted Dice (``low_dice``,
lowered if the leave-one-out predictions say it would flag more than ``target_fp_rate``
of good training cases), then flags segmentations whose predicted Dice falls below it, per
node and generation. Drift compares each node and generation with the training cases:
the drop of the mean predicted Dice and the mean feature shift in training standard
deviations. The ridge fit and the threshold calibration are in
:mod:`federation_grpc.hub.ridge`. numpy only; the hub never imports torch.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select

from federation_grpc.hub.domain import CORRECTION_RECORD, SEGMENTATION_RECORD, MetricRecord
from federation_grpc.hub.ridge import RidgeFit, calibrate_threshold, fit_ridge
from federation_grpc.hub.store import HubStore, MetricRow

LOGGER = logging.getLogger(__name__)

SEGMENTATION = SEGMENTATION_RECORD
CORRECTION = CORRECTION_RECORD
KNOWN_KINDS = (SEGMENTATION, CORRECTION)
SEQ_KEY = "segmentation_seq"
# Keys that describe the record, not the segmentation: never features.
NOT_FEATURES = frozenset({SEQ_KEY, "local_version"})
# Counts and volumes span orders of magnitude: a linear model sees them as log1p.
LOG_PREFIXES = ("volume_ml.", "components.", "foreground_ml")
# Values that must be fractions (Dice, confidences, entropies normalised to [0, 1]).
UNIT_PREFIXES = ("dice.", "confidence.", "uncertain_fraction", "entropy.", "mean_entropy",
                 "slice_consistency.")
# No metric a node computes comes near this: larger means broken or hostile.
MAX_ABS_VALUE = 1e7
MAX_LISTED = 50


@dataclass(frozen=True)
class QualityPolicy:
    """How the hub turns metrics into flags and drift alerts."""

    low_dice: float = 0.8           # a segmentation below this Dice is low quality
    target_fp_rate: float = 0.1     # of good training cases, at most this many flagged
    min_cases: int = 10             # corrections with metrics needed to fit the model
    min_feature_coverage: float = 0.9  # a feature must be in this share of training cases
    alphas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    drift_dice_drop: float = 0.05   # mean predicted Dice this far below the reference
    drift_shift_sd: float = 1.0     # or mean |feature shift| this many training SDs
    min_group: int = 3              # segmentations a node/generation needs for drift

    def __post_init__(self) -> None:
        if not 0.0 < self.low_dice < 1.0:
            raise ValueError(f"low_dice must be in (0, 1), got {self.low_dice}")
        if not 0.0 <= self.target_fp_rate < 1.0:
            raise ValueError(f"target_fp_rate must be in [0, 1), got {self.target_fp_rate}")
        if self.min_cases < 3:
            raise ValueError(f"min_cases must be >= 3, got {self.min_cases}")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ValueError("alphas must be positive ridge strengths")


def transform(key: str, value: float) -> float:
    return math.log1p(max(value, 0.0)) if key.startswith(LOG_PREFIXES) else value


# --- records ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    node_id: str
    kind: str
    generation: int
    values: dict[str, float]
    row_id: int = 0

    @property
    def seq(self) -> int | None:
        v = self.values.get(SEQ_KEY)
        ok = isinstance(v, int | float) and math.isfinite(v) and abs(v) < 2**53
        return int(v) if ok else None  # type: ignore[arg-type]

    @property
    def dice(self) -> float | None:
        d = [v for k, v in self.values.items() if k.startswith("dice.")]
        return float(np.mean(d)) if d else None


def problem(kind: str, values: dict[str, float]) -> str | None:
    """Why a record cannot be used by the quality model, or None."""
    if kind not in KNOWN_KINDS:
        return f"unknown kind {kind[:40]!r}"
    for key, value in values.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"{key}: not a finite number"
        if abs(value) > MAX_ABS_VALUE:
            return f"{key}: |value| > {MAX_ABS_VALUE:g}"
        if key.startswith(UNIT_PREFIXES) and not -1e-6 <= value <= 1.0 + 1e-6:
            return f"{key}: {value:g} outside [0, 1]"
        if key.startswith(LOG_PREFIXES) and value < 0:
            return f"{key}: negative"
    if kind == CORRECTION and not any(k.startswith("dice.") for k in values):
        return "correction without dice"
    return None


def load_cases(store: HubStore) -> list[Case]:
    """Every metric record the hub holds, oldest first."""
    with store.session() as s:
        return [Case(r.node_id, r.kind, int(r.generation), dict(r.values), int(r.id))
                for r in s.scalars(select(MetricRow).order_by(MetricRow.id))]


def cases_from_records(records: Iterable[tuple[str, MetricRecord]]) -> list[Case]:
    return [Case(node, r.kind, int(r.generation), dict(r.values), i)
            for i, (node, r) in enumerate(records, start=1)]


# --- the report -------------------------------------------------------------------------

@dataclass
class QualityModel:
    features: list[str]
    fit: RidgeFit
    threshold: float
    threshold_rule: str
    n: int

    def matrix(self, cases: Sequence[Case]) -> tuple[np.ndarray, np.ndarray]:
        """Transformed features (missing ones imputed with the training mean) and the
        share of features each case lacked."""
        x = np.empty((len(cases), len(self.features)))
        missing = np.zeros(len(cases))
        for i, case in enumerate(cases):
            for j, key in enumerate(self.features):
                if key in case.values:
                    x[i, j] = transform(key, case.values[key])
                else:
                    x[i, j] = self.fit.mean[j]
                    missing[i] += 1
        return x, missing / max(len(self.features), 1)

    def predict(self, cases: Sequence[Case]) -> np.ndarray:
        return np.clip(self.fit.predict(self.matrix(cases)[0]), 0.0, 1.0)

    def shift(self, cases: Sequence[Case]) -> np.ndarray:
        """Mean z-score of each feature over ``cases``, against the training cases."""
        z = (self.matrix(cases)[0] - self.fit.mean) / self.fit.scale
        return z.mean(axis=0)


@dataclass
class QualityReport:
    policy: dict[str, Any]
    model: dict[str, Any]
    records: dict[str, int]
    ignored: dict[str, Any]
    groups: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dedup(cases: Sequence[Case]) -> list[Case]:
    """A node may resend a batch after a crash: keep the last record per (node, kind, seq)."""
    last: dict[tuple[str, str, int], int] = {}
    for i, c in enumerate(cases):
        if c.seq is not None:
            last[(c.node_id, c.kind, c.seq)] = i
    return [c for i, c in enumerate(cases)
            if c.seq is None or last[(c.node_id, c.kind, c.seq)] == i]


def fit_model(train: Sequence[Case], policy: QualityPolicy) -> tuple[QualityModel | None, str]:
    """Fit on corrections with metrics; ``(None, why)`` when that is not possible."""
    if len(train) < policy.min_cases:
        return None, (f"{len(train)} corrections with segmentation metrics; the quality model "
                      f"needs at least {policy.min_cases}")
    counts = Counter(k for c in train for k in c.values
                     if not k.startswith("dice.") and k not in NOT_FEATURES)
    features = sorted(k for k, n in counts.items()
                      if n >= policy.min_feature_coverage * len(train))
    if not features:
        return None, "the corrections share no metrics to fit on"
    y = np.array([c.dice for c in train], float)
    x = np.array([[transform(k, c.values[k]) if k in c.values else np.nan for k in features]
                  for c in train])
    col_mean = np.nanmean(x, axis=0)
    x = np.where(np.isnan(x), col_mean, x)
    keep = x.std(axis=0) > 1e-12
    if not keep.any():
        return None, "every metric is constant over the corrections"
    features = [f for f, k in zip(features, keep, strict=True) if k]
    fit = fit_ridge(x[:, keep], y, policy.alphas)
    threshold, rule = calibrate_threshold(np.clip(fit.loo_predictions, 0, 1), y,
                                          policy.low_dice, policy.target_fp_rate)
    return QualityModel(features, fit, threshold, rule, len(train)), "fitted"


def assess(cases: Sequence[Case], policy: QualityPolicy | None = None) -> QualityReport:
    """Fit the model on the corrections and flag and score every segmentation."""
    policy = policy or QualityPolicy()
    ignored_reasons: Counter[str] = Counter()
    ignored_examples: list[dict[str, Any]] = []
    usable: list[Case] = []
    for case in _dedup(cases):
        why = problem(case.kind, case.values)
        if why is None:
            usable.append(case)
            continue
        ignored_reasons[why.split(":")[0] if ":" in why else why] += 1
        if len(ignored_examples) < MAX_LISTED:
            ignored_examples.append({"node": case.node_id, "kind": case.kind[:40],
                                     "generation": case.generation, "reason": why})
    segs = [c for c in usable if c.kind == SEGMENTATION]
    corrections = [c for c in usable if c.kind == CORRECTION]
    train = [c for c in corrections
             if any(not k.startswith("dice.") and k not in NOT_FEATURES for k in c.values)]
    unlinked = len(corrections) - len(train)
    model, message = fit_model(train, policy)
    report = QualityReport(
        policy=asdict(policy),
        model={"status": "fitted" if model else "insufficient", "message": message},
        records={"segmentation": len(segs), "correction": len(corrections),
                 "correction_without_metrics": unlinked,
                 "ignored": sum(ignored_reasons.values())},
        ignored={"reasons": dict(ignored_reasons), "examples": ignored_examples},
    )
    if model is not None:
        y = np.array([c.dice for c in train])
        loo = np.clip(model.fit.loo_predictions, 0, 1)
        low = y < policy.low_dice
        flagged = loo < model.threshold
        report.model.update({
            "n": model.n, "r2": model.fit.r2, "loo_r2": model.fit.loo_r2,
            "alpha": model.fit.alpha, "intercept": model.fit.intercept,
            "threshold": model.threshold, "threshold_rule": model.threshold_rule,
            "training_low": int(low.sum()),
            "training_recall": float(flagged[low].mean()) if low.any() else None,
            "training_fp_rate": float(flagged[~low].mean()) if (~low).any() else None,
            "coefficients": {f: float(c) for f, c in zip(model.features, model.fit.coef,
                                                          strict=True)},
        })
    report.groups, report.flagged, report.drift = _per_group(segs, corrections, model, policy)
    return report


def _per_group(segs: Sequence[Case], corrections: Sequence[Case], model: QualityModel | None,
               policy: QualityPolicy
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per (node, generation), the flagged segmentations (lowest predicted Dice
    first) and the drift of each group with enough segmentations."""
    by_group: dict[tuple[str, int], list[Case]] = defaultdict(list)
    corr_by_group: dict[tuple[str, int], list[Case]] = defaultdict(list)
    for c in segs:
        by_group[(c.node_id, c.generation)].append(c)
    for c in corrections:
        corr_by_group[(c.node_id, c.generation)].append(c)
    reference = None
    if model is not None:
        reference = float(np.clip(model.fit.intercept, 0, 1))  # mean training Dice
    groups: list[dict[str, Any]] = []
    flagged_rows: list[dict[str, Any]] = []
    drift: list[dict[str, Any]] = []
    for key in sorted(set(by_group) | set(corr_by_group)):
        node, generation = key
        members, corr = by_group.get(key, []), corr_by_group.get(key, [])
        row = _group_row(node, generation, members, corr, policy)
        if model is not None and members:
            pred = model.predict(members)
            is_flagged = pred < model.threshold
            row.update({"flagged": int(is_flagged.sum()),
                        "flag_rate": float(is_flagged.mean()),
                        "mean_predicted_dice": float(pred.mean())})
            for case, p, f in zip(members, pred, is_flagged, strict=True):
                if f:
                    flagged_rows.append({"node": node, "generation": generation,
                                         "segmentation_seq": case.seq, "predicted_dice": float(p)})
            if len(members) >= policy.min_group and reference is not None:
                drift.append(_drift_row(node, generation, members, pred, model, reference,
                                        policy))
        groups.append(row)
    flagged_rows.sort(key=lambda r: r["predicted_dice"])
    return groups, flagged_rows[:MAX_LISTED], drift


def _group_row(node: str, generation: int, members: Sequence[Case], corr: Sequence[Case],
               policy: QualityPolicy) -> dict[str, Any]:
    """A (node, generation) group's counts and known Dice; the model's figures unset."""
    dices = [c.dice for c in corr if c.dice is not None]
    return {
        "node": node, "generation": generation, "segmentations": len(members),
        "corrections": len(corr),
        "mean_dice": float(np.mean(dices)) if dices else None,
        "known_low": sum(d < policy.low_dice for d in dices),
        "flagged": None, "flag_rate": None, "mean_predicted_dice": None,
    }


def _drift_row(node: str, generation: int, members: Sequence[Case], pred: np.ndarray,
               model: QualityModel, reference: float, policy: QualityPolicy
               ) -> dict[str, Any]:
    """How far a group's predicted Dice and metrics moved from the training cases."""
    shift = model.shift(members)
    order = np.argsort(-np.abs(shift))[:3]
    mean_shift = float(np.abs(shift).mean())
    drop = reference - float(pred.mean())
    reasons = []
    if drop > policy.drift_dice_drop:
        reasons.append(f"mean predicted Dice {pred.mean():.3f} is {drop:.3f} below "
                       f"the training mean {reference:.3f}")
    if mean_shift > policy.drift_shift_sd:
        reasons.append(f"metrics moved {mean_shift:.2f} training SDs on average")
    return {
        "node": node, "generation": generation, "segmentations": len(members),
        "mean_predicted_dice": float(pred.mean()), "reference_dice": reference,
        "dice_drop": drop, "mean_abs_shift_sd": mean_shift,
        "top_shifts": {model.features[j]: float(shift[j]) for j in order},
        "drifting": bool(reasons), "reasons": reasons,
    }


def report_for_store(store: HubStore, policy: QualityPolicy | None = None) -> dict[str, Any]:
    return assess(load_cases(store), policy).as_dict()
