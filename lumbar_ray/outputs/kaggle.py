"""The Kaggle submission CSV (``row_id,normal_mild,moderate,severe``) of one model version."""

from __future__ import annotations

import logging
import os
from typing import Iterable

import pandas as pd
import pyarrow as pa

from lumbar_ray import storage
from lumbar_ray.outputs.schema import format_examples
from lumbar_ray.outputs.store import normalised_probabilities, select_scores
from lumbar_ray.targets import PROBABILITY_COLUMNS, TARGET_BY_COLUMN, TARGET_COLUMNS, TARGETS

log = logging.getLogger(__name__)

__all__ = ["KAGGLE_COLUMNS", "export_kaggle"]

KAGGLE_COLUMNS: tuple[str, ...] = ("row_id", *PROBABILITY_COLUMNS)
_PROBS = list(PROBABILITY_COLUMNS)


def export_kaggle(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    to_csv: str | os.PathLike,
    model_version: str | None = None,
    *,
    studies: Iterable[str | int] | None = None,
) -> pd.DataFrame:
    """Write the exact Kaggle submission ``row_id,normal_mild,moderate,severe`` to ``to_csv``
    (local path or URL, written atomically) and return it.

    25 rows per study, sorted by study id (numerically for Kaggle's digit ids) then the targets
    table's order; probabilities renormalised to sum 1. ``studies``: the studies that must be
    there (e.g. from ``test_series_descriptions.csv``); only those are written and any missing one
    is an error. Refused (ValueError): several model versions and no ``model_version``; a study
    with fewer than 25 targets (named); no predictions at all.
    """
    frame = select_scores(scores, model_version)
    if studies is not None:
        wanted = [str(s) for s in studies]
        absent = sorted(set(wanted) - set(frame["study_id"]), key=lambda s: (len(s), s))
        if absent:
            raise ValueError(f"no predictions for {len(absent)} requested studies: {format_examples(absent)}")
        frame = frame[frame["study_id"].isin(set(wanted))]
    if frame.empty:
        raise ValueError("no predictions to export")
    counts = frame.groupby("study_id", sort=False).size()
    short = counts[counts < len(TARGETS)]
    if len(short):
        first = short.index[0]
        lacking = [c for c in TARGET_COLUMNS if c not in set(frame.loc[frame["study_id"] == first, "column"])]
        desc = [f"{s} ({c} of {len(TARGETS)} rows)" for s, c in short.items()]
        raise ValueError(f"incomplete studies: {format_examples(desc, False)}; study {first} lacks {format_examples(lacking)}")
    probs = normalised_probabilities(frame)
    row_ids = [TARGET_BY_COLUMN[c].row_id(s) for s, c in zip(frame["study_id"], frame["column"])]
    submission = pd.DataFrame({"row_id": row_ids})
    for i, name in enumerate(_PROBS):
        submission[name] = probs[:, i]
    text = submission.to_csv(index=False, lineterminator="\n")
    storage.write_bytes(to_csv, text.encode("utf-8"))
    log.info("wrote %d rows (%d studies) to %s", len(submission), len(counts), os.fspath(to_csv))
    return submission
