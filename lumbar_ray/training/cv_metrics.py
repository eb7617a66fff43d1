"""Out-of-fold metrics of a cross-validated run: DeepScoreNet end to end (the headline: at the
detectors' finds, :mod:`.end_to_end`) and at the labelled points (a diagnostic), each against the
baselines on the same rows; the detectors' hit rates; the calibration that ships; and which fold
of each model validated best."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.config import SCORER
from lumbar_ray.metrics.calibration import (
    calibrate_frame, expected_calibration_error, fit_temperatures,
)
from lumbar_ray.metrics.rsna import (
    ALL, baseline_oof_predictions, format_metric_table, metric_table, plot_confusion_matrices, rsna_score,
)
from lumbar_ray.storage import filesystem_for
from lumbar_ray.targets import PROBABILITY_COLUMNS, TARGET_BY_COLUMN
from lumbar_ray.training.artifacts import OOF_FILE, fold_dir, fold_name
from lumbar_ray.training.end_to_end import EndToEndOof

PROBS = list(PROBABILITY_COLUMNS)
# The model rows of the scorer's tables. END_TO_END is the headline: what scoring gives a study
# (detectors -> crops at their detections -> DeepScoreNet, the weighted prior where nothing was
# found). AT_LABELLED_POINTS grades crops cut at the labelled points, which scoring never has: a
# diagnostic of the grader alone, and it overstates what a user gets.
END_TO_END = "deepscorenet_end_to_end"
AT_LABELLED_POINTS = "deepscorenet_at_labelled_points"
CALIBRATED = "_calibrated"
BASELINE_KINDS = ("majority", "prior", "weighted_prior")
# evaluated_on: which rows a table row is scored on
ON_END_TO_END = "end_to_end"  # every labelled target of the validation studies
ON_LABELLED_POINTS = "labelled_points"  # the labelled points the scorer's crops were cut at


# Labelled rows a condition needs before a temperature is fitted on them. Why: on a handful of rows
# the fit runs to a bound of TEMPERATURE_BOUNDS (a tiny CV's 7 rows gave T = 20 and 0.05), and such a
# temperature, shipped, makes every score of that condition worse; with too few rows none ships (T = 1).
MIN_CALIBRATION_ROWS = 30


def _fit_enough(frame: pd.DataFrame) -> dict[str, float]:
    """:func:`fit_temperatures` of the conditions with at least MIN_CALIBRATION_ROWS labelled rows."""
    labelled = frame[frame["label"] >= 0]
    conditions = labelled["column"].map(lambda c: TARGET_BY_COLUMN[c].condition.slug)
    counts = conditions.value_counts()
    enough = set(counts[counts >= MIN_CALIBRATION_ROWS].index)
    return fit_temperatures(labelled[conditions.isin(enough)]) if enough else {}


def shipped_temperatures(labelled_points: pd.DataFrame, end_to_end: pd.DataFrame | None = None,
                         fold: int | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """({condition: temperature}, {condition: which predictions it was fitted on}). Fitted on the
    end-to-end predictions at the detections (``detected`` rows: the rows scoring applies the
    temperatures to; the fallback rows are never scaled), since a crop at a detection is off the
    labelled point and the grader is calibrated differently there; a condition with too few such
    rows falls back to the fit at the labelled points, and one with too few of those too gets none
    (:data:`MIN_CALIBRATION_ROWS`). ``fold``: only that fold's rows, i.e. the predictions of the
    one model that ships (without a final fit), never another fold's model's."""
    if fold is not None:
        labelled_points = _in_fold(labelled_points, fold)
        end_to_end = _in_fold(end_to_end, fold) if end_to_end is not None else None
    temperatures = _fit_enough(labelled_points) if len(labelled_points) else {}
    fitted_on = {c: ON_LABELLED_POINTS for c in temperatures}
    if end_to_end is not None and len(end_to_end):
        found = _fit_enough(end_to_end[end_to_end["detected"].astype(bool)])
        temperatures.update(found)
        fitted_on.update({c: ON_END_TO_END for c in found})
    return dict(sorted(temperatures.items())), dict(sorted(fitted_on.items()))


def _in_fold(frame: pd.DataFrame, fold: int) -> pd.DataFrame:
    return frame[frame["fold"] == fold] if len(frame) and "fold" in frame else frame.iloc[0:0]


def _half_of_each_fold(frame: pd.DataFrame) -> pd.Series:
    """0 or 1 per row: each fold's studies, in id order, alternately in one half or the other."""
    half = pd.Series(0, index=frame.index, dtype=np.int64)
    for _, part in frame.groupby("fold"):
        studies = sorted(part["study_id"].unique())
        which = {s: i % 2 for i, s in enumerate(studies)}
        half.loc[part.index] = part["study_id"].map(which).to_numpy()
    return half


def _within_fold_calibrated(frame: pd.DataFrame, fit: Callable[[pd.Series], dict[str, float]],
                            scaled: pd.Series) -> pd.DataFrame:
    """``frame`` with the ``scaled`` rows of each half of each fold calibrated with ``fit(rows of
    the other half of that fold)``: temperatures of the fold's own model, fitted on studies other
    than the ones they are scored on."""
    out = frame.copy()
    out[PROBS] = out[PROBS].astype(np.float64)
    half = _half_of_each_fold(frame)
    for fold in sorted(frame["fold"].unique()):
        for h in (0, 1):
            rows = scaled & (frame["fold"] == fold) & (half == h)
            if rows.any():
                temps = fit((frame["fold"] == fold) & (half != h))
                out.loc[rows, PROBS] = calibrate_frame(frame[rows], temps)[PROBS].to_numpy()
    return out


def cross_fitted_end_to_end(end_to_end: pd.DataFrame, labelled_points: pd.DataFrame) -> pd.DataFrame:
    """The end-to-end frame calibrated as scoring would be, honestly: each fold's model is
    calibrated with its own temperatures (:func:`shipped_temperatures` of its own fold), and
    each half of the fold's validation studies is scaled by the fit on the other half, never on
    its own labels. The fallback rows are left as they are, as scoring leaves them.

    Why within the fold: each fold is a different model, and their temperatures differ (on 200
    studies spinal stenosis wanted 0.40 on one fold and 1.49 on the other): one fold's
    temperature applied to another fold's model made the score worse than none."""
    def fit(rows: pd.Series) -> dict[str, float]:
        studies = set(end_to_end.loc[rows, "study_id"].astype(str))  # one half of one fold
        points = (labelled_points[labelled_points["study_id"].astype(str).isin(studies)]
                  if len(labelled_points) else labelled_points)
        return shipped_temperatures(points, end_to_end[rows])[0]

    return _within_fold_calibrated(end_to_end, fit, end_to_end["detected"].astype(bool))


def cross_fitted_at_points(labelled_points: pd.DataFrame) -> pd.DataFrame:
    """The labelled-point frame calibrated honestly, as :func:`cross_fitted_end_to_end` does:
    each half of a fold's studies scaled by the temperatures fitted on the other half of that
    fold (what a run without detectors ships)."""
    if not len(labelled_points):
        return labelled_points.copy()
    return _within_fold_calibrated(labelled_points, lambda rows: shipped_temperatures(labelled_points[rows])[0],
                                   pd.Series(True, index=labelled_points.index))


def comparison_frames(name: str, frame: pd.DataFrame, calibrated: pd.DataFrame, labels: pd.DataFrame,
                      folds_frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``name`` uncalibrated and calibrated, and the baselines (fitted on the training folds
    only) on exactly ``frame``'s (study, target) rows."""
    keys = frame[["study_id", "column"]]
    frames = {name: frame, name + CALIBRATED: calibrated}
    for kind in BASELINE_KINDS:
        base = baseline_oof_predictions(labels[["study_id", "column", "label"]], folds_frame, kind=kind)
        frames[f"baseline_{kind}"] = base.merge(keys, on=["study_id", "column"], how="inner")
    return frames


def scorer_metrics(oof: pd.DataFrame, labels: pd.DataFrame, folds_frame: pd.DataFrame,
                   end_to_end: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Overall and per-fold tables, ``evaluated_on`` saying on which rows: first end to end
    (when given: every labelled target of the validation studies, scored as scoring does), then
    at the labelled points (the scorer's own OOF file, a diagnostic). Each: DeepScoreNet
    uncalibrated and calibrated (each fold's model with its own temperatures, each half of its
    studies scaled by the fit on the other half),
    against the majority, prior and weighted-prior baselines on the same rows."""
    sets = []
    if end_to_end is not None and len(end_to_end):
        sets.append((ON_END_TO_END, comparison_frames(END_TO_END, end_to_end, cross_fitted_end_to_end(end_to_end, oof),
                                                      labels, folds_frame)))
    if len(oof):
        sets.append((ON_LABELLED_POINTS, comparison_frames(AT_LABELLED_POINTS, oof, cross_fitted_at_points(oof), labels,
                                                           folds_frame)))
    tables, per_fold = [], []
    for rows, frames in sets:
        tables.append(metric_table(frames).assign(evaluated_on=rows))
        for name, frame in frames.items():
            for fold, part in frame.groupby("fold"):
                score = rsna_score(part)
                per_fold.append({"model": name, "evaluated_on": rows, "fold": int(fold), "rsna_score": score.score,
                                 **score.terms(), "n_rows": score.n_rows})
    if not tables:
        return pd.DataFrame(), pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    table = table[["model", "evaluated_on", *[c for c in table.columns if c not in ("model", "evaluated_on")]]]
    return table, pd.DataFrame(per_fold)


def headline_line(table: pd.DataFrame, end_to_end_skipped: str | None = None) -> str:
    """One line naming the run's headline figure (end to end, out of fold) before the labelled-point
    diagnostic, from a :func:`scorer_metrics` table; ``end_to_end_skipped``: why there is no
    end-to-end figure, when there is none."""
    if table.empty or "evaluated_on" not in table:
        return "out-of-fold RSNA score: none (the run trained no DeepScoreNet)"
    score = table[table["group"] == ALL].set_index("model")["rsna_log_loss"]
    diagnostic = (f"DeepScoreNet at the labelled points (diagnostic, not what scoring gives): "
                  f"{score[AT_LABELLED_POINTS]:.4f}" if AT_LABELLED_POINTS in score else "")
    if END_TO_END not in score:
        why = end_to_end_skipped or "needs the detectors and DeepScoreNet in one run"
        return "; ".join(filter(None, [f"out-of-fold RSNA score end to end: not computed ({why})", diagnostic]))
    return "; ".join(filter(None, [
        f"HEADLINE out-of-fold RSNA score end to end (detectors -> crops at their detections -> DeepScoreNet -> "
        f"calibration): {score[END_TO_END + CALIBRATED]:.4f} (uncalibrated {score[END_TO_END]:.4f}; lower is "
        f"better)", diagnostic]))


def detector_metrics(records: pd.DataFrame) -> pd.DataFrame:
    """Share of labelled targets found on the right instance within 5 mm and 10 mm, per detector
    (job), per fold and overall."""
    if records.empty:
        return pd.DataFrame()
    rec = records.copy()
    for col, default in (("right_slice", False), ("dist_mm", np.nan)):
        if col not in rec:
            rec[col] = default
    rec["right_slice"] = rec["right_slice"].fillna(False).astype(bool)
    rec["hit_5mm"] = rec["right_slice"] & (rec["dist_mm"] <= 5.0)
    rec["hit_10mm"] = rec["right_slice"] & (rec["dist_mm"] <= 10.0)
    # Records written before dist_3d_mm existed have no 3-D column: NaN, not a miss.
    has_3d = "dist_3d_mm" in rec
    rows = []
    for (job, fold), part in list(rec.groupby(["job", "fold"])) + [((j, "all"), p) for j, p in rec.groupby("job")]:
        row = {"detector": job, "fold": str(fold), "n_targets": len(part), "detected": part["detected"].mean(),
               "right_instance": part["right_slice"].mean(), "within_5mm": part["hit_5mm"].mean(),
               "within_10mm": part["hit_10mm"].mean()}
        for tol in (5.0, 10.0):
            row[f"within_{tol:g}mm_3d"] = (part["dist_3d_mm"] <= tol).mean() if has_3d else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def best_folds(det_table: pd.DataFrame, scorer_per_fold: pd.DataFrame, fold_ids: Sequence[int]) -> dict[str, int]:
    """Without a final all-studies fit, which fold's model each job ships: the one that
    validated best on its own held-out fold — detectors by the share of targets on the right
    instance within 5 mm, DeepScoreNet by the RSNA score (lower is better); ties and missing
    metrics go to the lowest fold. Why: a fold model can collapse on a small training set (a
    detector can find nothing on one fold), and shipping fold 0 regardless would score every
    study with it."""
    chosen: dict[str, int] = {}
    if not det_table.empty:
        rows = det_table[det_table["fold"] != "all"]
        for job, part in rows.groupby("detector"):
            rate = {int(f): float(v) for f, v in zip(part["fold"], part["within_5mm"]) if pd.notna(v)}
            chosen[job] = max(fold_ids, key=lambda f: (rate.get(f, -1.0), -f))
    if not scorer_per_fold.empty:
        chosen[SCORER] = best_scorer_fold(scorer_per_fold, fold_ids)
    return chosen


def best_scorer_fold(scorer_per_fold: pd.DataFrame, fold_ids: Sequence[int]) -> int:
    """DeepScoreNet's part of :func:`best_folds`: the fold graded best at the labelled points
    (its own fold, graded alone: its end-to-end score mixes in the detectors' folds)."""
    part = scorer_per_fold[scorer_per_fold["model"] == AT_LABELLED_POINTS] if len(scorer_per_fold) else scorer_per_fold
    score = {int(f): float(v) for f, v in zip(part["fold"], part["rsna_score"]) if pd.notna(v)} if len(part) else {}
    return min(fold_ids, key=lambda f: (score.get(f, math.inf), f))


# ---------------------------------------------------------------------------------------------
# Collecting a run's metrics from its artefacts
# ---------------------------------------------------------------------------------------------


@dataclass
class CvMetrics:
    """A run's out-of-fold metrics, the files they were written to and their report text."""

    scorer_table: pd.DataFrame = field(default_factory=pd.DataFrame)  # overall, against the baselines
    scorer_per_fold: pd.DataFrame = field(default_factory=pd.DataFrame)
    detector_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: dict[str, Path] = field(default_factory=dict)  # registry file name -> local file
    report_lines: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)  # the model card's "metrics"


def read_fold_parquets(directories: list[str], name: str) -> pd.DataFrame:
    """The parquet file ``name`` of every folder that has one, concatenated."""
    frames = []
    for directory in directories:
        fs, path = filesystem_for(f"{directory}/{name}")
        if fs.exists(path):
            with fs.open(path, "rb") as handle:
                frames.append(pd.read_parquet(handle))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collect_cv_metrics(jobs: list[str], labels: pd.DataFrame, folds_frame: pd.DataFrame, artifacts: str,
                       out_dir: Path, version: str, end_to_end: EndToEndOof | None = None,
                       final_fit: bool = True) -> CvMetrics:
    """Read every job's out-of-fold predictions from the CV folds' artefacts, score them with the
    end-to-end out-of-fold predictions (``end_to_end``, :func:`.end_to_end.end_to_end_oof`), and
    write predictions, tables and plots to ``out_dir``. ``final_fit``: whether the version ships
    the all-studies fit (else each model's best fold, whose own predictions calibrate it)."""
    fold_ids = sorted(folds_frame["fold"].unique().tolist())
    cv_dirs = lambda job: [fold_dir(artifacts, job, f) for f in fold_ids]  # noqa: E731
    metrics = CvMetrics(report_lines=[f"lumbar-ray training run {version}", ""])
    if SCORER in jobs:
        _add_scorer_metrics(metrics, read_fold_parquets(cv_dirs(SCORER), OOF_FILE),
                            end_to_end or EndToEndOof(skipped="not run"), labels, folds_frame, out_dir, version,
                            final_fit)
    det_jobs = [j for j in jobs if j != SCORER]
    if det_jobs:
        records = pd.concat([read_fold_parquets(cv_dirs(j), OOF_FILE) for j in det_jobs], ignore_index=True)
        _add_detector_metrics(metrics, records, out_dir)
    return metrics


def _write(metrics: CvMetrics, out_dir: Path, frames: Mapping[str, pd.DataFrame]) -> None:
    for name, frame in frames.items():
        frame.to_parquet(out_dir / name, index=False)
        metrics.files[name] = out_dir / name


def _add_scorer_metrics(metrics: CvMetrics, oof: pd.DataFrame, end_to_end: EndToEndOof, labels: pd.DataFrame,
                        folds_frame: pd.DataFrame, out_dir: Path, version: str, final_fit: bool = True) -> None:
    e2e = end_to_end.frame if end_to_end.available else None
    table, per_fold = scorer_metrics(oof, labels, folds_frame, e2e)
    # the fold whose DeepScoreNet ships (publish.shipped_folds picks the same one)
    scorer_fold = None if final_fit else best_scorer_fold(per_fold, sorted(folds_frame["fold"].unique().tolist()))
    metrics.scorer_table, metrics.scorer_per_fold = table, per_fold
    _write(metrics, out_dir, {"oof_scorer.parquet": oof, "metrics_scorer.parquet": table,
                              "metrics_scorer_per_fold.parquet": per_fold})
    plots = {"confusion_scorer.png": (oof, f"DeepScoreNet at the labelled points, out of fold (diagnostic; {version})")}
    if e2e is not None:
        _write(metrics, out_dir, {"oof_end_to_end.parquet": e2e})
        plots["confusion_end_to_end.png"] = (e2e, f"DeepScoreNet end to end, out of fold, uncalibrated ({version})")
    for name, (frame, title) in plots.items():
        plot_confusion_matrices(frame, str(out_dir / name), title=title)
        metrics.files[name] = out_dir / name
    metrics.card["headline"] = headline_line(table, end_to_end.skipped)
    metrics.card["end_to_end"] = end_to_end_card(end_to_end, table)
    metrics.card["scorer"] = table.to_dict(orient="records")
    metrics.card["scorer_per_fold"] = per_fold.to_dict(orient="records")
    metrics.card["calibration"] = calibration_card(oof, e2e, scorer_fold)
    metrics.report_lines += [metrics.card["headline"], ""]
    if e2e is not None:
        metrics.report_lines += [
            "DeepScoreNet END TO END, out of fold (the headline: each fold's detectors on its validation studies -> "
            "crops at their detections -> that fold's DeepScoreNet; undetected targets get the weighted prior of the "
            "training folds; every labelled target counts), against the baselines on the same rows:",
            format_metric_table(table[table["evaluated_on"] == ON_END_TO_END]), ""]
    else:
        metrics.report_lines += [f"End-to-end out-of-fold CV skipped: {end_to_end.skipped}", ""]
    metrics.report_lines += [
        "DeepScoreNet AT THE LABELLED POINTS, out of fold (a diagnostic of the grader alone: crops cut at the "
        "labelled points, which scoring never has; it overstates what a user gets), against the baselines on the "
        "same rows:", format_metric_table(table[table["evaluated_on"] == ON_LABELLED_POINTS]), ""]
    metrics.report_lines += [format_calibration(metrics.card["calibration"]), ""]


def end_to_end_card(end_to_end: EndToEndOof, table: pd.DataFrame) -> dict[str, Any]:
    """The model card's ``metrics.end_to_end``: the headline's figures and what they cover, or
    why the run has none."""
    if not end_to_end.available:
        return {"skipped": end_to_end.skipped or "no validation study was scored"}
    frame = end_to_end.frame
    rows = table[(table["group"] == ALL) & (table["evaluated_on"] == ON_END_TO_END)]
    score = rows.set_index("model")["rsna_log_loss"]
    return {
        "what": "out of fold: each fold's detectors and DeepScoreNet score its validation studies through the "
                "scoring code path; undetected targets get the weighted prior of the training folds; each fold's "
                "model calibrated with its own temperatures, fitted on the other half of its validation studies",
        "rsna_score": float(score[END_TO_END]), "rsna_score_calibrated": float(score[END_TO_END + CALIBRATED]),
        "baseline_weighted_prior": float(score["baseline_weighted_prior"]),
        "n_studies": int(frame["study_id"].nunique()), "n_labelled_targets": int(len(frame)),
        "detected_share": float(frame["detected"].mean()),
        "n_failed_studies": int(frame.loc[frame["failed"].astype(bool), "study_id"].nunique()),
        "problems": end_to_end.problems[:100], "seconds": round(end_to_end.seconds, 1),
    }


def _calibration_summary(frame: pd.DataFrame) -> dict[str, float]:
    part = frame[frame["label"] >= 0]
    return {"rsna_score": float(rsna_score(part).score),
            "ece": expected_calibration_error(part[PROBS].to_numpy(), part["label"].to_numpy())}


def calibration_card(oof: pd.DataFrame, end_to_end: pd.DataFrame | None = None,
                     scorer_fold: int | None = None) -> dict[str, Any]:
    """The version's calibration: a temperature per condition (what scoring applies; fitted as
    :func:`shipped_temperatures` says, on ``scorer_fold``'s predictions when that fold's model
    ships, else on every fold's), and the out-of-fold RSNA score and expected calibration error
    before and after, end to end when there is that frame (``evaluated_on``), else at the
    labelled points; after: temperatures never fitted on the rows they scale, so the gain is
    not flattered."""
    temperatures, fitted_on = shipped_temperatures(oof, end_to_end, fold=scorer_fold)
    at_points = {"oof_before": _calibration_summary(oof),
                 "oof_after_cross_fitted": _calibration_summary(cross_fitted_at_points(oof))}
    card = {"method": "temperature per condition (softmax(log p / T)), fitted on the out-of-fold predictions "
                      "against the severity-weighted log loss: end to end at the detections (what scoring scales), "
                      "at the labelled points for a condition never detected; after = each fold's model with "
                      "temperatures fitted on the other half of its own validation studies",
            "temperatures": temperatures, "fitted_on": fitted_on,
            "fitted_on_folds": ("all (the shipped DeepScoreNet is the all-studies fit; no fold model is it)"
                                if scorer_fold is None else fold_name(scorer_fold) + " (the fold that ships)")}
    if end_to_end is None or not len(end_to_end):
        return {**card, "evaluated_on": ON_LABELLED_POINTS, **at_points}
    return {**card, "evaluated_on": ON_END_TO_END, "oof_before": _calibration_summary(end_to_end),
            "oof_after_cross_fitted": _calibration_summary(cross_fitted_end_to_end(end_to_end, oof)),
            "at_labelled_points": at_points}


def format_calibration(card: dict[str, Any]) -> str:
    """The calibration's lines of the CV report."""
    before, after = card["oof_before"], card["oof_after_cross_fitted"]
    temps = ", ".join(f"{c} {t:.2f}" for c, t in card["temperatures"].items())
    where = "end to end" if card.get("evaluated_on") == ON_END_TO_END else "at the labelled points"
    fitted = f", fitted on {card['fitted_on_folds']}" if "fitted_on_folds" in card else ""
    return (f"Calibration (temperature per condition{fitted}: {temps or 'none'}); out of fold, {where}, before -> after "
            f"(each fold's model, its temperatures fitted on the other half of its validation studies): "
            f"RSNA score {before['rsna_score']:.4f} -> {after['rsna_score']:.4f}, "
            f"expected calibration error {before['ece']:.4f} -> {after['ece']:.4f}")


def _add_detector_metrics(metrics: CvMetrics, records: pd.DataFrame, out_dir: Path) -> None:
    det_table = detector_metrics(records)
    metrics.detector_table = det_table
    if not records.empty:
        records.to_parquet(out_dir / "oof_detectors.parquet", index=False)
        det_table.to_parquet(out_dir / "metrics_detectors.parquet", index=False)
        metrics.files["oof_detectors.parquet"] = out_dir / "oof_detectors.parquet"
        metrics.files["metrics_detectors.parquet"] = out_dir / "metrics_detectors.parquet"
        metrics.report_lines += [("Detectors, out-of-fold (share of labelled targets on the right instance within 5/10 mm "
                                  "in-plane; *_3d: within 5/10 mm of the labelled point in patient space):"),
                                 det_table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), ""]
    metrics.card["detectors"] = det_table.to_dict(orient="records")
