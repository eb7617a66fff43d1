"""Temperature scaling of DeepScoreNet's probabilities, one temperature per condition, fitted on
out-of-fold predictions against the metric's own loss; and the expected calibration error.

Why: the grader is trained with focal loss, class weights and minority oversampling, none of which
leaves its probabilities calibrated, while the RSNA metric is a severity-weighted log loss. One
temperature per condition rescales the logits ``log p / T`` without changing which class ranks
first; it is fitted to minimise the same weighted log loss (weights 1/2/4 by true class), so it
moves probability towards the classes the metric punishes most for missing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from lumbar_ray.targets import PROBABILITY_COLUMNS, SEVERITY_WEIGHTS, TARGET_BY_COLUMN

__all__ = [
    "TEMPERATURE_BOUNDS",
    "apply_temperature",
    "fit_temperature",
    "fit_temperatures",
    "calibrate_frame",
    "cross_fitted_frame",
    "expected_calibration_error",
]

# log-space bounds of the search: below 0.05 or above 20 a temperature says the grader is broken,
# not miscalibrated; the bound keeps a fit on a handful of rows from running away.
TEMPERATURE_BOUNDS = (0.05, 20.0)
_EPS = 1e-7
PROBS = list(PROBABILITY_COLUMNS)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise; (n, 3) in, (n, 3) out. T = 1 leaves ``probs`` as they are."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    logits = np.log(p) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def _weighted_nll(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(labels)), labels], _EPS, 1.0)
    return float(np.average(-np.log(p), weights=weights))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, weighted: bool = True) -> float:
    """The temperature that minimises the (severity-weighted) log loss of ``probs`` against
    ``labels`` (0/1/2); 1.0 for no rows."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.size == 0:
        return 1.0
    weights = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)[labels] if weighted else np.ones(labels.size)
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(lambda log_t: _weighted_nll(apply_temperature(probs, np.exp(log_t)), labels, weights),
                             bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def _condition_of(columns: pd.Series) -> pd.Series:
    return columns.map(lambda c: TARGET_BY_COLUMN[c].condition.slug)


def fit_temperatures(frame: pd.DataFrame) -> dict[str, float]:
    """{condition slug: temperature} from a long frame of predictions with ``column``, the
    probability columns and ``label`` (rows with label < 0 ignored)."""
    rows = frame[frame["label"] >= 0]
    out = {}
    for condition, part in rows.groupby(_condition_of(rows["column"])):
        out[str(condition)] = fit_temperature(part[PROBS].to_numpy(), part["label"].to_numpy())
    return dict(sorted(out.items()))


def calibrate_frame(frame: pd.DataFrame, temperatures: Mapping[str, float]) -> pd.DataFrame:
    """A copy of a long prediction frame with each row's probabilities scaled by its condition's
    temperature (conditions without one are left as they are)."""
    out = frame.copy()
    out[PROBS] = out[PROBS].astype(np.float64)  # training's out-of-fold frames hold float32
    conditions = _condition_of(out["column"])
    for condition, temperature in temperatures.items():
        mask = (conditions == condition).to_numpy()
        if mask.any():
            out.loc[mask, PROBS] = apply_temperature(out.loc[mask, PROBS].to_numpy(), temperature)
    return out


def cross_fitted_frame(frame: pd.DataFrame, fold_column: str = "fold") -> pd.DataFrame:
    """Each fold's rows calibrated with temperatures fitted on the other folds' rows only: an
    honest out-of-fold estimate of what calibration gains (fitting and scoring on the same rows
    would flatter it). A single fold is returned uncalibrated."""
    folds = sorted(frame[fold_column].unique())
    if len(folds) < 2:
        return frame.copy()
    parts = []
    for fold in folds:
        held = frame[frame[fold_column] == fold]
        parts.append(calibrate_frame(held, fit_temperatures(frame[frame[fold_column] != fold])))
    return pd.concat(parts).loc[frame.index]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """Top-label expected calibration error: rows binned by their highest probability, the
    row-weighted mean of |accuracy - confidence| over the bins. NaN for no rows."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        m = bins == b
        total += m.sum() * abs(correct[m].mean() - confidence[m].mean())
    return float(total / labels.size)
