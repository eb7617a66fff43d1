"""Severity vectors for synthetic studies: rows of the real RSNA 2024 ``train.csv`` (the embedded
copy by default), missing labels included."""

from __future__ import annotations

from importlib import resources

import fsspec
import numpy as np
import pandas as pd

from lumbar_ray.targets import SEVERITIES, SEVERITY_TO_ID, TARGET_COLUMNS

__all__ = ["LABELS_RESOURCE", "load_label_table", "sample_label_vectors", "severity_ids_of"]

LABELS_RESOURCE = "rsna2024_train_labels.csv.gz"  # in lumbar_ray/data (package data)


def load_label_table(labels_csv: str | None = None) -> pd.DataFrame:
    """The real RSNA 2024 ``train.csv`` (study_id + 25 severity columns, NaN where missing)."""
    if labels_csv is None:
        with resources.files("lumbar_ray").joinpath("data", LABELS_RESOURCE).open("rb") as f:
            df = pd.read_csv(f, compression="gzip")
    else:
        with fsspec.open(labels_csv, "rb", compression="infer") as f:
            df = pd.read_csv(f)
    missing = [c for c in ("study_id", *TARGET_COLUMNS) if c not in df.columns]
    if missing:
        raise ValueError(f"labels table lacks columns {missing}")
    df = df[["study_id", *TARGET_COLUMNS]].copy()
    bad = set(pd.unique(df[list(TARGET_COLUMNS)].stack().dropna())) - set(SEVERITIES)
    if bad:
        raise ValueError(f"unknown severity values {sorted(bad)}")
    return df


def sample_label_vectors(n: int, seed: int, labels_csv: str | None = None) -> pd.DataFrame:
    """``n`` severity vectors of real studies (rows of ``train.csv``), each real study used once
    per pass through the table. Prefix-stable: the first k of ``n`` are the vectors for ``n=k``.
    Columns: ``source_study_id`` + the 25 target columns (strings, NaN = missing)."""
    table = load_label_table(labels_csv)
    rows: list[int] = []
    p = 0
    while len(rows) < n:
        rows.extend(np.random.default_rng([int(seed), 0x1ABE1, p]).permutation(len(table)).tolist())
        p += 1
    out = table.iloc[rows[:n]].reset_index(drop=True).rename(columns={"study_id": "source_study_id"})
    return out


def severity_ids_of(row: pd.Series) -> np.ndarray:
    """(25,) severity ids of one row of a labels table, -1 where the label is missing."""
    return np.array([SEVERITY_TO_ID[row[c]] if isinstance(row[c], str) else -1 for c in TARGET_COLUMNS], dtype=int)
