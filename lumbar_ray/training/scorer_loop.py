"""DeepScoreNet's TorchTrainer worker loop: one fold's training crops, DDP, a checkpoint every
epoch, resumable. Every ``val_every`` epochs and after the last, rank 0 scores the fold's held-out
crops (RSNA score); the best round's weights and out-of-fold probabilities are what the fold ships
(:class:`~lumbar_ray.training.best_epoch.BestEpoch`), and ``patience`` rounds without improvement
stop it early."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from lumbar_ray.config import SCORER, ScorerConfig
from lumbar_ray.metrics.rsna import rsna_score
from lumbar_ray.models.deepscorenet import (
    SCORER_KIND, DeepScoreNet, FocalLoss, class_weights_from_labels,
)
from lumbar_ray.training.artifacts import HISTORY_FILE, OOF_FILE, weights_file
from lumbar_ray.training.best_epoch import BestEpoch, is_validation_epoch
from lumbar_ray.training.shard_data import ScorerValidation, block_loader, scorer_fold_data
from lumbar_ray.training.warm_start import start_from
from lumbar_ray.training.worker import (
    initial_weights, is_rank_zero, load_resume_state, parquet_bytes, rank_zero_decides, report_epoch,
    set_worker_threads, start_position,
)

OOF_COLUMNS = ["study_id", "column", "target_index", "label", "series_id", "instance_number"]


def scorer_worker_loop(cfg: dict) -> None:
    """Train DeepScoreNet on fold ``cfg["fold"]``'s training crops (Focal loss with class weights,
    AdamW, cosine schedule), reporting every epoch with a checkpoint to resume from."""
    set_worker_threads(cfg)
    sc = ScorerConfig(**cfg["scorer"])
    # this fold's rows from the run's example shards, read lazily (training/shard_data.py)
    data = scorer_fold_data(cfg, cfg["fold"])
    torch.manual_seed(cfg["seed"])
    dataset = data.dataset
    context = ray.train.get_context()
    loader = block_loader(dataset, sc.batch_size, cfg["seed"], num_replicas=context.get_world_size(),
                          rank=context.get_world_rank())
    loader = ray.train.torch.prepare_data_loader(loader)
    model = DeepScoreNet(in_channels=data.in_channels)
    start_from(model, initial_weights(cfg, SCORER))  # a warm start; a resumed trial then loads its own state
    class_weights = torch.tensor(class_weights_from_labels(data.labels), dtype=torch.float32)
    loss_fn = FocalLoss(gamma=sc.focal_gamma, class_weights=class_weights)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, sc.epochs))
    # RSNA score of the fold's held-out crops (lower is better); the all-studies fit has no
    # validation rows, trains the whole schedule and ships its last epoch.
    selecting = len(data.val) > 0
    best = BestEpoch(higher_is_better=False, patience=sc.patience if selecting else None)
    resumed = load_resume_state()
    if resumed is not None:
        unwrap(model).load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        best = BestEpoch.from_state(resumed["best"])
        if resumed.get("stopped"):
            return  # restarted after its final report: that checkpoint is the fold's outcome
    start_epoch, history = start_position(resumed)
    for epoch in range(start_epoch, sc.epochs):
        dataset.set_epoch(epoch)
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        train_loss = train_scorer_epoch(model, loader, loss_fn, optimizer, device)
        scheduler.step()
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "time": time.time()}
        last = epoch == sc.epochs - 1
        validating = selecting and is_validation_epoch(epoch, sc.epochs, sc.val_every)
        files: dict[str, bytes] = {}
        if is_rank_zero() and (validating or last):
            files, score = scorer_round_files(unwrap(model), sc, data.val, cfg["fold"], epoch, device)
            if validating:
                metrics.update(val_rows=len(data.val), val_rsna_score=score)
                metrics["is_best"] = best.update(epoch, score, files, {"rsna_score": score})
        stop = rank_zero_decides(best.should_stop) and not last if validating else False
        history.append(metrics)
        extra: dict[str, bytes] = {}
        if (last or stop) and is_rank_zero():
            extra = best.shipped_files(files)
            outcome = {**best.summary(), "selection_metric": "val_rsna_score" if selecting else "",
                       "shipped_epoch": best.best_epoch if best.best_epoch is not None else epoch,
                       "epochs_trained": epoch + 1, "stopped_early": bool(stop), "collapsed": False}
            metrics = {**metrics, **outcome}  # the last report carries it to the trial
            history.append({"event": "outcome", "epoch": epoch, "time": time.time(), **outcome})
        extra[HISTORY_FILE] = json.dumps(history).encode()
        report_epoch(metrics, {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                               "best": best.state_dict(), "stopped": stop}, extra)
        if stop:
            break


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


def scorer_round_files(net: DeepScoreNet, sc: ScorerConfig, val: ScorerValidation, fold: int, epoch: int,
                       device) -> tuple[dict[str, bytes], float]:
    """One round's artefacts, those the fold ships if it is the best: the weights and the
    out-of-fold probabilities of the validation rows (when the fold has any); and their RSNA
    score (NaN without validation rows)."""
    files = {weights_file(SCORER): scorer_weights_bytes(net, sc, epoch)}
    if not len(val):
        return files, float("nan")
    probs = val.predict(net, device, batch_size=512)
    oof = val.points[OOF_COLUMNS].reset_index(drop=True)
    oof[["normal_mild", "moderate", "severe"]] = probs
    oof["fold"] = fold
    files[OOF_FILE] = parquet_bytes(oof)
    return files, float(rsna_score(oof).score)


def unwrap(model):
    """The bare DeepScoreNet under DDP."""
    return model.module if hasattr(model, "module") else model


def scorer_weights_bytes(model: DeepScoreNet, sc: ScorerConfig, epoch: int | None = None) -> bytes:
    """The shipped weights file: state dict plus the input spec the scoring side needs, and the
    epoch (0-based) whose weights these are."""
    buffer = io.BytesIO()
    torch.save({"kind": SCORER_KIND, "state_dict": model.state_dict(), "in_channels": model.in_channels,
                "channels": sc.channels, "crop_mm": sc.crop_mm, "crop_px": 32, "epoch": epoch}, buffer)
    return buffer.getvalue()

