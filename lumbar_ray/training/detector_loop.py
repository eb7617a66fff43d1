"""The detector's TorchTrainer worker loop: one YOLOv8 per series type, DDP over gloo (CPU) or
NCCL (GPU), a checkpoint every epoch, resumable; on the last epoch rank 0 runs the detector over
the whole series of its validation studies and records where each labelled target was found.
The epochs themselves are :class:`~lumbar_ray.training.detector_fit.DetectorFit`'s, as in a local fit."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import ray.train
import ray.train.torch
import torch

from lumbar_ray.config import DetectorConfig, series_type_of_job
from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.dicom.read import load_descriptions, read_study
from lumbar_ray.models import ultralytics_env
from lumbar_ray.models.detector import DEFAULT_BOX_MM, build_detector, make_loss_fn, save_detector, unwrap_model
from lumbar_ray.models.detector_inference import Detection, detect_series
from lumbar_ray.models.levels import (
    LocatedDetection, assign_slices_to_levels, level_points, select_axial_by_level,
    select_axial_whole_series,
)
from lumbar_ray.models.target_selection import select_target_detections
from lumbar_ray.targets import AXIAL_T2, TARGETS, targets_for_series
from lumbar_ray.training.artifacts import ALL_FOLDS, HISTORY_FILE, OOF_FILE, weights_file
from lumbar_ray.training.detector_data import DetectorDataset, DetectorSample, collate_detector
from lumbar_ray.training.detector_eval import HitRates, detector_hit_rates
from lumbar_ray.training.detector_fit import DetectorFit, make_optimizer, make_scheduler
from lumbar_ray.training.examples import TrainingExamples
from lumbar_ray.training.warm_start import start_from
from lumbar_ray.training.worker import (
    initial_weights, is_rank_zero, load_resume_state, parquet_bytes, report_epoch, set_worker_threads,
    start_position,
)

log = logging.getLogger(__name__)

SPINAL_TARGETS = [t.index for t in TARGETS if t.family == "spinal"]


def detector_worker_loop(cfg: dict) -> None:
    """Train the detector of job ``cfg["job"]`` on fold ``cfg["fold"]``'s labelled slices,
    reporting every epoch with a checkpoint to resume from."""
    ultralytics_env.configure()
    set_worker_threads(cfg)
    dc = DetectorConfig(**{**cfg["detector"], "series_types": tuple(cfg["detector"]["series_types"])})
    job, fold = cfg["job"], cfg["fold"]
    series_type = series_type_of_job(job)
    examples: TrainingExamples = ray.get(cfg["examples_ref"][0])
    train_samples, val_studies = fold_samples(examples.slices.get(series_type, []), cfg["folds"], fold)
    if not train_samples:
        raise ValueError(f"{job} fold {fold}: no labelled {series_type} slices to train on")
    torch.manual_seed(cfg["seed"])
    fit = start_worker_fit(train_samples, series_type, dc, cfg["seed"], initial_weights(cfg, job))
    resumed = load_resume_state()
    if resumed is not None:
        fit.load_state_dict(resumed)
    start_epoch, history = start_position(resumed)
    for epoch in range(start_epoch, dc.epochs):
        # BatchNorm is recalibrated on rank 0 only: its model is the one saved.
        stats, last = fit.run_epoch(epoch, precise_bn=is_rank_zero())
        metrics = {"epoch": epoch, "train_loss": stats["loss"], "images_per_s": stats["images_per_s"], "time": time.time()}
        extra: dict[str, bytes] = {}
        if last and is_rank_zero():
            final = fit.final_model()
            extra[weights_file(job)] = detector_bytes(final, fold=fold, epochs=dc.epochs)
            if val_studies:
                records, rates = validation_records(final, cfg["data"], cfg["split"], val_studies,
                                                    examples.points, series_type, dc.conf, fit.device)
                records["job"], records["fold"] = job, fold
                extra[OOF_FILE] = parquet_bytes(records)
                metrics.update({f"val_{k}": float(v) for k, v in rates.items()})
        history.append(metrics)
        extra[HISTORY_FILE] = json.dumps(history).encode()
        report_epoch(metrics, {**fit.state_dict(), "epoch": epoch, "history": history}, extra)


def fold_samples(samples: list[DetectorSample], fold_of: dict[int, int], fold: int) -> tuple[list[DetectorSample], list[int]]:
    """The training slices of ``fold`` (the other folds' studies; every study's for
    :data:`ALL_FOLDS`) and its validation studies."""
    if fold == ALL_FOLDS:
        return [s for s in samples if int(s.study_id) in fold_of], []
    train = [s for s in samples if fold_of.get(int(s.study_id), fold) != fold]
    return train, sorted({int(s) for s, f in fold_of.items() if f == fold})


def start_worker_fit(train_samples: list[DetectorSample], series_type: str, dc: DetectorConfig, seed: int,
                     init_weights: bytes | None = None) -> DetectorFit:
    """A :class:`DetectorFit` on this worker: the loader sharded and the model DDP-wrapped by
    Ray Train, AdamW with warm-up and cosine decay over ``dc.epochs``, EMA weights, AMP on CUDA.
    ``init_weights``: a warm start's weights file, loaded before the EMA copy and DDP."""
    # heavy: ultralytics, imported only once ultralytics_env has configured it
    from ultralytics.utils.torch_utils import ModelEMA

    box_mm = dc.box_mm if dc.box_mm is not None else DEFAULT_BOX_MM[series_type]
    dataset = DetectorDataset.from_samples(train_samples, series_type, imgsz=dc.imgsz, box_mm=box_mm, augment=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=dc.batch_size, shuffle=True,
                                         drop_last=len(dataset) > dc.batch_size, collate_fn=collate_detector)
    # Batches are dicts: train_one_epoch moves them; Ray only adds the distributed sampler.
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


def validation_records(model, root: str, split: str, study_ids, points: pd.DataFrame, series_type: str,
                       conf: float, device) -> tuple[pd.DataFrame, dict]:
    """Whole-series detection on validation studies -> one record per labelled target.

    Each labelled series is read whole and its targets chosen as scoring chooses them. Axial
    targets are chosen per level among every axial series of the study
    (:func:`lumbar_ray.models.levels.select_axial_by_level`), the levels placed in 3-D from the
    study's *labelled* canal points on its sagittal series: this measures the axial detector
    with its levels given (a diagnostic; scoring places them from the sagittal detections)."""
    descriptions = load_descriptions(root, split)
    own = points[points["target_index"].isin([t.index for t in targets_for_series(series_type)])]
    parts, records = [], []
    for sid in study_ids:
        rows = own[own["study_id"] == sid]
        if rows.empty:
            continue
        try:
            study = read_study(root, int(sid), split=split, descriptions=descriptions)
        except DicomReadError as exc:
            log.warning("validation study %s unreadable: %s", sid, exc)
            continue
        if series_type == AXIAL_T2:
            selected = _axial_selection_at_labelled_levels(model, study, points[points["study_id"] == sid], conf, device)
        for series_id, srows in rows.groupby("series_id"):
            series = study.find_series(series_id, int(srows["instance_number"].iloc[0]))
            if series is None:
                continue
            if series_type == AXIAL_T2:
                chosen = {i: (located.detection if located is not None and located.series is series else None)
                          for i, located in selected.items()}
            else:
                chosen = select_target_detections(detect_series(model, series, conf=conf, device=device),
                                                  series_type, series)
            hits = detector_hit_rates(chosen, srows, series)
            parts.append(hits)
            for rec in hits.records:
                records.append({"study_id": int(sid), "series_id": int(series_id), **rec})
    merged = HitRates.merge(parts)
    return pd.DataFrame(records), merged.as_dict()


def _axial_selection_at_labelled_levels(model, study, study_points: pd.DataFrame, conf: float, device) -> dict:
    """{axial target index: LocatedDetection | None}: the detector run over every axial series
    of the study, targets chosen per level, the levels' 3-D points from the labelled canal
    points (none labelled: each series' own most confident detection per class)."""
    canal = {}
    for row in study_points[study_points["target_index"].isin(SPINAL_TARGETS)].itertuples(index=False):
        series = study.find_series(row.series_id, int(row.instance_number))
        if series is not None and (series.instance_numbers == int(row.instance_number)).any():
            k = series.index_of_instance(int(row.instance_number))
            canal[int(row.target_index)] = LocatedDetection(
                series, Detection(0, k, int(row.instance_number), float(row.x), float(row.y), 1.0))
    found = [(series, detect_series(model, series, conf=conf, device=device))
             for series in study.series_of_type(AXIAL_T2)]
    targets = targets_for_series(AXIAL_T2)
    levels = level_points(canal)
    if not levels:
        return select_axial_whole_series(found, targets)
    return select_axial_by_level([(s, d, assign_slices_to_levels(s, levels)) for s, d in found], targets)
