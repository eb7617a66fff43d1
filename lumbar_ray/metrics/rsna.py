"""Metrics: the RSNA 2024 competition score, classification reports, baselines, tables.

Predictions and labels travel as one *long* frame, the layout of out-of-fold predictions in
Parquet::

    study_id | column (a target column of lumbar_ray.targets) | label (0/1/2, -1 missing)
             | normal_mild | moderate | severe

Raw accuracy is misleading here (always "Normal/Mild" gets 87.8% / 78.0% / 71.4% on spinal /
foraminal / subarticular of the real train.csv), so every table reports the competition's
weighted log losses next to accuracy, balanced accuracy and per-class recall.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from lumbar_ray import storage
from lumbar_ray.targets import (
    FAMILIES,
    PROBABILITY_COLUMNS,
    SEVERITY_TO_ID,
    SEVERITY_WEIGHTS,
    TARGET_BY_COLUMN,
    TARGET_COLUMNS,
)

log = logging.getLogger(__name__)

PROBS = list(PROBABILITY_COLUMNS)
LABEL_COLUMNS = ["study_id", "column", "label"]
PREDICTION_COLUMNS = LABEL_COLUMNS + PROBS
ANY_SEVERE = "any_severe_spinal"
ALL = "all"
EPS = 1e-15
_SEVERE = len(PROBABILITY_COLUMNS) - 1
_FAMILY_OF_COLUMN = {c: TARGET_BY_COLUMN[c].family for c in TARGET_COLUMNS}


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def long_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """Labels as the long frame (study_id, column, label), sorted by study then target order.

    Accepts the wide ``train.csv`` layout (study_id + the 25 target columns holding
    "Normal/Mild"/"Moderate"/"Severe" strings or 0/1/2 ids, NaN/-1 missing) or an already long
    frame (study_id, column, label). Every (study, target) of the wide frame is kept; missing
    labels become -1.
    """
    if {"column", "label"}.issubset(labels.columns):
        out = labels[LABEL_COLUMNS].copy()
    else:
        missing = [c for c in TARGET_COLUMNS if c not in labels.columns]
        if "study_id" not in labels.columns or missing:
            raise ValueError(f"expected study_id and the 25 target columns; missing {missing[:3]}...")
        wide = labels[["study_id", *TARGET_COLUMNS]]
        out = wide.melt(id_vars="study_id", var_name="column", value_name="label")
    out["label"] = _label_ids(out["label"])
    unknown = set(out["column"]) - set(TARGET_COLUMNS)
    if unknown:
        raise ValueError(f"unknown target columns {sorted(unknown)[:3]}")
    order = {c: i for i, c in enumerate(TARGET_COLUMNS)}
    out = out.assign(_o=out["column"].map(order)).sort_values(["study_id", "_o"], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)


def _label_ids(values: pd.Series) -> np.ndarray:
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        unknown = {v for v in values.dropna().unique() if isinstance(v, str) and v not in SEVERITY_TO_ID}
        if unknown:
            raise ValueError(f"unknown severity labels {sorted(unknown)[:3]}; expected {list(SEVERITY_TO_ID)}")
        mapped = values.map(lambda v: SEVERITY_TO_ID[v] if isinstance(v, str) else v)
        values = pd.to_numeric(mapped, errors="raise")
    ids = values.fillna(-1).astype(np.int64).to_numpy()
    if ((ids < -1) | (ids >= len(PROBS))).any():
        raise ValueError(f"labels must be -1 (missing) or 0..{len(PROBS) - 1}")
    return ids


def family_of(columns: pd.Series | Sequence[str]) -> np.ndarray:
    """The metric family ('spinal' | 'foraminal' | 'subarticular') of each target column."""
    return pd.Series(columns).map(_FAMILY_OF_COLUMN).to_numpy()


def _check_predictions(frame: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"prediction frame lacks columns {missing}")
    unknown = set(frame["column"]) - set(TARGET_COLUMNS)
    if unknown:
        raise ValueError(f"unknown target columns {sorted(unknown)[:3]}")
    probs = frame[PROBS].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all():
        raise ValueError("all probabilities must be finite")
    if (probs < 0).any():
        raise ValueError("all probabilities must be >= 0")
    return frame


# --------------------------------------------------------------------------------------------
# The competition metric
# --------------------------------------------------------------------------------------------


def weighted_log_loss(
    labels: np.ndarray, probs: np.ndarray, sample_weight: np.ndarray | None = None, eps: float = EPS
) -> float:
    """Sample-weighted multi-class log loss as scikit-learn computed it for the competition:
    probabilities clipped to [eps, 1 - eps], then each row renormalised to sum 1, then
    ``sum(w * -log p[label]) / sum(w)``. NaN for no rows."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return float("nan")
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(labels.size), labels])
    return float(np.average(loss, weights=sample_weight))


def binary_log_loss(
    y: np.ndarray, p: np.ndarray, sample_weight: np.ndarray | None = None, eps: float = EPS
) -> float:
    """Sample-weighted binary log loss, p = P(y = 1) clipped to [eps, 1 - eps]. NaN for no rows.
    Unlike scikit-learn this also works when ``y`` holds one class only."""
    y = np.asarray(y, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.average(loss, weights=sample_weight))


@dataclass(frozen=True)
class RsnaScore:
    spinal: float
    foraminal: float
    subarticular: float
    any_severe_spinal: float
    score: float  # mean of the terms above that are defined (all four on a full frame)
    n_rows: int  # labelled rows scored
    n_studies_any_severe: int

    def terms(self) -> dict[str, float]:
        return {f: getattr(self, f) for f in (*FAMILIES, ANY_SEVERE)}

    def as_dict(self) -> dict:
        return asdict(self)


def rsna_score(frame: pd.DataFrame, eps: float = EPS) -> RsnaScore:
    """The RSNA 2024 Lumbar Spine competition metric on a long prediction frame.

    Reference: the host's scoring code ("rsna-lumbar-metric", kaggle.com/code/metric/
    rsna-lumbar-metric-71549), reconstructed and checked against copies of it::

        for condition in ['spinal', 'foraminal', 'subarticular']:
            loss = sklearn.metrics.log_loss(y_true=one-hot labels, y_pred=submission probs,
                                            sample_weight=solution['sample_weight'])  # 1/2/4
        any_severe_spinal_labels  = solution[spinal].groupby('study_id')['severe'].max()
        any_severe_spinal_weights = solution[spinal].groupby('study_id')['sample_weight'].max()
        any_severe_spinal_preds   = submission[spinal].groupby('study_id')['severe'].max()
        any_severe_loss = sklearn.metrics.log_loss(labels, preds, sample_weight=weights)
        score = np.average([spinal, foraminal, subarticular, any_severe], weights=[1, 1, 1, 1])

    Semantics mirrored here:

    * family terms: ``weighted_log_loss`` with weights ``SEVERITY_WEIGHTS[label]``; sklearn of
      that time clipped to [1e-15, 1 - 1e-15] and then renormalised every row.
    * ``any_severe_spinal``: per study, label = any spinal level Severe; prediction = max over
      the study's spinal rows of the *raw* ``severe`` column (not renormalised, as in the host
      code); weight = max of the rows' sample weights, so 4 if any level is Severe, **2 if the
      worst level is Moderate**, 1 otherwise (the host code's weighting; not a plain 4-vs-1).
    * Missing labels (-1): the competition's solution has no rows for unlabelled targets, so
      they are dropped *before* anything else. For ``any_severe_spinal`` a study's label,
      prediction and weight therefore use only its labelled spinal levels (the prediction of an
      unlabelled level does not count), and a study with no labelled spinal level is left out.
    * A term with no rows is NaN and the score is the mean of the defined terms (a frame with
      only one family scores that family); on a full frame all four count equally.
    """
    frame = _check_predictions(frame)
    labelled = frame[frame["label"].to_numpy() >= 0]
    labels = labelled["label"].to_numpy(dtype=np.int64)
    if labels.size and labels.max() >= len(PROBS):
        raise ValueError(f"labels must be -1 or 0..{len(PROBS) - 1}")
    probs = labelled[PROBS].to_numpy(dtype=np.float64)
    weights = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)[labels]
    families = family_of(labelled["column"])
    terms: dict[str, float] = {}
    for fam in FAMILIES:
        m = families == fam
        terms[fam] = weighted_log_loss(labels[m], probs[m], weights[m], eps)
    spinal = families == "spinal"
    per_study = pd.DataFrame(
        {
            "study_id": labelled["study_id"].to_numpy()[spinal],
            "y": labels[spinal] == _SEVERE,
            "w": weights[spinal],
            "p": probs[spinal, _SEVERE],
        }
    ).groupby("study_id", sort=True).agg(y=("y", "max"), w=("w", "max"), p=("p", "max"))
    terms[ANY_SEVERE] = binary_log_loss(per_study["y"], per_study["p"], per_study["w"], eps)
    defined = [v for v in terms.values() if not np.isnan(v)]
    score = float(np.mean(defined)) if defined else float("nan")
    return RsnaScore(**terms, score=score, n_rows=int(labels.size), n_studies_any_severe=len(per_study))


def rsna_score_arrays(
    study_ids: Sequence, columns: Sequence[str], labels: Sequence[int], probs: np.ndarray, eps: float = EPS
) -> RsnaScore:
    """:func:`rsna_score` from parallel arrays (probs is (N, 3))."""
    return rsna_score(prediction_frame(study_ids, columns, labels, probs), eps)


def prediction_frame(study_ids: Sequence, columns: Sequence[str], labels: Sequence[int], probs: np.ndarray) -> pd.DataFrame:
    """Build the long prediction frame from parallel arrays."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(PROBS))
    frame = pd.DataFrame({"study_id": list(study_ids), "column": list(columns), "label": np.asarray(labels, dtype=np.int64)})
    frame[PROBS] = probs
    return frame


# --------------------------------------------------------------------------------------------
# Classification reports
# --------------------------------------------------------------------------------------------


def _groups(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    labelled = frame["label"].to_numpy() >= 0
    families = family_of(frame["column"])
    groups = {fam: labelled & (families == fam) for fam in FAMILIES}
    groups[ALL] = labelled
    return groups


def predicted_class(frame: pd.DataFrame) -> np.ndarray:
    """Argmax class id of each row's probabilities (ties go to the lower class)."""
    return frame[PROBS].to_numpy(dtype=np.float64).argmax(axis=1)


def confusion_matrices(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """{family | 'all': 3x3 counts}, rows = true class, columns = predicted (argmax); labelled
    rows only."""
    from sklearn.metrics import confusion_matrix  # heavy (~1 s); only the classification reports need it

    pred = predicted_class(frame)
    y = frame["label"].to_numpy(dtype=np.int64)
    ids = list(range(len(PROBS)))
    return {g: confusion_matrix(y[m], pred[m], labels=ids) for g, m in _groups(frame).items()}


def classification_report_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per group (spinal, foraminal, subarticular, all) of the labelled rows:
    n, accuracy, balanced_accuracy (mean recall over the classes present), macro_f1, and per
    class ``precision_/recall_/f1_/support_{normal_mild,moderate,severe}`` (argmax
    predictions; precision of a never-predicted class is 0)."""
    from sklearn.metrics import precision_recall_fscore_support  # heavy (~1 s); only the reports need it

    _check_predictions(frame)
    pred = predicted_class(frame)
    y = frame["label"].to_numpy(dtype=np.int64)
    ids = list(range(len(PROBS)))
    rows = []
    for group, m in _groups(frame).items():
        row: dict = {"group": group, "n": int(m.sum())}
        if m.sum() == 0:
            rows.append(row)
            continue
        precision, recall, f1, support = precision_recall_fscore_support(
            y[m], pred[m], labels=ids, zero_division=0
        )
        present = support > 0
        row["accuracy"] = float((y[m] == pred[m]).mean())
        row["balanced_accuracy"] = float(recall[present].mean())
        row["macro_f1"] = float(f1[present].mean())
        for i, name in enumerate(PROBS):
            row[f"precision_{name}"] = float(precision[i])
            row[f"recall_{name}"] = float(recall[i])
            row[f"f1_{name}"] = float(f1[i])
            row[f"support_{name}"] = int(support[i])
        rows.append(row)
    return pd.DataFrame(rows)


def plot_confusion_matrices(frame_or_matrices: pd.DataFrame | Mapping[str, np.ndarray], out_png: str, title: str | None = None) -> str:
    """One panel per group: counts and row-normalised recall; written as PNG to ``out_png``
    (local path or fsspec URL). Uses matplotlib's Agg canvas without touching pyplot state."""
    # heavy: matplotlib, for this one figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrices = (
        confusion_matrices(frame_or_matrices)
        if isinstance(frame_or_matrices, pd.DataFrame)
        else dict(frame_or_matrices)
    )
    n = len(matrices)
    fig = Figure(figsize=(3.6 * n, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    short = ["N/M", "Mod", "Sev"]
    for i, (group, cm) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, n, i + 1)
        cm = np.asarray(cm)
        rows = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for r in range(cm.shape[0]):
            for c in range(cm.shape[1]):
                ax.text(c, r, f"{cm[r, c]}\n{norm[r, c]:.0%}", ha="center", va="center",
                        color="white" if norm[r, c] > 0.5 else "black", fontsize=8)
        ax.set_xticks(range(len(short)), short)
        ax.set_yticks(range(len(short)), short)
        ax.set_xlabel("predicted")
        if i == 0:
            ax.set_ylabel("true")
        ax.set_title(group)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(out_png, buf.getvalue())
    return out_png


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def _class_counts_per_target(train_labels: pd.DataFrame) -> pd.DataFrame:
    long = long_labels(train_labels)
    long = long[long["label"] >= 0]
    counts = pd.crosstab(long["column"], long["label"]).reindex(
        index=list(TARGET_COLUMNS), columns=range(len(PROBS)), fill_value=0
    )
    counts.columns = PROBS
    return counts.fillna(0)


def majority_baseline(train_labels: pd.DataFrame, alpha: float = 0.01) -> pd.DataFrame:
    """Per target, the training majority class (Normal/Mild for every target of the real
    labels; Normal/Mild where a target has no labels), as a smoothed one-hot vector:
    ``(1 - alpha) * onehot + alpha / 3`` = [0.99333, 0.00333, 0.00333] for alpha = 0.01.

    Smoothing keeps the log loss finite and meaningful: a hard [1, 0, 0] would pay
    -log(1e-15) = 34.5 on every Moderate/Severe row, which measures the clipping constant, not
    the baseline. Returns a frame indexed by target column with the three probability columns.
    """
    counts = _class_counts_per_target(train_labels).to_numpy()
    onehot = np.eye(len(PROBS))[counts.argmax(axis=1)]
    probs = (1 - alpha) * onehot + alpha / len(PROBS)
    return pd.DataFrame(probs, index=pd.Index(TARGET_COLUMNS, name="column"), columns=PROBS)


def prior_baseline(train_labels: pd.DataFrame, pseudo_count: float = 1.0, weighted: bool = False) -> pd.DataFrame:
    """Per target, the class frequencies of the training labels with ``pseudo_count`` added to
    every class (Laplace smoothing, so no class gets probability 0) — the same vector for every
    study. That is the best constant predictor of the *unweighted* log loss.

    ``weighted=True`` gives the best constant for the competition's *weighted* family terms
    instead: probabilities proportional to ``SEVERITY_WEIGHTS[c] * count_c`` (minimising
    ``sum_c w_c n_c * -log p_c`` subject to ``sum p = 1``)."""
    counts = _class_counts_per_target(train_labels).to_numpy(dtype=np.float64) + pseudo_count
    if weighted:
        counts = counts * np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)
    probs = counts / counts.sum(axis=1, keepdims=True)
    return pd.DataFrame(probs, index=pd.Index(TARGET_COLUMNS, name="column"), columns=PROBS)


def weighted_prior_baseline(train_labels: pd.DataFrame, pseudo_count: float = 1.0) -> pd.DataFrame:
    """:func:`prior_baseline` with ``weighted=True``."""
    return prior_baseline(train_labels, pseudo_count, weighted=True)


# What the scoring path gives a target its model card has no prior for (scoring.study.study_rows).
UNIFORM_PRIOR: tuple[float, ...] = tuple(1.0 / len(PROBS) for _ in PROBS)
# ... and that prior weighted by the severity weights, (1/7, 2/7, 4/7): what a target gets when the
# card has no prior for it (weighted_prior_from_card of an empty card, per target).
WEIGHTED_UNIFORM_PRIOR: tuple[float, ...] = tuple(float(w) / sum(SEVERITY_WEIGHTS) for w in SEVERITY_WEIGHTS)


def weighted_prior_from_card(priors: Mapping[str, Sequence[float]] | None) -> pd.DataFrame:
    """Per target, the weighted prior derived from a model card's ``priors`` (the card stores
    :func:`prior_baseline` of its training labels): probabilities proportional to
    ``SEVERITY_WEIGHTS * prior``. With the card's pseudo-count of 1 that equals
    :func:`weighted_prior_baseline` of the same labels exactly (both are proportional to
    ``w_c * (n_c + 1)``). A target without a prior (or no card at all) gets the scoring path's
    fallback, :data:`UNIFORM_PRIOR`, weighted alike: (1/7, 2/7, 4/7)."""
    priors = priors or {}
    rows = np.array([priors.get(c, UNIFORM_PRIOR) for c in TARGET_COLUMNS], dtype=np.float64)
    if rows.shape != (len(TARGET_COLUMNS), len(PROBS)) or not np.isfinite(rows).all() or (rows < 0).any():
        raise ValueError(f"priors must hold {len(PROBS)} finite probabilities >= 0 per target")
    weighted = rows * np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)
    sums = weighted.sum(axis=1, keepdims=True)
    if not (sums > 0).all():
        raise ValueError("priors must not be all 0 for a target")
    return pd.DataFrame(weighted / sums, index=pd.Index(TARGET_COLUMNS, name="column"), columns=PROBS)


def baseline_predictions(table: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """A long prediction frame for every (study, target) of ``labels``, probabilities from a
    per-target ``table`` (:func:`majority_baseline` / :func:`prior_baseline`)."""
    long = long_labels(labels)
    return long.join(table[PROBS], on="column")


BASELINES = {"majority": majority_baseline, "prior": prior_baseline, "weighted_prior": weighted_prior_baseline}


def baseline_oof_predictions(labels: pd.DataFrame, folds: pd.DataFrame, kind: str = "prior") -> pd.DataFrame:
    """Out-of-fold baseline predictions: for each fold, the baseline is fitted on the other
    folds' labels and predicts that fold's studies. ``folds`` is (study_id, fold) from
    :func:`lumbar_ray.training.folds.assign_folds`; the result has an extra ``fold`` column. ``kind``:
    'majority', 'prior' or 'weighted_prior' (see :data:`BASELINES`)."""
    if kind not in BASELINES:
        raise KeyError(f"unknown baseline {kind!r}; expected one of {sorted(BASELINES)}")
    fit = BASELINES[kind]
    long = long_labels(labels).merge(folds[["study_id", "fold"]], on="study_id", how="inner")
    parts = []
    for fold in sorted(long["fold"].unique()):
        table = fit(long[long["fold"] != fold])
        part = long[long["fold"] == fold]
        parts.append(part.join(table[PROBS], on="column"))
    return pd.concat(parts, ignore_index=True)[PREDICTION_COLUMNS + ["fold"]]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = [
    "model", "group", "n", "rsna_log_loss", "accuracy", "balanced_accuracy", "macro_f1",
    "recall_normal_mild", "recall_moderate", "recall_severe",
]


def metric_table(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One tidy frame comparing models and baselines on the same labelled rows.

    Rows: model x group, groups = spinal, foraminal, subarticular, any_severe_spinal, all.
    ``rsna_log_loss`` is the competition term of the group (for 'all' the final score; for
    any_severe_spinal its n counts studies and the classification columns are NaN); the other
    columns come from :func:`classification_report_frame` (argmax predictions).
    """
    rows = []
    for model, frame in predictions.items():
        score = rsna_score(frame)
        report = classification_report_frame(frame).set_index("group")
        terms = score.terms()
        for group in (*FAMILIES, ANY_SEVERE, ALL):
            row: dict = {"model": model, "group": group}
            if group == ANY_SEVERE:
                row.update(n=score.n_studies_any_severe, rsna_log_loss=terms[ANY_SEVERE])
            else:
                r = report.loc[group]
                row.update({c: r.get(c, np.nan) for c in TABLE_COLUMNS[4:]})
                row["n"] = int(r["n"])
                row["rsna_log_loss"] = score.score if group == ALL else terms[group]
            rows.append(row)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["n"] = table["n"].astype(np.int64)
    return table


def format_metric_table(table: pd.DataFrame, digits: int = 4) -> str:
    """The metric table as aligned plain text (NaN shown as '-')."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="-")
