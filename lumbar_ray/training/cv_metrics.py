"""Out-of-fold metrics of a cross-validated run: DeepScoreNet against the baselines, the
detectors' hit rates, and which fold of each model validated best."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lumbar_ray.config import SCORER
from lumbar_ray.metrics.calibration import cross_fitted_frame, expected_calibration_error, fit_temperatures
from lumbar_ray.metrics.rsna import (
    baseline_oof_predictions, format_metric_table, metric_table, plot_confusion_matrices, rsna_score,
)
from lumbar_ray.storage import filesystem_for
from lumbar_ray.targets import PROBABILITY_COLUMNS
from lumbar_ray.training.artifacts import OOF_FILE, fold_dir

PROBS = list(PROBABILITY_COLUMNS)


def scorer_metrics(oof: pd.DataFrame, labels: pd.DataFrame, folds_frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Overall and per-fold tables: DeepScoreNet, uncalibrated and calibrated (temperatures
    cross-fitted: each fold's from the other folds), against the majority, prior and
    weighted-prior baselines (fitted on the training folds only), all scored on exactly the same
    (study, target) rows (the labelled points the scorer saw)."""
    keys = oof[["study_id", "column"]]
    frames = {"deepscorenet": oof, "deepscorenet_calibrated": cross_fitted_frame(oof)}
    for kind in ("majority", "prior", "weighted_prior"):
        base = baseline_oof_predictions(labels[["study_id", "column", "label"]], folds_frame, kind=kind)
        frames[f"baseline_{kind}"] = base.merge(keys, on=["study_id", "column"], how="inner")
    table = metric_table(frames)
    per_fold = []
    for name, frame in frames.items():
        for fold, part in frame.groupby("fold"):
            score = rsna_score(part)
            per_fold.append({"model": name, "fold": int(fold), "rsna_score": score.score, **score.terms(),
                             "n_rows": score.n_rows})
    return table, pd.DataFrame(per_fold)


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
        part = scorer_per_fold[scorer_per_fold["model"] == "deepscorenet"]
        score = {int(f): float(v) for f, v in zip(part["fold"], part["rsna_score"]) if pd.notna(v)}
        chosen[SCORER] = min(fold_ids, key=lambda f: (score.get(f, math.inf), f))
    return chosen


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
                       out_dir: Path, version: str) -> CvMetrics:
    """Read every job's out-of-fold predictions from the CV folds' artefacts, score them, and
    write predictions, tables and plots to ``out_dir``."""
    fold_ids = sorted(folds_frame["fold"].unique().tolist())
    cv_dirs = lambda job: [fold_dir(artifacts, job, f) for f in fold_ids]  # noqa: E731
    metrics = CvMetrics(report_lines=[f"lumbar-ray training run {version}", ""])
    if SCORER in jobs:
        _add_scorer_metrics(metrics, read_fold_parquets(cv_dirs(SCORER), OOF_FILE), labels, folds_frame,
                            out_dir, version)
    det_jobs = [j for j in jobs if j != SCORER]
    if det_jobs:
        records = pd.concat([read_fold_parquets(cv_dirs(j), OOF_FILE) for j in det_jobs], ignore_index=True)
        _add_detector_metrics(metrics, records, out_dir)
    return metrics


def _add_scorer_metrics(metrics: CvMetrics, oof: pd.DataFrame, labels: pd.DataFrame, folds_frame: pd.DataFrame,
                        out_dir: Path, version: str) -> None:
    table, per_fold = scorer_metrics(oof, labels, folds_frame)
    metrics.scorer_table, metrics.scorer_per_fold = table, per_fold
    oof.to_parquet(out_dir / "oof_scorer.parquet", index=False)
    table.to_parquet(out_dir / "metrics_scorer.parquet", index=False)
    per_fold.to_parquet(out_dir / "metrics_scorer_per_fold.parquet", index=False)
    plot_confusion_matrices(oof, str(out_dir / "confusion_scorer.png"), title=f"DeepScoreNet out-of-fold ({version})")
    for name in ("oof_scorer.parquet", "metrics_scorer.parquet", "metrics_scorer_per_fold.parquet", "confusion_scorer.png"):
        metrics.files[name] = out_dir / name
    metrics.report_lines += ["DeepScoreNet, out-of-fold, against baselines on the same rows:",
                             format_metric_table(table), ""]
    metrics.card["scorer"] = table.to_dict(orient="records")
    metrics.card["scorer_per_fold"] = per_fold.to_dict(orient="records")
    metrics.card["calibration"] = calibration_card(oof)
    metrics.report_lines += [format_calibration(metrics.card["calibration"]), ""]


def calibration_card(oof: pd.DataFrame) -> dict[str, Any]:
    """The version's calibration: a temperature per condition fitted on every out-of-fold
    prediction (what scoring applies), and the out-of-fold RSNA score and expected calibration
    error before and after (after: cross-fitted temperatures, so the gain is not flattered)."""
    crossed = cross_fitted_frame(oof)
    rows = oof["label"] >= 0

    def summary(frame: pd.DataFrame) -> dict[str, float]:
        part = frame[rows]
        return {"rsna_score": float(rsna_score(part).score),
                "ece": expected_calibration_error(part[PROBS].to_numpy(), part["label"].to_numpy())}

    return {"method": "temperature per condition (softmax(log p / T)), fitted on the out-of-fold predictions "
                      "against the severity-weighted log loss",
            "temperatures": fit_temperatures(oof), "oof_before": summary(oof), "oof_after_cross_fitted": summary(crossed)}


def format_calibration(card: dict[str, Any]) -> str:
    """The calibration's lines of the CV report."""
    before, after = card["oof_before"], card["oof_after_cross_fitted"]
    temps = ", ".join(f"{c} {t:.2f}" for c, t in card["temperatures"].items())
    return (f"Calibration (temperature per condition: {temps}); out of fold, before -> after (cross-fitted): "
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
