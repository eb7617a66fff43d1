"""Folds split by study, stratified, deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lumbar_ray
from lumbar_ray.training.folds import assign_folds, fold_class_balance, read_folds, write_folds
from lumbar_ray.metrics.rsna import family_of, long_labels
from lumbar_ray.targets import TARGET_COLUMNS

LABELS_CSV = Path(lumbar_ray.__file__).parent / "data" / "rsna2024_train_labels.csv.gz"


@pytest.fixture(scope="module")
def labels() -> pd.DataFrame:
    return pd.read_csv(LABELS_CSV)


@pytest.fixture(scope="module")
def folds(labels) -> pd.DataFrame:
    return assign_folds(labels, k=5, seed=0)


def test_every_study_in_exactly_one_fold(labels, folds):
    assert list(folds.columns) == ["study_id", "fold"]
    assert folds.study_id.is_unique
    assert set(folds.study_id) == set(labels.study_id)
    assert set(folds.fold) == set(range(5))
    # rows of one study never straddle folds
    long = long_labels(labels).merge(folds, on="study_id")
    assert (long.groupby("study_id").fold.nunique() == 1).all()


def test_folds_balanced(labels, folds):
    sizes = np.bincount(folds.fold)
    assert sizes.max() - sizes.min() <= 0.02 * len(folds)
    balance = fold_class_balance(labels, folds)
    long = long_labels(labels)
    long = long[long.label >= 0]
    overall = pd.crosstab(family_of(long.column), long.label, normalize="index")
    for (fold, family), shares in balance.iterrows():
        assert np.abs(shares.to_numpy() - overall.loc[family].to_numpy()).max() < 0.01, (fold, family)


def test_deterministic_and_order_independent(labels, folds):
    again = assign_folds(labels.sample(frac=1.0, random_state=7), k=5, seed=0)
    pd.testing.assert_frame_equal(folds, again)
    other = assign_folds(labels, k=5, seed=1)
    assert not other.fold.equals(folds.fold)


def test_small_frame_with_unlabelled_studies():
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.choice(["Normal/Mild", "Moderate", "Severe"], size=(12, 25)), columns=list(TARGET_COLUMNS))
    wide.insert(0, "study_id", np.arange(100, 112))
    wide.loc[wide.study_id.isin([100, 105]), list(TARGET_COLUMNS)] = np.nan  # no label at all
    folds = assign_folds(wide, k=3, seed=0)
    assert sorted(folds.study_id) == list(range(100, 112))
    assert np.bincount(folds.fold).tolist() == [4, 4, 4]
    with pytest.raises(ValueError):
        assign_folds(wide.head(2), k=3)


def test_write_read_roundtrip(folds, tmp_path):
    for name in ("folds.parquet", "folds.csv"):
        path = str(tmp_path / name)
        write_folds(folds, path)
        pd.testing.assert_frame_equal(read_folds(path), folds)
