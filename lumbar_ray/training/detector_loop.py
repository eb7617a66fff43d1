"""The detector's TorchTrainer worker loop: one YOLOv8 per series type, DDP over gloo (CPU) or
NCCL (GPU), a checkpoint every epoch, resumable. Every ``val_every`` epochs and after the last,
rank 0 runs the detector over the whole series of its validation studies (read once per trial,
:mod:`.detector_validation`) and records where each labelled target was found; the best round's
weights and records are what the fold ships (:class:`~lumbar_ray.training.best_epoch.BestEpoch`),
and ``patience`` rounds without improvement stop it early. The epochs themselves are
:class:`~lumbar_ray.training.detector_fit.DetectorFit`'s, as in a local fit."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import ray.train
import ray.train.torch
import torch

from lumbar_ray.config import DetectorConfig, series_type_of_job
from lumbar_ray.models import ultralytics_env
from lumbar_ray.models.detector import DEFAULT_BOX_MM, build_detector, make_loss_fn, save_detector, unwrap_model
from lumbar_ray.targets import targets_for_series
from lumbar_ray.training.artifacts import ALL_FOLDS, HISTORY_FILE, OOF_FILE, weights_file
from lumbar_ray.training.best_epoch import BestEpoch, is_validation_epoch
from lumbar_ray.training.detector_data import DetectorDataset, DetectorSample, collate_detector
from lumbar_ray.training.detector_eval import SELECTION_METRIC, collapse_reason, collapsed, selection_value
from lumbar_ray.training.detector_fit import DetectorFit, make_optimizer, make_scheduler
from lumbar_ray.training.detector_validation import ValidationStudies, validation_records
from lumbar_ray.training.shard_data import block_loader, detector_fold_data, known_studies
from lumbar_ray.training.shards import Manifest, read_points
from lumbar_ray.training.warm_start import start_from
from lumbar_ray.training.worker import (
    initial_weights, is_rank_zero, load_resume_state, parquet_bytes, rank_zero_decides, report_epoch,
    set_worker_threads, start_position,
)

log = logging.getLogger(__name__)


def detector_worker_loop(cfg: dict) -> None:
    """Train the detector of job ``cfg["job"]`` on fold ``cfg["fold"]``'s labelled slices,
    reporting every epoch with a checkpoint to resume from; the last report carries the fold's
    outcome (:func:`outcome_metrics`: best epoch, early stop, collapse)."""
    ultralytics_env.configure()
    set_worker_threads(cfg)
    dc = DetectorConfig(**{**cfg["detector"], "series_types": tuple(cfg["detector"]["series_types"])})
    job, fold = cfg["job"], cfg["fold"]
    series_type = series_type_of_job(job)
    # this series type's slices of the training folds, read lazily from the run's example shards
    data = detector_fold_data(cfg, series_type, fold)
    train_samples, val_studies = data.train_samples, data.val_studies
    if not len(train_samples):
        raise ValueError(f"{job} fold {fold}: no labelled {series_type} slices to train on")
    torch.manual_seed(cfg["seed"])
    fit = start_worker_fit(train_samples, series_type, dc, cfg["seed"], initial_weights(cfg, job))
    graded = graded_studies(cfg, dc, series_type, fold, val_studies, data.points)
    # The all-studies fit has no validation fold to pick an epoch on: it trains the whole
    # schedule and its last epoch is only checked for a collapse, on a few training studies.
    selecting = fold != ALL_FOLDS and len(graded) > 0
    best = BestEpoch(higher_is_better=True, patience=dc.patience if selecting else None)
    resumed = load_resume_state()
    if resumed is not None:
        fit.load_state_dict(resumed)
        best = BestEpoch.from_state(resumed["best"])
        if resumed.get("stopped"):
            return  # restarted after its final report: that checkpoint is the fold's outcome
    start_epoch, history = start_position(resumed)
    for epoch in range(start_epoch, dc.epochs):
        # BatchNorm is recalibrated on rank 0 only: its model is the one saved.
        stats, last = fit.run_epoch(epoch, precise_bn=is_rank_zero())
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "images_per_s": stats["images_per_s"],
                                   "time": time.time()}
        validating = selecting and is_validation_epoch(epoch, dc.epochs, dc.val_every)
        files: dict[str, bytes] = {}
        rates: dict[str, float] = {}
        if is_rank_zero() and (validating or last):
            files, rates = graded_round(fit, last, graded, selecting, job, fold, epoch, dc, cfg["seed"])
            metrics.update({f"{'val' if selecting else 'check'}_{k}": float(v) for k, v in rates.items()})
            if validating:
                metrics["is_best"] = best.update(epoch, selection_value(rates), files, rates)
        stop = rank_zero_decides(best.should_stop) and not last if validating else False
        history.append(metrics)
        extra: dict[str, bytes] = {}
        if (last or stop) and is_rank_zero():
            extra = best.shipped_files(files)
            outcome = outcome_metrics(best, rates, selecting, stop, epoch, graded)
            metrics = {**metrics, **outcome}  # the last report carries it to the trial
            history.append({"event": "outcome", "epoch": epoch, "time": time.time(), **outcome,
                            "unreadable_study_ids": sorted(graded.unreadable)})
        extra[HISTORY_FILE] = json.dumps(history).encode()
        report_epoch(metrics, {**fit.state_dict(), "epoch": epoch, "history": history, "best": best.state_dict(),
                               "stopped": stop}, extra)
        if stop:
            break


def graded_studies(cfg: dict, dc: DetectorConfig, series_type: str, fold: int, val_studies: list[int],
                   points: pd.DataFrame) -> ValidationStudies:
    """What the rounds grade: the fold's validation studies; for the all-studies fit, the first
    ``dc.final_check_studies`` training studies with this type's targets (a collapse check)."""
    if fold == ALL_FOLDS:
        val_studies, points = final_check_points(cfg, series_type, dc.final_check_studies)
    return ValidationStudies(cfg["data"], cfg["split"], val_studies, points, series_type, dc.val_cache_mb)


def final_check_points(cfg: dict, series_type: str, n: int) -> tuple[list[int], pd.DataFrame]:
    """(up to ``n`` training studies with labelled ``series_type`` targets, their points of every
    series type), from the first chunks of the run's shards that hold such studies."""
    own = [t.index for t in targets_for_series(series_type)]
    manifest = Manifest.read(cfg["examples"])
    ids: list[int] = []
    frames = []
    for entry in manifest.chunks_for(None):
        if len(ids) >= n:
            break
        if not entry.n_slices.get(series_type):
            continue
        points = known_studies(read_points(manifest.root, [entry]), cfg["folds"])
        frames.append(points)
        ids += sorted(set(points.loc[points["target_index"].isin(own), "study_id"].astype(int)))
    ids = ids[:n]
    points = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["study_id", "target_index"])
    return ids, points[points["study_id"].astype(int).isin(ids)]


def graded_model(fit: DetectorFit, last: bool):
    """The model a round grades and may ship. After the last epoch: the fit's final model, its
    BatchNorm recalibrated by ``run_epoch``. Before it: a copy of the EMA weights recalibrated
    likewise (a forward pass over the training images), so that the live EMA, which training
    goes on updating, keeps its own statistics."""
    if last:
        return fit.final_model()
    snapshot = copy.deepcopy(fit.final_model())
    fit.recalibrate_batchnorm(snapshot)
    return snapshot


def graded_round(fit: DetectorFit, last: bool, graded: ValidationStudies, selecting: bool, job: str, fold: int,
                 epoch: int, dc: DetectorConfig, seed: int) -> tuple[dict[str, bytes], dict[str, float]]:
    """Rank 0's round: (the files it would ship — weights, and on a validation fold its records,
    the fold's out-of-fold file —, the rates of :func:`validation_records`; none without studies).
    The all-studies fit's check records are of training studies: never an out-of-fold file."""
    model = graded_model(fit, last)
    files = {weights_file(job): detector_bytes(model, fold=fold, epochs=dc.epochs, epoch=epoch, seed=seed)}
    if not len(graded):
        return files, {}
    records, rates = validation_records(model, graded, dc.conf, fit.device)
    if selecting:
        records["job"], records["fold"] = job, fold
        files[OOF_FILE] = parquet_bytes(records)
    return files, rates


def outcome_metrics(best: BestEpoch, rates: dict[str, float], selecting: bool, stopped: bool, epoch: int,
                    graded: ValidationStudies) -> dict[str, Any]:
    """The fold's outcome, on its last report (the trial reads it): the best epoch and its value
    (selecting; else the last epoch ships), whether patience stopped it, and whether it
    collapsed — every validation round (the all-studies fit: its check) found nothing."""
    if selecting and best.best_epoch is not None:
        fold_collapsed, reason = False, ""
    else:
        where = (f"its {len(graded)} validation studies" if selecting
                 else f"{len(graded)} of its own training studies (the all-studies fit's check)")
        fold_collapsed = collapsed(rates)
        reason = collapse_reason(rates, where) if fold_collapsed else ""
    return {**best.summary(), "selection_metric": f"val_{SELECTION_METRIC}" if selecting else "",
            "shipped_epoch": best.best_epoch if selecting and best.best_epoch is not None else epoch,
            "epochs_trained": epoch + 1, "stopped_early": bool(stopped), "collapsed": fold_collapsed,
            "collapse_reason": reason, "unreadable_studies": len(graded.unreadable)}


def start_worker_fit(train_samples: Sequence[DetectorSample], series_type: str, dc: DetectorConfig, seed: int,
                     init_weights: bytes | None = None) -> DetectorFit:
    """A :class:`DetectorFit` on this worker: the loader sharded and the model DDP-wrapped by
    Ray Train, AdamW with warm-up and cosine decay over ``dc.epochs``, EMA weights, AMP on CUDA.
    ``init_weights``: a warm start's weights file, loaded before the EMA copy and DDP."""
    # heavy: ultralytics, imported only once ultralytics_env has configured it
    from ultralytics.utils.torch_utils import ModelEMA

    box_mm = dc.box_mm if dc.box_mm is not None else DEFAULT_BOX_MM[series_type]
    dataset = DetectorDataset.from_samples(train_samples, series_type, imgsz=dc.imgsz, box_mm=box_mm, augment=True)
    context = ray.train.get_context()
    # shuffled chunk by chunk of the shards, each rank its share (training/shard_data.py)
    loader = block_loader(dataset, dc.batch_size, seed, num_replicas=context.get_world_size(),
                          rank=context.get_world_rank(), collate_fn=collate_detector,
                          drop_last=len(dataset) > dc.batch_size)
    # Batches are dicts: train_one_epoch moves them; the sampler already shards them by rank.
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    model = build_detector(series_type, imgsz=dc.imgsz, box_mm=box_mm, seed=seed)
    start_from(model, init_weights)
    loss_fn = make_loss_fn(model)  # on the unwrapped model, before DDP wraps it
    ema = ModelEMA(model)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(unwrap_model(model), lr=dc.lr)
    steps_per_epoch = max(1, len(loader))
    scheduler = make_scheduler(optimizer, dc.epochs * steps_per_epoch, int(dc.warmup_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    ema.ema.to(device)
    return DetectorFit(model, loss_fn, loader, optimizer, scheduler, device, dataset, dc.batch_size, dc.epochs,
                       ema, scaler)


def detector_bytes(model, **extra) -> bytes:
    """The shipped weights file (:func:`~lumbar_ray.models.detector.save_detector`) as bytes."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "detector.pt")
        save_detector(model, path, **extra)
        return Path(path).read_bytes()
