"""The triage worklist: one row per scored study, the studies that need a radiologist first.

A study's row is derived from its 25 prediction rows (and its error rows) by
:func:`study_worklist`; the scoring run writes it to ``{out}/studies/`` (:data:`STUDIES_SCHEMA`)
in the same part-file flush as the predictions, and :func:`read_worklist` reads it back ordered.

Columns
-------
``priority``
    Expected severity, weighted as the competition metric weights it: the study's expected
    sample weight in each of the metric's four equally weighted terms, averaged. A target's
    expected weight is ``sum_k w_k * p_k`` with ``w = SEVERITY_WEIGHTS`` (1, 2, 4 for
    Normal/Mild, Moderate, Severe) and ``p`` its probabilities rescaled to sum 1; each family's
    term (spinal, foraminal, subarticular) is the mean over its targets; the any_severe_spinal
    term's weight is the worst spinal level's weight (metrics/rsna.py), whose expectation is
    taken with the levels independent (P(worst <= k) = product over levels of P(grade <= k)).
    So priority lies in [1, 4]: 1 when every target is surely Normal/Mild, 4 when every one is
    surely Severe. Why: a Severe finding counts as much as four normal ones and an uncertain
    grade in proportion to its probability, as in the metric; and the spinal canal weighs as
    the metric weighs it (two of four terms), so one sure Severe spinal level (priority 1.9)
    ranks above one sure Severe foraminal level (1.075).
``any_severe_spinal``
    As the metric defines it (``metrics/rsna.py``): the max over the 5 levels of the spinal
    canal stenosis rows' P(severe), as stored.
one column per condition slug (``targets.CONDITIONS``)
    The worst graded class over the levels the detectors found, spelled as in
    ``targets.SEVERITIES`` ("Normal/Mild", "Moderate", "Severe"), or :data:`NOT_FOUND` when no
    level of the condition was found; a level's grade is the argmax of its probabilities (ties
    go to the lower class, as ``metrics.rsna.predicted_class``). Levels not found are left out:
    their rows hold the model's prior weighted as the metric weights it, whose argmax leans to
    Severe by design (right for the log loss, wrong as a finding); they still count in
    ``priority`` and ``any_severe_spinal`` through their probabilities.
``n_severe``, ``n_detected``
    Found targets graded Severe; targets the detectors found (the others carry the model's prior).
``flags``
    The review reasons, ";"-joined: every flag scoring put on the study's rows (``series_missing:
    TYPE``, ``no_detector:TYPE``, ``detect_failed:TYPE``, ``skipped_files:N`` (partly read),
    ``axial_levels_unchecked``, ``axial_level_not_covered:LEVELS``, ``levels_out_of_order:...``,
    ``wrong_side:...``, ``level_interpolated:COLUMN`` (a canal level placed between its found
    neighbours, not found: its row's confidence is 0)), then ``undetected:N`` (targets with no
    detection),
    ``low_confidence:N`` (detected targets whose confidence is below :data:`LOW_CONFIDENCE`) and
    ``errors:N`` (the study's rows in the errors table of the same run; the details are there).
``review``
    Whether there is any flag: a result to check before it is trusted.

Order: priority, then any_severe_spinal, highest first; then study id.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lumbar_ray.dicom.series import id_sort_key
from lumbar_ray.metrics.rsna import ANY_SEVERE, predicted_class
from lumbar_ray.outputs.schema import (
    ERRORS,
    FLAG_SEPARATOR,
    NOT_FOUND,
    PREDICTIONS,
    STUDIES,
    STUDIES_SCHEMA,
    format_examples,
)
from lumbar_ray.outputs.store import in_study_order, read_table
from lumbar_ray.targets import (
    CONDITIONS,
    FAMILIES,
    PROBABILITY_COLUMNS,
    SEVERITIES,
    SEVERITY_WEIGHTS,
    TARGET_COLUMNS,
    TARGETS,
    level_slug,
)

log = logging.getLogger(__name__)

__all__ = [
    "LOW_CONFIDENCE",
    "CONDITION_COLUMNS",
    "WORKLIST_COLUMNS",
    "study_worklist",
    "read_worklist",
    "failed_studies",
    "format_worklist",
    "compact_flags",
]

# Detection confidence below which a found target is flagged for review. 0.25 is Ultralytics'
# default `conf` for predictions: a box below it is one the detector itself would not report.
# (Scoring keeps boxes down to the card's detector.conf, 0.01 by default, so that every target
# gets its best guess; this threshold only decides what a reader is warned about.)
LOW_CONFIDENCE = 0.25

CONDITION_COLUMNS: tuple[str, ...] = tuple(c.slug for c in CONDITIONS)
WORKLIST_COLUMNS: tuple[str, ...] = tuple(STUDIES_SCHEMA.names)
_PROBS = list(PROBABILITY_COLUMNS)
_SEVERE = len(SEVERITIES) - 1
_WEIGHTS = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)
_FAMILY = {t.column: t.family for t in TARGETS}
_REQUIRED = ("study_id", "condition", "level", *_PROBS, "detected", "confidence", "flags")


def _split_flags(values) -> list[str]:
    """The distinct flags of a study's rows, in the order they first appear."""
    seen: dict[str, None] = {}
    for value in values:
        if isinstance(value, str) and value:
            for flag in value.split(FLAG_SEPARATOR):
                if flag:
                    seen.setdefault(flag, None)
    return list(seen)


def _empty_worklist(keys: list[str]) -> pd.DataFrame:
    columns = [c for c in WORKLIST_COLUMNS if c in keys or c not in ("model_version", "run_id", "scored_at")]
    return STUDIES_SCHEMA.empty_table().select(columns).to_pandas()


def study_worklist(predictions: pd.DataFrame, errors: pd.DataFrame | None = None, *,
                   low_confidence: float = LOW_CONFIDENCE) -> pd.DataFrame:
    """One worklist row per study (per model version and run, when the rows carry them) from its
    25 prediction rows, highest priority first (the module doc defines every column).

    ``predictions``: rows as scoring writes them (needs study_id, condition, level, the
    probabilities, detected, confidence, flags; model_version, run_id and scored_at are carried
    over when present). ``errors``: the errors table (or None); a study's rows of the same model
    version and run count as ``errors:N``. Pure: no I/O. ValueError for a study without exactly
    its 25 targets or with probabilities that are not finite, >= 0 and not all 0.
    """
    missing = [c for c in _REQUIRED if c not in predictions.columns]
    if missing:
        raise ValueError(f"study_worklist: predictions lack columns {missing}; columns are {list(predictions.columns)}")
    keys = ["study_id"] + [c for c in ("model_version", "run_id") if c in predictions.columns]
    if len(predictions) == 0:
        return _empty_worklist(keys + (["scored_at"] if "scored_at" in predictions.columns else []))
    frame = predictions.copy()
    frame["study_id"] = frame["study_id"].astype(str)
    frame["column"] = frame["condition"].astype(str) + "_" + frame["level"].astype(str).map(level_slug)
    unknown = sorted(set(frame["column"]) - set(TARGET_COLUMNS))
    if unknown:
        raise ValueError(f"study_worklist: unknown targets {format_examples(unknown)}")
    counts = frame.groupby(keys, sort=False)["column"].agg(["size", "nunique"])
    short = counts[(counts["size"] != len(TARGETS)) | (counts["nunique"] != len(TARGETS))]
    if len(short):
        raise ValueError(f"study_worklist: each study needs its {len(TARGETS)} targets once; not so for "
                         f"{format_examples([k if isinstance(k, str) else k[0] for k in short.index])}")
    probs = frame[_PROBS].to_numpy(dtype=np.float64)
    sums = probs.sum(axis=1)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | ~(sums > 0)
    if bad.any():
        raise ValueError(f"study_worklist: probabilities must be finite, >= 0 and not all 0; bad rows of "
                         f"{format_examples(frame.loc[bad, 'study_id'].unique())}")
    grade = predicted_class(frame)
    detected = frame["detected"].astype(bool).to_numpy()
    confidence = pd.to_numeric(frame["confidence"], errors="coerce").to_numpy(dtype=np.float64)
    family = frame["column"].map(_FAMILY).to_numpy()
    spinal = family == "spinal"
    norm = probs / sums[:, None]
    # P(grade <= k) of each spinal row (1 elsewhere, so that a product over the study's rows is
    # P(worst spinal grade <= k) under independent levels)
    at_most = np.where(spinal[:, None], np.cumsum(norm, axis=1), 1.0)
    work = frame[keys].assign(
        **{f"_weight_{f}": np.where(family == f, norm @ _WEIGHTS, np.nan) for f in FAMILIES},
        **{f"_at_most_{k}": at_most[:, k] for k in range(len(SEVERITIES))},
        _spinal_severe=np.where(spinal, probs[:, _SEVERE], np.nan),
        _severe=(grade == _SEVERE) & detected,
        _detected=detected,
        _undetected=~detected,
        _low=detected & ~(confidence >= low_confidence),  # a detected row without a confidence is low too
        **{f"_grade_{c}": np.where((frame["condition"].to_numpy() == c) & detected, grade, -1) for c in CONDITION_COLUMNS},
    )
    grouped = work.groupby(keys, sort=False)
    out = grouped.agg(
        any_severe_spinal=("_spinal_severe", "max"),
        **{f"_weight_{f}": (f"_weight_{f}", "mean") for f in FAMILIES},
        **{f"_at_most_{k}": (f"_at_most_{k}", "prod") for k in range(len(SEVERITIES))},
        n_severe=("_severe", "sum"), n_detected=("_detected", "sum"),
        n_undetected=("_undetected", "sum"), n_low=("_low", "sum"),
        **{c: (f"_grade_{c}", "max") for c in CONDITION_COLUMNS},
    ).reset_index()
    out.insert(len(keys), "priority", _priority(out))
    out = out.drop(columns=[c for c in out.columns if c.startswith(("_weight_", "_at_most_"))])
    for c in CONDITION_COLUMNS:
        out[c] = [SEVERITIES[int(g)] if g >= 0 else NOT_FOUND for g in out[c]]
    if "scored_at" in frame.columns:
        out = out.merge(frame.groupby(keys, sort=False)["scored_at"].max().reset_index(), on=keys, how="left")
    result = _with_flags(out, frame, errors, keys)
    for count in ("n_severe", "n_detected"):
        result[count] = result[count].astype(np.int64)
    columns = [c for c in WORKLIST_COLUMNS if c in result.columns]
    return by_priority(result[columns])


def _with_flags(per_study: pd.DataFrame, frame: pd.DataFrame, errors: pd.DataFrame | None,
                keys: list[str]) -> pd.DataFrame:
    """``per_study`` with ``flags`` (the rows' flags, then the counted reasons) and ``review``;
    the counts n_undetected and n_low dropped."""
    error_keys, n_errors = _error_counts(errors, keys)
    flags = {_as_key(k): v for k, v in frame.groupby(keys, sort=False)["flags"].agg(_split_flags).items()}
    rows = []
    for record in per_study.to_dict("records"):
        study_flags = list(flags[tuple(record[k] for k in keys)])
        n_error_rows = n_errors.get(tuple(str(record[k]) for k in error_keys), 0)
        for name, count in (("undetected", record.pop("n_undetected")), ("low_confidence", record.pop("n_low")),
                            ("errors", n_error_rows)):
            if count:
                study_flags.append(f"{name}:{int(count)}")
        record["flags"] = FLAG_SEPARATOR.join(study_flags)
        record["review"] = bool(study_flags)
        rows.append(record)
    return pd.DataFrame(rows)


def _priority(per_study: pd.DataFrame) -> np.ndarray:
    """The mean over the metric's four terms of the study's expected sample weight in each (see
    the module doc), from the per-family mean weights and P(worst spinal grade <= k)."""
    at_most = np.stack([per_study[f"_at_most_{k}"].to_numpy(dtype=np.float64) for k in range(len(SEVERITIES))], axis=1)
    worst = np.diff(np.concatenate([np.zeros((len(per_study), 1)), at_most], axis=1), axis=1)  # P(worst = k)
    terms = [per_study[f"_weight_{f}"].to_numpy(dtype=np.float64) for f in FAMILIES] + [worst @ _WEIGHTS]
    return np.mean(np.stack(terms, axis=1), axis=1)


def _as_key(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _error_counts(errors: pd.DataFrame | None, keys: list[str]) -> tuple[list[str], dict[tuple, int]]:
    """(the key columns both tables carry, {their values: number of error rows}): by study,
    model version and run when the errors carry them, else by study alone."""
    if errors is None or len(errors) == 0:
        return ["study_id"], {}
    if "study_id" not in errors.columns:
        raise ValueError(f"study_worklist: errors lack a study_id column; columns are {list(errors.columns)}")
    on = [k for k in keys if k in errors.columns]
    counts = errors[on].astype(str).groupby(on, sort=False).size()
    return on, {_as_key(k): int(n) for k, n in counts.items()}


def by_priority(frame: pd.DataFrame) -> pd.DataFrame:
    """Worklist rows ordered: priority, then any_severe_spinal, highest first; then study id
    (numerically when every id is digits)."""
    if len(frame) == 0:
        return frame.reset_index(drop=True)
    ranked = in_study_order(frame.assign(target_index=0)).drop(columns="target_index")
    ranked = ranked.sort_values(["priority", ANY_SEVERE], ascending=False, kind="stable")
    return ranked.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _latest_runs(out: str | os.PathLike, model_version: str | None) -> pd.DataFrame:
    """(study_id, model_version, run_id) of each study's latest run in the predictions (the rows
    that count, as :func:`lumbar_ray.outputs.store.select_scores` chooses them)."""
    keys = read_table(out, PREDICTIONS, model_version,
                      columns=["study_id", "model_version", "run_id", "scored_at"]).to_pandas()
    versions = sorted(map(str, keys["model_version"].unique()))
    if model_version is not None and not versions:
        present = read_table(out, PREDICTIONS, columns=["model_version"]).column("model_version")
        present = sorted(map(str, pc.unique(present).to_pylist()))
        if present:
            raise ValueError(f"no predictions of model version {model_version!r} in {os.fspath(out)}; "
                             f"versions present: {', '.join(map(repr, present))}")
    if model_version is None and len(versions) > 1:
        raise ValueError(f"{os.fspath(out)} holds predictions of {len(versions)} model versions "
                         f"({', '.join(map(repr, versions))}); pass model_version= to choose one")
    runs = keys.groupby(["study_id", "model_version", "run_id"], sort=False)["scored_at"].max().reset_index()
    latest = runs.sort_values(["scored_at", "run_id"]).drop_duplicates(["study_id", "model_version"], keep="last")
    return latest[["study_id", "model_version", "run_id"]]


def read_worklist(out: str | os.PathLike, model_version: str | None = None) -> pd.DataFrame:
    """The worklist of a scoring output: one row per scored study (:data:`WORKLIST_COLUMNS`),
    highest priority first (:func:`by_priority`).

    Rows come from ``{out}/studies/``; each study's latest run in the predictions is the one that
    counts (a study scored again by a rerun without resume keeps its latest run, as everywhere).
    A study whose run has no studies row (outputs written before the table existed, or a run
    killed between two part files of one flush) gets its row computed from its predictions and
    errors, so no scored study is left off. Several model versions and no ``model_version`` ->
    ValueError listing them. An output without predictions gives an empty frame with the columns.
    """
    latest = _latest_runs(out, model_version)
    if latest.empty:
        return STUDIES_SCHEMA.empty_table().to_pandas()
    stored = read_table(out, STUDIES, model_version).to_pandas()
    have = stored.merge(latest, on=["study_id", "model_version", "run_id"], how="inner")
    have = have.drop_duplicates(["study_id", "model_version", "run_id"], keep="last")
    lacking = latest.merge(have[["study_id", "model_version", "run_id"]], how="left", indicator=True)
    lacking = lacking[lacking["_merge"] == "left_only"].drop(columns="_merge")
    parts = [have[list(WORKLIST_COLUMNS)]] if len(have) else []
    if len(lacking):
        log.info("%s: %d studies have no worklist row; computing theirs from their predictions",
                 os.fspath(out), len(lacking))
        parts.append(_computed_rows(out, lacking)[list(WORKLIST_COLUMNS)])
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return by_priority(frame)


def _computed_rows(out: str | os.PathLike, wanted: pd.DataFrame) -> pd.DataFrame:
    """:func:`study_worklist` of the ``wanted`` (study_id, model_version, run_id) runs."""
    flt = (ds.field("study_id").isin(sorted(set(wanted["study_id"])))
           & ds.field("model_version").isin(sorted(set(wanted["model_version"]))))
    on = ["study_id", "model_version", "run_id"]
    preds = read_table(out, PREDICTIONS).filter(flt).to_pandas().merge(wanted, on=on, how="inner")
    errors = read_table(out, ERRORS).filter(flt).to_pandas().merge(wanted, on=on, how="inner")
    return study_worklist(preds, errors)


def failed_studies(out: str | os.PathLike, model_version: str | None = None) -> list[str]:
    """Studies with error rows but no predictions (of ``model_version`` if given): not on the
    worklist, since nothing was graded; their reasons are in the errors table."""
    errors = read_table(out, ERRORS, model_version, columns=["study_id"])
    scored = read_table(out, PREDICTIONS, model_version, columns=["study_id"])
    failed = set(pc.unique(errors.column("study_id")).to_pylist()) - set(pc.unique(scored.column("study_id")).to_pylist())
    return sorted(failed, key=id_sort_key)


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _initials(text: str) -> str:
    return "".join(word[0] for word in text.replace("/", " ").replace("_", " ").split()).upper()


# Short names for a one-line view, derived from the targets table: spinal_canal_stenosis -> SCS,
# "Normal/Mild" -> N, "Moderate" -> M, "Severe" -> S.
CONDITION_ABBREVIATIONS = {c: _initials(c) for c in CONDITION_COLUMNS}
GRADE_ABBREVIATIONS = {**{s: s[0] for s in SEVERITIES}, NOT_FOUND: "-"}


def compact_flags(flags: str) -> str:
    """Flags for a one-line view: several of one kind shown as ``kind(n)``
    (``wrong_side:a;wrong_side:b`` -> ``wrong_side(2)``); the full list stays in the table."""
    kinds: dict[str, list[str]] = {}
    for flag in _split_flags([flags]):
        kinds.setdefault(flag.split(":", 1)[0], []).append(flag)
    return " ".join(found[0] if len(found) == 1 else f"{kind}({len(found)})" for kind, found in kinds.items())


def format_worklist(frame: pd.DataFrame, top: int | None = None) -> str:
    """The worklist as text, one line per study in the frame's order (``top``: the first N)."""
    if top is not None:
        frame = frame.head(top)
    legend = (f"grades: worst per condition ({', '.join(f'{a}={c}' for c, a in CONDITION_ABBREVIATIONS.items())}); "
              f"{', '.join(f'{a}={s}' for s, a in GRADE_ABBREVIATIONS.items())} (no level found)")
    lines = [legend, f"{'#':>3}  {'study':<12} {'priority':>8} {'severe_sp':>9}  {'grades':<34} {'found':>5}  review"]
    for rank, row in enumerate(frame.itertuples(index=False), start=1):
        row = row._asdict()
        grades = " ".join(f"{a}={GRADE_ABBREVIATIONS.get(row[c], '?')}" for c, a in CONDITION_ABBREVIATIONS.items())
        review = ("REVIEW " + compact_flags(row["flags"])) if row["review"] else "-"
        lines.append(f"{rank:>3}  {row['study_id']:<12} {row['priority']:>8.3f} {row[ANY_SEVERE]:>9.3f}  "
                     f"{grades:<34} {row['n_detected']:>2}/{len(TARGETS)}  {review}")
    return "\n".join(lines)
