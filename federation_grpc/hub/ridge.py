"""Ridge regression on standardised features, with the ridge strength chosen by
leave-one-out error, and the calibration of a flagging threshold on its predictions: the
linear model behind the hub's quality monitoring (:mod:`federation_grpc.hub.quality`).
numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RidgeFit:
    """Ridge regression on standardised features; ``coef`` is per standard deviation."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float
    r2: float
    loo_r2: float
    loo_predictions: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.intercept + ((np.asarray(x, float) - self.mean) / self.scale) @ self.coef

    @property
    def raw_coef(self) -> np.ndarray:
        """Slopes in the features' own (transformed) units."""
        return self.coef / self.scale


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` for ``y`` (0 when ``y`` is constant)."""
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else 0.0


def fit_ridge(x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = (1.0,)) -> RidgeFit:
    """Fit ``y ~ x`` by ridge on standardised columns; ``alpha`` by leave-one-out error.

    The leave-one-out residuals come in closed form from the hat matrix
    (``e_i / (1 - h_ii)``), so choosing the ridge strength costs one solve per alpha.

    Raises
    ------
    ValueError
        ``x`` is not (n, p) with n == len(y), n < 3, or a value is not finite.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (n, p) and y (n,), got {x.shape} and {y.shape}")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"need at least 3 cases to fit, got {n}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    y0 = y.mean()
    yc = y - y0
    gram = z.T @ z
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for alpha in alphas:
        inverse = np.linalg.pinv(gram + alpha * np.eye(z.shape[1]))
        coef = inverse @ z.T @ yc
        hat = 1.0 / n + np.einsum("ij,jk,ik->i", z, inverse, z)
        fitted = y0 + z @ coef
        loo = y - (y - fitted) / np.maximum(1.0 - hat, 1e-9)
        err = float(((y - loo) ** 2).mean())
        if best is None or err < best[0] - 1e-15:
            best = (err, float(alpha), coef, loo)
    assert best is not None
    _, alpha, coef, loo = best
    fitted = y0 + z @ coef
    return RidgeFit(mean=mean, scale=scale, coef=coef, intercept=float(y0), alpha=alpha,
                    r2=r2_score(y, fitted), loo_r2=r2_score(y, loo), loo_predictions=loo)


def calibrate_threshold(predicted: np.ndarray, truth: np.ndarray, low_dice: float,
                        target_fp_rate: float) -> tuple[float, str]:
    """Threshold on predicted Dice: ``low_dice`` itself (flag what the model predicts to be
    low), lowered when that would flag more than ``target_fp_rate`` of the good training
    cases (true Dice >= ``low_dice``). Never raised above ``low_dice``: a segmentation
    predicted good is not flagged, however slack the false-positive budget. Returns the
    threshold and how it was chosen."""
    good = truth >= low_dice
    if not good.any():
        return low_dice, "no good training cases to calibrate on: threshold = low_dice"
    good_pred = np.sort(predicted[good])
    allowed = math.floor(target_fp_rate * good_pred.size)
    # Flagged means predicted < threshold, so the (allowed+1)-th smallest good prediction
    # is the largest threshold that flags no more than ``allowed`` good cases.
    ceiling = float(good_pred[allowed])
    if ceiling >= low_dice:
        return low_dice, (f"low_dice; it flags <= {target_fp_rate:.0%} of good training "
                          "cases (leave-one-out predictions)")
    return ceiling, (f"lowered from low_dice to flag <= {target_fp_rate:.0%} of good "
                     "training cases (leave-one-out predictions)")
