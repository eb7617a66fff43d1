"""Cross-validation folds split by *study*.

The source paper split rows, so one patient's other levels sat in both training and validation
(DESIGN.md "Known flaws"). Here every study lands in exactly one fold, and folds are balanced
on the severity distribution of each metric family.

Method: scikit-learn's ``StratifiedGroupKFold`` on the long label frame, groups = study_id and
stratum = (family, severity) — 9 strata — so every fold gets a similar share of Moderate and
Severe rows per family. Studies with no label at all are dealt round-robin. Deterministic for a
given (labels, k, seed): input row order does not matter.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lumbar_ray.metrics.rsna import family_of, long_labels
from lumbar_ray.targets import FAMILIES, PROBABILITY_COLUMNS

log = logging.getLogger(__name__)

FOLD_COLUMNS = ["study_id", "fold"]


def assign_folds(labels_df: pd.DataFrame, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """``DataFrame(study_id, fold)``, one row per study, folds 0..k-1, sorted by study_id.

    ``labels_df`` is the wide ``train.csv`` layout or the long (study_id, column, label) frame
    (see :func:`lumbar_ray.metrics.rsna.long_labels`).
    """
    if k < 2:
        raise ValueError("k must be >= 2")
    long = long_labels(labels_df)
    studies = np.sort(long["study_id"].unique())
    if len(studies) < k:
        raise ValueError(f"{len(studies)} studies cannot fill {k} folds")
    # A canonical row order, so the result does not depend on the input's order.
    long = long.sort_values(["study_id", "column"], kind="stable").reset_index(drop=True)
    labelled = long[long["label"] >= 0]
    family_index = {f: i for i, f in enumerate(FAMILIES)}
    strata = (
        pd.Series(family_of(labelled["column"])).map(family_index).to_numpy() * len(PROBABILITY_COLUMNS)
        + labelled["label"].to_numpy()
    )
    fold_of: dict = {}
    labelled_studies = labelled["study_id"].unique()
    if len(labelled_studies) >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        groups = labelled["study_id"].to_numpy()
        for fold, (_, test_idx) in enumerate(splitter.split(np.zeros(len(strata)), strata, groups)):
            for sid in np.unique(groups[test_idx]):
                fold_of[sid] = fold
    rest = [s for s in studies if s not in fold_of]
    if rest:
        rng = np.random.default_rng(seed)
        counts = np.bincount(np.asarray(list(fold_of.values()), dtype=np.int64), minlength=k)
        for sid in rng.permutation(np.asarray(rest, dtype=object)):
            fold = int(np.argmin(counts))  # fill the smallest fold first
            fold_of[sid] = fold
            counts[fold] += 1
    out = pd.DataFrame({"study_id": studies, "fold": [fold_of[s] for s in studies]})
    out["fold"] = out["fold"].astype(np.int64)
    log.debug("assigned %d studies to %d folds: %s", len(out), k, np.bincount(out["fold"], minlength=k))
    return out


def fold_class_balance(labels_df: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Share of each severity per (fold, family) of the labelled rows — for checking balance."""
    long = long_labels(labels_df)
    long = long[long["label"] >= 0].merge(folds[FOLD_COLUMNS], on="study_id")
    long["family"] = family_of(long["column"])
    table = pd.crosstab([long["fold"], long["family"]], long["label"], normalize="index")
    table = table.reindex(columns=range(len(PROBABILITY_COLUMNS)), fill_value=0.0)
    table.columns = list(PROBABILITY_COLUMNS)
    return table


def write_folds(folds: pd.DataFrame, path: str) -> str:
    """Write (study_id, fold) to Parquet, or CSV when the path ends in .csv; local paths and
    fsspec URLs (``s3://…``) alike."""
    frame = folds[FOLD_COLUMNS]
    if str(path).endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def read_folds(path: str) -> pd.DataFrame:
    """Read what :func:`write_folds` wrote."""
    frame = pd.read_csv(path) if str(path).endswith(".csv") else pd.read_parquet(path)
    missing = [c for c in FOLD_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a folds table, missing {missing}")
    frame = frame[FOLD_COLUMNS].copy()
    frame["fold"] = frame["fold"].astype(np.int64)
    return frame
