"""The Kaggle submission CSV (``row_id,normal_mild,moderate,severe``) of one model version.

A submission is complete or not written: every study that should be in it (each study of the
scores output, in predictions or errors, or the studies asked for) needs its 25 prediction rows
of the chosen model version. A study that failed (only error rows), was never scored, or lacks
targets makes the export refuse, naming the studies, unless the caller asks for those rows to
hold the weighted prior (``fill_prior``; counted in the result and logged).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from lumbar_ray import storage
from lumbar_ray.dicom.series import id_sort_key
from lumbar_ray.errors import EXIT_INCOMPLETE, UserError
from lumbar_ray.metrics.rsna import weighted_prior_from_card
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.outputs.schema import format_examples
from lumbar_ray.outputs.store import in_study_order, normalised_probabilities, read_errors, select_scores
from lumbar_ray.targets import PROBABILITY_COLUMNS, TARGET_BY_COLUMN, TARGET_COLUMNS, TARGETS

log = logging.getLogger(__name__)

__all__ = [
    "KAGGLE_COLUMNS",
    "IncompleteSubmissionError",
    "KaggleExport",
    "export_kaggle",
    "fill_prior_table",
    "write_submission",
]

KAGGLE_COLUMNS: tuple[str, ...] = ("row_id", *PROBABILITY_COLUMNS)
_PROBS = list(PROBABILITY_COLUMNS)
_TARGET_INDEX = {t.column: t.index for t in TARGETS}


class IncompleteSubmissionError(UserError, ValueError):
    """Studies of the submission lack prediction rows of the model version (named in the message)."""

    exit_code = EXIT_INCOMPLETE


@dataclass
class KaggleExport:
    """What :func:`write_submission` wrote."""

    submission: pd.DataFrame  # row_id + the three probabilities, as written
    model_version: str | None
    n_studies: int
    filled_studies: list[str] = field(default_factory=list)  # studies with rows from the prior
    filled_rows: int = 0
    prior_source: str | None = None  # where the filled rows' prior came from


def fill_prior_table(model_version: str | None, registry: str | None = None) -> tuple[pd.DataFrame, str]:
    """(per-target weighted prior, where it came from) for rows that ``--fill-prior`` fills: from
    the model card of ``model_version`` in ``registry`` (its ``priors``, weighted; see
    :func:`lumbar_ray.metrics.rsna.weighted_prior_from_card`), else the scoring path's
    fallback (the uniform prior, weighted: 1/7, 2/7, 4/7)."""
    if registry is None or model_version is None:
        return weighted_prior_from_card(None), "no model card: the uniform prior, weighted"
    manifest = ModelRegistry(registry).manifest(model_version)
    priors = manifest.get("priors")
    if not priors:
        return weighted_prior_from_card(None), f"model card {model_version} stores no priors: the uniform prior, weighted"
    return weighted_prior_from_card(priors), f"the priors of model card {model_version}, weighted"


def _selected_version(frame: pd.DataFrame, model_version: str | None) -> str | None:
    if model_version is not None or "model_version" not in frame.columns or frame.empty:
        return model_version
    versions = frame["model_version"].dropna().unique()
    return str(versions[0]) if len(versions) == 1 else None


def _studies_with_errors(scores, version: str | None) -> set[str]:
    """Studies with error rows of ``version`` in an output root (none for a frame or table)."""
    if not isinstance(scores, (str, os.PathLike)):
        return set()
    errors = read_errors(scores, version)
    return set(errors["study_id"].astype(str))


def _lacking(frame: pd.DataFrame, expected: list[str], failed: set[str]) -> tuple[list[str], list[str], list[str]]:
    """(studies with only error rows, studies with no rows at all, studies with 1-24 rows)."""
    counts = frame.groupby("study_id", sort=False).size()
    present = set(counts.index)
    failed_only = [s for s in expected if s not in present and s in failed]
    unscored = [s for s in expected if s not in present and s not in failed]
    short = [s for s in expected if 0 < counts.get(s, len(TARGETS)) < len(TARGETS)]
    return failed_only, unscored, short


def _incomplete_message(frame: pd.DataFrame, version: str | None, failed_only: list[str], unscored: list[str],
                        short: list[str]) -> str:
    n = len(failed_only) + len(unscored) + len(short)
    parts = []
    if failed_only:
        parts.append(f"only error rows: {format_examples(failed_only)}")
    if unscored:
        parts.append(f"not scored: {format_examples(unscored)}")
    if short:
        counts = frame.groupby("study_id", sort=False).size()
        desc = [f"{s} ({counts[s]} of {len(TARGETS)} rows)" for s in short]
        have = set(frame.loc[frame["study_id"] == short[0], "column"])
        parts.append(f"incomplete studies: {format_examples(desc, False)}; study {short[0]} lacks "
                     f"{format_examples([c for c in TARGET_COLUMNS if c not in have])}")
    of_version = f" of model version {version!r}" if version else ""
    return (f"{n} {'study lacks' if n == 1 else 'studies lack'} their {len(TARGETS)} prediction rows{of_version}: "
            + "; ".join(parts) + "; score them again (--retry-errors for failed ones) or fill their rows with "
            "the weighted prior (--fill-prior)")


def _prior_rows(frame: pd.DataFrame, expected: list[str], prior: pd.DataFrame) -> pd.DataFrame:
    """Rows holding ``prior`` for every (study, target) of ``expected`` that ``frame`` lacks."""
    have = set(zip(frame["study_id"], frame["column"]))
    missing = [(s, c) for s in expected for c in TARGET_COLUMNS if (s, c) not in have]
    rows = pd.DataFrame(missing, columns=["study_id", "column"])
    rows[_PROBS] = prior.loc[rows["column"], _PROBS].to_numpy() if len(rows) else np.zeros((0, len(_PROBS)))
    rows["target_index"] = rows["column"].map(_TARGET_INDEX).astype(np.int64)
    return rows


def _submission(frame: pd.DataFrame) -> pd.DataFrame:
    probs = normalised_probabilities(frame)
    row_ids = [TARGET_BY_COLUMN[c].row_id(s) for s, c in zip(frame["study_id"], frame["column"])]
    submission = pd.DataFrame({"row_id": row_ids})
    for i, name in enumerate(_PROBS):
        submission[name] = probs[:, i]
    return submission


def write_submission(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    to_csv: str | os.PathLike,
    model_version: str | None = None,
    *,
    studies: Iterable[str | int] | None = None,
    fill_prior: bool = False,
    registry: str | None = None,
) -> KaggleExport:
    """Write the exact Kaggle submission ``row_id,normal_mild,moderate,severe`` to ``to_csv``
    (local path or URL, written atomically).

    25 rows per study, sorted by study id (numerically for Kaggle's digit ids) then the targets
    table's order; probabilities renormalised to sum 1. The studies written: ``studies`` when
    given (e.g. every study of the test split; others in the output are left out), else every
    study of the output with predictions or error rows of the model version. Each must have its
    25 rows, else IncompleteSubmissionError naming the studies (only error rows / not scored /
    incomplete), unless ``fill_prior``: the missing rows then hold the weighted prior of
    :func:`fill_prior_table` (``registry``: where the model card is). Also refused (ValueError):
    several model versions and no ``model_version``; no predictions at all.
    """
    frame = select_scores(scores, model_version)
    if frame.empty:
        raise ValueError("no predictions to export")
    version = _selected_version(frame, model_version)
    failed = _studies_with_errors(scores, version)
    if studies is not None:
        expected = list(dict.fromkeys(str(s) for s in studies))
        left_out = (set(frame["study_id"]) | failed) - set(expected)
        if left_out:
            log.warning("leaving out %d studies of the scores that were not asked for: %s", len(left_out),
                        format_examples(sorted(left_out)))
        frame = frame[frame["study_id"].isin(set(expected))]
        if frame.empty:  # a submission of priors only: surely the wrong output or split
            raise IncompleteSubmissionError(f"none of the {len(expected)} studies asked for has predictions "
                                            f"of model version {version!r}: {format_examples(expected)}")
    else:
        expected = sorted(set(frame["study_id"]) | failed, key=id_sort_key)
    failed_only, unscored, short = _lacking(frame, expected, failed)
    filled: list[str] = []
    n_filled, source = 0, None
    if failed_only or unscored or short:
        if not fill_prior:
            raise IncompleteSubmissionError(_incomplete_message(frame, version, failed_only, unscored, short))
        prior, source = fill_prior_table(version, registry)
        extra = _prior_rows(frame, [*failed_only, *unscored, *short], prior)
        filled, n_filled = list(dict.fromkeys(extra["study_id"])), len(extra)
        frame = in_study_order(pd.concat([frame, extra], ignore_index=True))
        log.warning("filled %d rows of %d studies with %s: %s", n_filled, len(filled), source, format_examples(filled))
    submission = _submission(frame)
    storage.write_bytes(to_csv, submission.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    n_studies = int(frame["study_id"].nunique())
    log.info("wrote %d rows (%d studies) to %s", len(submission), n_studies, os.fspath(to_csv))
    return KaggleExport(submission, version, n_studies, filled, n_filled, source)


def export_kaggle(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    to_csv: str | os.PathLike,
    model_version: str | None = None,
    *,
    studies: Iterable[str | int] | None = None,
    fill_prior: bool = False,
    registry: str | None = None,
) -> pd.DataFrame:
    """:func:`write_submission`, returning the submission frame only."""
    return write_submission(scores, to_csv, model_version, studies=studies, fill_prior=fill_prior,
                            registry=registry).submission
