"""DeepScoreNet's TorchTrainer worker loop: one fold's training crops, DDP, a checkpoint every
epoch, resumable; on the last epoch rank 0 adds the weights and the out-of-fold probabilities."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from lumbar_ray.config import SCORER, ScorerConfig
from lumbar_ray.models.deepscorenet import (
    SCORER_KIND, DeepScoreNet, FocalLoss, class_weights_from_labels, predict_proba,
)
from lumbar_ray.training.artifacts import HISTORY_FILE, OOF_FILE, weights_file
from lumbar_ray.training.crop_data import CropDataset
from lumbar_ray.training.examples import TrainingExamples
from lumbar_ray.training.warm_start import start_from
from lumbar_ray.training.worker import (
    initial_weights, is_rank_zero, load_resume_state, parquet_bytes, report_epoch, set_worker_threads,
    split_indices, start_position,
)

OOF_COLUMNS = ["study_id", "column", "target_index", "label", "series_id", "instance_number"]


def scorer_worker_loop(cfg: dict) -> None:
    """Train DeepScoreNet on fold ``cfg["fold"]``'s training crops (Focal loss with class weights,
    AdamW, cosine schedule), reporting every epoch with a checkpoint to resume from."""
    set_worker_threads(cfg)
    sc = ScorerConfig(**cfg["scorer"])
    examples: TrainingExamples = ray.get(cfg["examples_ref"][0])
    points = examples.points
    train_idx, val_idx = split_indices(points["study_id"].to_numpy(), cfg["folds"], cfg["fold"])
    labels = points["label"].to_numpy(dtype=np.int64)
    torch.manual_seed(cfg["seed"])
    # One scorer grades every series type, so no single mirror rule applies: no flips
    # (CropDataset's series_type=None); the other augmentations are label-preserving. The
    # training rows also get the localisation noise of detection (a neighbouring slice's crop,
    # a few mm of shift); validation (final_scorer_files) grades the labelled slice's crops.
    neighbours = None if examples.neighbour_crops is None else examples.neighbour_crops[train_idx]
    dataset = CropDataset(examples.crops[train_idx], labels[train_idx], channels=sc.channels,
                          max_factor=sc.max_oversample, seed=cfg["seed"], neighbour_crops=neighbours,
                          crop_mm=sc.crop_mm)
    loader = torch.utils.data.DataLoader(dataset, batch_size=sc.batch_size, shuffle=True, drop_last=False)
    loader = ray.train.torch.prepare_data_loader(loader)
    model = DeepScoreNet(in_channels=examples.crops.shape[1])
    start_from(model, initial_weights(cfg, SCORER))  # a warm start; a resumed trial then loads its own state
    class_weights = torch.tensor(class_weights_from_labels(labels[train_idx]), dtype=torch.float32)
    loss_fn = FocalLoss(gamma=sc.focal_gamma, class_weights=class_weights)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, sc.epochs))
    resumed = load_resume_state()
    if resumed is not None:
        unwrap(model).load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
    start_epoch, history = start_position(resumed)
    for epoch in range(start_epoch, sc.epochs):
        dataset.set_epoch(epoch)
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        train_loss = train_scorer_epoch(model, loader, loss_fn, optimizer, device)
        scheduler.step()
        metrics = {"epoch": epoch, "train_loss": train_loss, "time": time.time()}
        extra: dict[str, bytes] = {}
        if epoch == sc.epochs - 1 and is_rank_zero():
            extra = final_scorer_files(unwrap(model), sc, examples, val_idx, cfg["fold"], device)
            if len(val_idx):
                metrics["val_rows"] = int(len(val_idx))
        history.append(metrics)
        extra[HISTORY_FILE] = json.dumps(history).encode()
        report_epoch(metrics, {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, extra)


def train_scorer_epoch(model, loader, loss_fn, optimizer, device) -> float:
    """One pass over ``loader``; the mean training loss per crop."""
    model.train()
    total, count = 0.0, 0
    for crops, target in loader:
        crops, target = crops.to(device), target.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(crops), target)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(target)
        count += len(target)
    return total / max(count, 1)


def final_scorer_files(net: DeepScoreNet, sc: ScorerConfig, examples: TrainingExamples, val_idx: np.ndarray,
                       fold: int, device) -> dict[str, bytes]:
    """The last epoch's artefacts: the weights, and the out-of-fold probabilities of the
    validation rows (when the fold has any)."""
    files = {weights_file(SCORER): scorer_weights_bytes(net, sc)}
    if len(val_idx):
        probs = predict_proba(net, examples.crops[val_idx], batch_size=512, device=device)
        oof = examples.points.iloc[val_idx][OOF_COLUMNS].reset_index(drop=True)
        oof[["normal_mild", "moderate", "severe"]] = probs
        oof["fold"] = fold
        files[OOF_FILE] = parquet_bytes(oof)
    return files


def unwrap(model):
    """The bare DeepScoreNet under DDP."""
    return model.module if hasattr(model, "module") else model


def scorer_weights_bytes(model: DeepScoreNet, sc: ScorerConfig) -> bytes:
    """The shipped weights file: state dict plus the input spec the scoring side needs."""
    buffer = io.BytesIO()
    torch.save({"kind": SCORER_KIND, "state_dict": model.state_dict(), "in_channels": model.in_channels,
                "channels": sc.channels, "crop_mm": sc.crop_mm, "crop_px": 32}, buffer)
    return buffer.getvalue()

