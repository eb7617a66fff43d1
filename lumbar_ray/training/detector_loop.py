"""The detector's TorchTrainer worker loop: one YOLOv8 per series type, DDP over gloo (CPU) or
NCCL (GPU), a checkpoint every epoch, resumable; on the last epoch rank 0 runs the detector over
the whole series of its validation studies and records where each labelled target was found."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def _detector_bytes(model, **extra) -> bytes:
    from lumbar_ray.models.detector import save_detector

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "detector.pt")
        save_detector(model, path, **extra)
        return Path(path).read_bytes()


def validation_records(model, root: str, split: str, study_ids, points: pd.DataFrame, series_type: str,
                       conf: float, device) -> tuple[pd.DataFrame, dict]:
    """Whole-series detection on validation studies -> one record per labelled target."""
    from lumbar_ray.models.detector import HitRates, detect_series, detector_hit_rates, select_target_detections
    from lumbar_ray.dicom.read import DicomReadError, read_study
    from lumbar_ray.dicom.read import load_descriptions

    from lumbar_ray.targets import targets_for_series

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
        by_id = {int(s.series_id): s for s in [*study.series.values(), *study.other_series]}
        for series_id, srows in rows.groupby("series_id"):
            series = by_id.get(int(series_id))
            if series is None:
                continue
            dets = detect_series(model, series, conf=conf, device=device)
            selected = select_target_detections(dets, series_type, series)
            hits = detector_hit_rates(selected, srows, series)
            parts.append(hits)
            for rec in hits.records:
                records.append({"study_id": int(sid), "series_id": int(series_id), **rec})
    merged = HitRates.merge(parts)
    return pd.DataFrame(records), merged.as_dict()


def detector_worker_loop(cfg: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from lumbar_ray.models import ultralytics_env

    ultralytics_env.configure()
    from ultralytics.utils.torch_utils import ModelEMA

    from lumbar_ray.config import DetectorConfig, series_type_of_job
    from lumbar_ray.models.detector import (
        DEFAULT_BOX_MM, DetectorDataset, build_detector, collate_detector, make_loss_fn, make_optimizer,
        make_scheduler, recalibrate_batchnorm, train_one_epoch, unwrap_model,
    )
    from lumbar_ray.training.cv import (
        ALL_FOLDS, HISTORY_FILE, OOF_FILE, _load_resume_state, _maybe_inject_failure, _parquet_bytes,
        _report_epoch, weights_file,
    )

    torch.set_num_threads(max(1, int(cfg["threads"])))
    det_cfg = dict(cfg["detector"])
    det_cfg["series_types"] = tuple(det_cfg["series_types"])
    dc = DetectorConfig(**det_cfg)
    job, fold = cfg["job"], cfg["fold"]
    series_type = series_type_of_job(job)
    box_mm = dc.box_mm if dc.box_mm is not None else DEFAULT_BOX_MM[series_type]
    examples = ray.get(cfg["examples_ref"][0])
    samples = examples.slices.get(series_type, [])
    fold_of = cfg["folds"]
    if fold == ALL_FOLDS:
        train_samples = [s for s in samples if int(s.study_id) in fold_of]
        val_studies: list[int] = []
    else:
        train_samples = [s for s in samples if fold_of.get(int(s.study_id), fold) != fold]
        val_studies = sorted({int(s) for s, f in fold_of.items() if f == fold})
    if not train_samples:
        raise ValueError(f"{job} fold {fold}: no labelled {series_type} slices to train on")
    torch.manual_seed(cfg["seed"])
    dataset = DetectorDataset.from_samples(train_samples, series_type, imgsz=dc.imgsz, box_mm=box_mm, augment=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=dc.batch_size, shuffle=True,
                                         drop_last=len(dataset) > dc.batch_size, collate_fn=collate_detector)
    # Batches are dicts: train_one_epoch moves them; Ray only adds the distributed sampler.
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    model = build_detector(series_type, imgsz=dc.imgsz, box_mm=box_mm, seed=cfg["seed"])
    loss_fn = make_loss_fn(model)  # on the unwrapped model, before DDP wraps it
    ema = ModelEMA(model)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(unwrap_model(model), lr=dc.lr)
    steps_per_epoch = max(1, len(loader))
    scheduler = make_scheduler(optimizer, dc.epochs * steps_per_epoch, int(dc.warmup_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    start_epoch, history = 0, []
    resumed = _load_resume_state()
    if resumed is not None:
        unwrap_model(model).load_state_dict(resumed["model"])
        ema.ema.load_state_dict(resumed["ema"])
        ema.updates = resumed["ema_updates"]
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start_epoch, history = resumed["epoch"] + 1, resumed["history"]
        history.append({"event": "resumed", "epoch": start_epoch, "time": time.time()})
    ema.ema.to(device)
    for epoch in range(start_epoch, dc.epochs):
        _maybe_inject_failure(cfg, epoch)
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, loss_fn, device, scaler, scheduler=scheduler, ema=ema)
        metrics = {"epoch": epoch, "train_loss": stats["loss"], "images_per_s": stats["images_per_s"], "time": time.time()}
        extra: dict[str, bytes] = {}
        if epoch == dc.epochs - 1 and ray.train.get_context().get_world_rank() == 0:
            final = ema.ema
            for attr in ("names", "args", "series_type", "imgsz", "box_mm"):
                setattr(final, attr, getattr(unwrap_model(model), attr))
            # The EMA weights' BatchNorm statistics lag behind; recompute them on un-augmented
            # training images, or the saved model can detect nothing in eval mode.
            plain = torch.utils.data.DataLoader(dataset.with_augment(False), batch_size=dc.batch_size,
                                                shuffle=False, collate_fn=collate_detector)
            recalibrate_batchnorm(final, plain, device)
            extra[weights_file(job)] = _detector_bytes(final, fold=fold, epochs=dc.epochs)
            if val_studies:
                records, rates = validation_records(final, cfg["data"], cfg["split"], val_studies,
                                                    examples.points, series_type, dc.conf, device)
                records["job"], records["fold"] = job, fold
                extra[OOF_FILE] = _parquet_bytes(records)
                metrics.update({f"val_{k}": float(v) for k, v in rates.items()})
        history.append(metrics)
        extra[HISTORY_FILE] = json.dumps(history).encode()
        _report_epoch(metrics, {"model": unwrap_model(model).state_dict(), "ema": ema.ema.state_dict(),
                                "ema_updates": ema.updates, "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, extra)
