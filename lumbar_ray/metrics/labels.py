"""Reading the Kaggle label files into tidy frames (pure pandas, any fsspec path)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lumbar_ray import storage
from lumbar_ray.errors import DataLayoutError
from lumbar_ray.metrics.rsna import long_labels
from lumbar_ray.targets import TARGET_BY_NAME_LEVEL, TARGETS

COORDINATE_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")


LABEL_FILES = ("train.csv", "train_label_coordinates.csv")


class LabelFileError(DataLayoutError, ValueError):
    """A label file is missing, lacks columns or holds values outside the Kaggle spellings."""


def require_label_files(root: str) -> None:
    """Raise LabelFileError unless ``root`` holds the label files that training reads."""
    missing = [name for name in LABEL_FILES if not storage.exists(storage.join(root, name))]
    if missing:
        raise LabelFileError(f"{root} has no {' or '.join(missing)}: training needs the Kaggle layout's labels "
                             f"({', '.join(LABEL_FILES)})")


def read_labels(root: str) -> pd.DataFrame:
    """Long-form labels (study_id, column, label, target_index) from ``{root}/train.csv``;
    label -1 marks a missing label."""
    wide = storage.read_csv(storage.join(root, "train.csv"))
    try:
        long = long_labels(wide)
    except ValueError as exc:
        raise LabelFileError(f"{storage.join(root, 'train.csv')}: {exc}") from exc
    long["study_id"] = long["study_id"].astype(np.int64)
    long["target_index"] = long["column"].map({t.column: t.index for t in TARGETS}).astype(np.int64)
    return long


def read_coordinates(root: str) -> pd.DataFrame:
    """``train_label_coordinates.csv`` with a ``column`` (target) added; unknown rows refused."""
    coords = storage.read_csv(storage.join(root, "train_label_coordinates.csv"))
    missing = [c for c in COORDINATE_COLUMNS if c not in coords.columns]
    if missing:
        raise LabelFileError(f"train_label_coordinates.csv lacks columns {missing}")
    keys = list(zip(coords["condition"], coords["level"]))
    unknown = [k for k in keys if k not in TARGET_BY_NAME_LEVEL]
    if unknown:
        raise LabelFileError(f"train_label_coordinates.csv has unknown condition/level pairs {sorted(set(unknown))[:5]}")
    coords["column"] = [TARGET_BY_NAME_LEVEL[k].column for k in keys]
    coords["target_index"] = [TARGET_BY_NAME_LEVEL[k].index for k in keys]
    for name in ("study_id", "series_id", "instance_number"):
        coords[name] = coords[name].astype(np.int64)
    return coords


def labelled_points(labels: pd.DataFrame, coords: pd.DataFrame) -> pd.DataFrame:
    """One row per target that has both a label (not missing) and a coordinate.

    A target labelled on several instances in the coordinates file (rare in the real data) keeps
    its first row, so each (study, target) trains once.
    """
    have_label = labels[labels["label"] >= 0]
    merged = coords.merge(have_label[["study_id", "column", "label"]], on=["study_id", "column"], how="inner")
    return merged.drop_duplicates(["study_id", "column"]).sort_values(["study_id", "target_index"]).reset_index(drop=True)
