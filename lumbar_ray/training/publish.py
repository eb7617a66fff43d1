"""What a cross-validated run publishes as a registry version: which fold of each model ships,
its weights, the folds, the CV report and metrics, and the model card."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from lumbar_ray import targets as targets_mod
from lumbar_ray.config import SCORER, TrainConfig, series_type_of_job
from lumbar_ray.metrics.rsna import prior_baseline
from lumbar_ray.models.registry import git_commit
from lumbar_ray.storage import filesystem_for
from lumbar_ray.training.artifacts import ALL_FOLDS, fold_dir, fold_name, weights_file
from lumbar_ray.training.cv_metrics import CvMetrics, best_folds
from lumbar_ray.training.examples import ExamplesSummary
from lumbar_ray.training.trials import TrialSummary, fold_outcomes


def shipped_folds(cfg: TrainConfig, metrics: CvMetrics, fold_ids: list[int]) -> dict[str, int]:
    """The fold each job ships: the fit on all studies with ``final_fit``, else the fold that
    validated best (:func:`best_folds`)."""
    if cfg.final_fit:
        return {job: ALL_FOLDS for job in cfg.jobs()}
    best = best_folds(metrics.detector_table, metrics.scorer_per_fold, fold_ids)
    return {job: best.get(job, fold_ids[0]) for job in cfg.jobs()}


def version_files(out_dir: Path, metrics: CvMetrics, artifacts: str, shipped: dict[str, int],
                  folds_frame: pd.DataFrame) -> tuple[dict[str, Path], str]:
    """The version's files (registry name -> local file) and the CV report: the metrics' files,
    each job's shipped weights (fetched from its fold's artefacts), the folds and the report."""
    files = dict(metrics.files)
    for job, fold in shipped.items():
        fs, src = filesystem_for(f"{fold_dir(artifacts, job, fold)}/{weights_file(job)}")
        local = out_dir / weights_file(job)
        fs.get_file(src, str(local))
        files[weights_file(job)] = local
    folds_frame.to_parquet(out_dir / "folds.parquet", index=False)
    files["folds.parquet"] = out_dir / "folds.parquet"
    report = "\n".join(metrics.report_lines)
    (out_dir / "cv_report.txt").write_text(report)
    files["cv_report.txt"] = out_dir / "cv_report.txt"
    return files, report


def data_fingerprint(root: str, split: str = "train") -> dict[str, Any]:
    """sha256 of the label files and the list of image files (names and sizes)."""
    fs, base = filesystem_for(root)
    out: dict[str, Any] = {}
    for name in ("train.csv", "train_label_coordinates.csv", f"{split}_series_descriptions.csv"):
        path = f"{base.rstrip('/')}/{name}"
        if fs.exists(path):
            with fs.open(path, "rb") as handle:
                out[name] = hashlib.sha256(handle.read()).hexdigest()
    images = f"{base.rstrip('/')}/{split}_images"
    listing = sorted((p, int(info.get("size", 0) or 0)) for p, info in fs.find(images, detail=True).items()) if fs.exists(images) else []
    digest = hashlib.sha256("\n".join(f"{p[len(base):]}\t{s}" for p, s in listing).encode()).hexdigest()
    out["image_listing"] = digest
    out["n_image_files"] = len(listing)
    return out


def input_spec(cfg: TrainConfig, examples: ExamplesSummary) -> dict[str, Any]:
    """What each shipped model expects as input (crop geometry, channels, classes)."""
    det_jobs = [j for j in cfg.jobs() if j != SCORER]
    return {
        "scorer": {"crop_px": 32, "channels": cfg.scorer.channels, "crop_mm": cfg.scorer.crop_mm,
                   "in_channels": int(examples.channels),
                   "normalisation": "per-crop robust percentile scaling (scorer.normalize_crop)",
                   "classes": list(targets_mod.SEVERITIES)},
        "detectors": {j: {"series_type": series_type_of_job(j), "imgsz": cfg.detector.imgsz,
                          "box_mm": cfg.detector.box_mm, "classes": targets_mod.detector_class_names(series_type_of_job(j))}
                      for j in det_jobs},
    }


def model_card(cfg: TrainConfig, labels: pd.DataFrame, n_points: int, examples: ExamplesSummary,
               trials: list[TrialSummary], metrics_card: dict[str, Any], shipped: dict[str, int],
               init_from: dict[str, str] | None = None) -> dict[str, Any]:
    """The version's manifest card: config, targets, input spec, shipped folds, the version the
    models started from (``init_from``, None: random weights), data and its fingerprint,
    metrics, priors, trials and the problems met while cutting examples."""
    shipped_names = {job: fold_name(fold) for job, fold in shipped.items()}
    priors = prior_baseline(labels[["study_id", "column", "label"]])
    return {
        "name": "lumbar-ray",
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "git_commit": git_commit(),
        "config": cfg.to_dict(),
        "targets": targets_mod.as_records(),
        "input_spec": input_spec(cfg, examples),
        "models": {j: weights_file(j) for j in cfg.jobs()},
        # one fold name when every model ships the same fold (the all-studies fit), else "per model"
        "shipped_fold": (next(iter(shipped_names.values())) if len(set(shipped_names.values())) == 1
                         else "per model"),
        "shipped_folds": shipped_names,
        "init_from": init_from,
        "data": {"root": cfg.data, "split": cfg.split, "n_studies": int(labels["study_id"].nunique()),
                 "excluded_studies": sorted(int(s) for s in cfg.exclude_studies),
                 "n_labelled_points": int(n_points), "fingerprint": data_fingerprint(cfg.data, cfg.split)},
        "metrics": {k: v for k, v in metrics_card.items() if k != "calibration"},
        # temperatures per condition that scoring applies to DeepScoreNet's probabilities
        "calibration": metrics_card.get("calibration"),
        "priors": {c: [float(v) for v in priors.loc[c].to_numpy()] for c in priors.index},
        "trials": [dataclasses.asdict(t) | {"metrics": None} for t in trials],
        # per model and fold: the epoch that shipped and why (best round, early stop), collapses and retries
        "fold_outcomes": fold_outcomes(trials),
        "problems": examples.problems[:1000],
        "n_problems": len(examples.problems),
    }
