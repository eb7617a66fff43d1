"""Cross-validated training on Ray: one Tune trial per (model, fold), each a TorchTrainer.

Flow (``run_training``):
  labels + coordinates -> folds grouped by study (stratified) -> training examples cut from the
  studies by Ray tasks (in the object store, shared by all trials) -> Tune runs one trial per
  (model, fold) — plus one per model on all studies, the version that ships — each launching a
  ``TorchTrainer`` (Ray 2.60 Train V2: ``Tuner(trainer)`` is deprecated) with a checkpoint per
  epoch and ``FailureConfig`` so a killed worker resumes from its last checkpoint -> out-of-fold
  predictions -> metrics against the majority and prior baselines -> a registry version.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import pandas as pd

from lumbar_ray.metrics import labels as label_io
from lumbar_ray.config import SCORER, TrainConfig, series_type_of_job
from lumbar_ray.targets import SERIES_TYPES, TARGETS

log = logging.getLogger(__name__)

ALL_FOLDS = -1  # fold id of the final fit on every study
STATE_FILE = "state.pt"
OOF_FILE = "oof.parquet"
HISTORY_FILE = "history.json"


def weights_file(job: str) -> str:
    return f"{job}.pt"


# ---------------------------------------------------------------------------------------------
# Examples, prepared once and shared by every trial through the object store
# ---------------------------------------------------------------------------------------------


@dataclass
class Examples:
    crops: np.ndarray  # (N, C, 32, 32)
    points: pd.DataFrame  # study_id, series_id, instance_number, column, target_index, label, x, y
    slices: dict  # series type -> list[detector.DetectorSample]
    problems: list[str]


def _examples_for_chunk(root: str, split: str, chunk: list[int], points: pd.DataFrame, scorer_cfg: dict,
                        with_slices: bool, negatives: int = 0, negative_gap: int | None = None) -> list:
    from lumbar_ray.config import ScorerConfig
    from lumbar_ray.dicom.read import load_descriptions
    from lumbar_ray.training.examples import study_examples

    descriptions = load_descriptions(root, split)
    cfg = ScorerConfig(**scorer_cfg)
    return [study_examples(root, sid, points[points["study_id"] == sid], cfg, split=split,
                           descriptions=descriptions, with_slices=with_slices, negatives=negatives,
                           negative_gap=negative_gap) for sid in chunk]


def prepare_examples(cfg: TrainConfig, points: pd.DataFrame, with_slices: bool) -> Examples:
    """Cut crops and labelled slices from every study, in parallel Ray tasks."""
    import ray

    study_ids = sorted(points["study_id"].unique().tolist())
    n_chunks = max(1, min(len(study_ids), int(ray.cluster_resources().get("CPU", 1)) * 4))
    chunks = [c.tolist() for c in np.array_split(np.array(study_ids), n_chunks) if len(c)]
    from lumbar_ray.storage import ray_remote_args_with_storage_env

    task = ray.remote(**ray_remote_args_with_storage_env(num_cpus=1))(_examples_for_chunk)
    refs = [task.remote(cfg.data, cfg.split, chunk, points[points["study_id"].isin(chunk)],
                        dataclasses.asdict(cfg.scorer), with_slices, cfg.detector.negatives,
                        cfg.detector.negative_gap) for chunk in chunks]
    per_study = [ex for part in ray.get(refs) for ex in part]
    crops = [ex.crops for ex in per_study if len(ex.crops)]
    frames = [ex.points for ex in per_study if len(ex.points)]
    return Examples(
        crops=np.concatenate(crops) if crops else np.zeros((0, 3, 32, 32), np.float32),
        points=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        slices={st: [s for ex in per_study for s in ex.slices.get(st, [])] for st in SERIES_TYPES},
        problems=[p for ex in per_study for p in ex.problems],
    )


# ---------------------------------------------------------------------------------------------
# Worker loops (run inside TorchTrainer workers)
# ---------------------------------------------------------------------------------------------


def _load_resume_state() -> dict | None:
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def _maybe_inject_failure(cfg: dict, epoch: int) -> None:
    """Test hook: kill this worker process once, during the configured epoch, on the first attempt.

    It dies a few seconds into the epoch, as a worker lost mid-epoch would: Ray Train's controller
    collects reports (and their checkpoints) when it polls the workers, every 2 s by default, so a
    worker that dies within that window after reporting loses that report and resumes from the one
    before; past it, from the last epoch's checkpoint.
    """
    at = cfg.get("inject_failure_at_epoch")
    marker = cfg.get("failure_marker")
    if at is None or marker is None or epoch != at or os.path.exists(marker):
        return
    time.sleep(6.0)
    Path(marker).write_text(f"killed during epoch {epoch} pid {os.getpid()}\n")
    os._exit(1)


def _report_epoch(metrics: dict, state: dict, extra_files: dict[str, bytes] | None = None) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (model, optimizer, epoch, history)."""
    import ray.train
    import torch

    import ray

    # node and device recorded with every epoch: where a trial ran is part of its record.
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id(),
               "device": str(ray.train.torch.get_device())}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, os.path.join(directory, STATE_FILE))
        for name, data in (extra_files or {}).items():
            Path(directory, name).write_bytes(data)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _split_indices(study_ids: np.ndarray, folds: dict[int, int], fold: int) -> tuple[np.ndarray, np.ndarray]:
    study_fold = np.array([folds.get(int(s), -2) for s in study_ids])
    if fold == ALL_FOLDS:
        return np.flatnonzero(study_fold >= 0), np.zeros(0, dtype=np.int64)
    return np.flatnonzero((study_fold >= 0) & (study_fold != fold)), np.flatnonzero(study_fold == fold)


def scorer_worker_loop(cfg: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from lumbar_ray.config import ScorerConfig
    from lumbar_ray.models.deepscorenet import CropDataset, DeepScoreNet, FocalLoss, class_weights_from_labels, predict_proba

    torch.set_num_threads(max(1, int(cfg["threads"])))
    sc = ScorerConfig(**cfg["scorer"])
    examples: Examples = ray.get(cfg["examples_ref"][0])
    points = examples.points
    train_idx, val_idx = _split_indices(points["study_id"].to_numpy(), cfg["folds"], cfg["fold"])
    labels = points["label"].to_numpy(dtype=np.int64)
    torch.manual_seed(cfg["seed"])
    # One scorer grades every series type, so no single mirror rule applies: no flips
    # (CropDataset's series_type=None); the other augmentations are label-preserving.
    dataset = CropDataset(examples.crops[train_idx], labels[train_idx], channels=sc.channels,
                          max_factor=sc.max_oversample, seed=cfg["seed"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=sc.batch_size, shuffle=True, drop_last=False)
    loader = ray.train.torch.prepare_data_loader(loader)
    model = DeepScoreNet(in_channels=examples.crops.shape[1])
    class_weights = torch.tensor(class_weights_from_labels(labels[train_idx]), dtype=torch.float32)
    loss_fn = FocalLoss(gamma=sc.focal_gamma, class_weights=class_weights)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, sc.epochs))
    start_epoch, history = 0, []
    resumed = _load_resume_state()
    if resumed is not None:
        unwrap(model).load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start_epoch, history = resumed["epoch"] + 1, resumed["history"]
        history.append({"event": "resumed", "epoch": start_epoch, "time": time.time()})
    for epoch in range(start_epoch, sc.epochs):
        _maybe_inject_failure(cfg, epoch)
        dataset.set_epoch(epoch)
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
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
        scheduler.step()
        metrics = {"epoch": epoch, "train_loss": total / max(count, 1), "time": time.time()}
        extra: dict[str, bytes] = {}
        if epoch == sc.epochs - 1 and ray.train.get_context().get_world_rank() == 0:
            net = unwrap(model)
            extra[weights_file(SCORER)] = _scorer_weights_bytes(net, sc)
            if len(val_idx):
                probs = predict_proba(net, examples.crops[val_idx], batch_size=512, device=device)
                oof = points.iloc[val_idx][["study_id", "column", "target_index", "label", "series_id",
                                            "instance_number"]].reset_index(drop=True)
                oof[["normal_mild", "moderate", "severe"]] = probs
                oof["fold"] = cfg["fold"]
                extra[OOF_FILE] = _parquet_bytes(oof)
                metrics["val_rows"] = int(len(val_idx))
        history.append(metrics)
        extra[HISTORY_FILE] = json.dumps(history).encode()
        _report_epoch(metrics, {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history}, extra)


def detector_worker_loop(cfg: dict) -> None:
    from lumbar_ray.training.detector_loop import detector_worker_loop as loop

    loop(cfg)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def _scorer_weights_bytes(model, sc) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"kind": "deepscorenet", "state_dict": model.state_dict(), "in_channels": model.in_channels,
                "channels": sc.channels, "crop_mm": sc.crop_mm, "crop_px": 32}, buffer)
    return buffer.getvalue()


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def worker_loop_for(job: str) -> Callable[[dict], None]:
    if job == SCORER:
        return scorer_worker_loop
    series_type_of_job(job)  # raises for unknown jobs
    return detector_worker_loop


# ---------------------------------------------------------------------------------------------
# Tune trial: one (model, fold), launching a TorchTrainer
# ---------------------------------------------------------------------------------------------


def fold_trial(config: dict) -> None:
    """A Tune function trial. Launches the TorchTrainer of one (job, fold) and copies its final
    checkpoint's artefacts to ``{artifacts}/{job}/fold{fold}/``."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lumbar_ray.storage import filesystem_for, ray_storage

    job, fold = config["job"], config["fold"]
    res = config["resources"]
    fold_name = "all" if fold == ALL_FOLDS else f"fold{fold}"
    worker_cfg = {**config["worker"], "job": job, "fold": fold}
    target_job = worker_cfg.get("inject_failure_job")
    if target_job is not None and target_job != job:
        worker_cfg["inject_failure_at_epoch"] = None
    if worker_cfg.get("inject_failure_at_epoch") is not None:
        worker_cfg["failure_marker"] = os.path.join(config["marker_dir"], f"{job}-{fold_name}.killed")
    resources_per_worker = {"CPU": res["cpus_per_worker"]}
    if res["use_gpu"]:
        resources_per_worker["GPU"] = res["gpus_per_worker"]
    storage_path, storage_filesystem = ray_storage(config["storage_path"])
    started = time.time()
    trainer = TorchTrainer(
        worker_loop_for(job),
        train_loop_config=worker_cfg,
        scaling_config=ScalingConfig(num_workers=res["workers_per_trial"], use_gpu=res["use_gpu"],
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=f"{config['run_name']}-{job}-{fold_name}", storage_path=storage_path,
                             storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=config["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    finished = time.time()
    out_dir = f"{config['artifacts']}/{job}/{fold_name}"
    fs, out_path = filesystem_for(out_dir)
    fs.makedirs(out_path, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        for name in os.listdir(directory):
            if name != STATE_FILE:
                fs.put_file(os.path.join(directory, name), f"{out_path}/{name}")
    tune.report({"job": job, "fold": fold, "started": started, "finished": finished,
                 "node_ip": _node_ip(), "node_id": result.metrics.get("node_id", ""),
                 "device": result.metrics.get("device", ""),
                 **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}})


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


@dataclass
class TrialSummary:
    job: str
    fold: int
    started: float
    finished: float
    node_ip: str
    node_id: str  # the node of the trial's rank-0 training worker
    metrics: dict[str, Any]


def run_trials(cfg: TrainConfig, folds_frame: pd.DataFrame, examples_ref, run_name: str, storage_path: str,
               artifacts: str) -> list[TrialSummary]:
    import ray
    from ray import tune

    from lumbar_ray.storage import ray_storage

    res = cfg.resources
    jobs = cfg.jobs()
    fold_ids = sorted(folds_frame["fold"].unique().tolist()) + ([ALL_FOLDS] if cfg.final_fit else [])
    cluster = ray.cluster_resources()
    if res.use_gpu:
        per_trial = res.workers_per_trial * res.gpus_per_worker
        capacity = int(cluster.get("GPU", 0) // per_trial)
    else:
        per_trial = res.workers_per_trial * res.cpus_per_worker
        capacity = int(cluster.get("CPU", 1) // per_trial)
    max_concurrent = res.max_concurrent_trials or max(1, capacity)
    marker_dir = tempfile.mkdtemp(prefix="lumbar-ray-markers-")
    worker = {
        "scorer": dataclasses.asdict(cfg.scorer),
        "detector": dataclasses.asdict(cfg.detector),
        "folds": {int(s): int(f) for s, f in zip(folds_frame["study_id"], folds_frame["fold"])},
        "examples_ref": [examples_ref],
        "seed": cfg.seed,
        "data": cfg.data,
        "split": cfg.split,
        "threads": max(1, int(res.cpus_per_worker)),
        "inject_failure_at_epoch": cfg.inject_failure_at_epoch,
        "inject_failure_job": cfg.inject_failure_job,
    }
    param_space = {
        "job": tune.grid_search(jobs),
        "fold": tune.grid_search(fold_ids),
        "worker": worker,
        "resources": dataclasses.asdict(res),
        "run_name": run_name,
        "storage_path": storage_path,
        "artifacts": artifacts,
        "max_failures": cfg.max_failures,
        "marker_dir": marker_dir,
    }
    # The trial itself only waits on its TorchTrainer: it holds no CPU, so trials run concurrently
    # up to what the workers' resources allow.
    trainable = tune.with_resources(fold_trial, {"cpu": 0, "memory": res.trial_memory_mb * 1024 * 1024})
    tune_path, tune_filesystem = ray_storage(storage_path)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=f"{run_name}-cv", storage_path=tune_path, storage_filesystem=tune_filesystem,
                                  verbose=0),
    )
    grid = tuner.fit()
    summaries, failures = [], []
    for result in grid:
        if result.error is not None:
            failures.append(f"{result.config.get('job')} fold {result.config.get('fold')}: {result.error}")
            continue
        m = result.metrics
        summaries.append(TrialSummary(m["job"], int(m["fold"]), m["started"], m["finished"], m["node_ip"],
                                      m.get("node_id", ""), m))
    if failures:
        raise RuntimeError("training trials failed:\n" + "\n".join(failures))
    return summaries


# ---------------------------------------------------------------------------------------------
# Driver: folds -> examples -> trials -> out-of-fold metrics -> registry version
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingOutcome:
    version: str
    registry: str
    metric_table: pd.DataFrame
    detector_table: pd.DataFrame
    trials: list[TrialSummary]
    report: str
    problems: list[str]
    artifacts: str  # {storage}/{version}/artifacts: per (job, fold) weights, OOF and history.json


def data_fingerprint(root: str, split: str = "train") -> dict[str, Any]:
    """sha256 of the label files and the list of image files (names and sizes)."""
    import hashlib

    from lumbar_ray.storage import filesystem_for

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


def _read_parquets(pattern_dirs: list[str], name: str) -> pd.DataFrame:
    from lumbar_ray.storage import filesystem_for

    frames = []
    for directory in pattern_dirs:
        fs, path = filesystem_for(f"{directory}/{name}")
        if fs.exists(path):
            with fs.open(path, "rb") as handle:
                frames.append(pd.read_parquet(handle))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _fold_name(fold: int) -> str:
    return "all" if fold == ALL_FOLDS else f"fold{fold}"


def scorer_metrics(oof: pd.DataFrame, labels: pd.DataFrame, folds_frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Overall and per-fold tables: DeepScoreNet against the majority, prior and weighted-prior
    baselines (fitted on the training folds only), all
    scored on exactly the same (study, target) rows (the labelled points the scorer saw)."""
    from lumbar_ray.metrics.rsna import baseline_oof_predictions, metric_table, rsna_score

    keys = oof[["study_id", "column"]]
    frames = {"deepscorenet": oof}
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
    metrics go to the lowest fold. Why: a fold model can collapse on a small training set (the
    demo's canal detector found nothing on one of its two folds) and shipping fold 0 regardless
    scored every study with it."""
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


def run_training(cfg: TrainConfig, echo: Callable[[str], None] = log.info) -> TrainingOutcome:
    """Cross-validate, fit the final models and publish a registry version. Needs ``ray.init``."""
    import ray

    from lumbar_ray import targets as targets_mod
    from lumbar_ray.training.folds import assign_folds
    from lumbar_ray.metrics.rsna import format_metric_table, plot_confusion_matrices, prior_baseline
    from lumbar_ray.models.registry import ModelRegistry, git_commit, new_version_id
    from lumbar_ray.storage import is_url

    if not ray.is_initialized():
        raise RuntimeError("run_training needs a Ray runtime: call ray.init() first (jobs/train.py does)")
    registry = ModelRegistry(cfg.registry)
    version = cfg.run_name or new_version_id()
    storage = cfg.storage_path or f"{str(cfg.registry).rstrip('/')}/runs"
    if not is_url(storage):
        storage = str(Path(storage).resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    artifacts = f"{storage}/{version}/artifacts"

    labels = label_io.read_labels(cfg.data)
    coords = label_io.read_coordinates(cfg.data)
    if cfg.exclude_studies:
        excluded = set(int(s) for s in cfg.exclude_studies)
        labels = labels[~labels["study_id"].isin(excluded)]
        coords = coords[~coords["study_id"].isin(excluded)]
        echo(f"[train] {len(excluded)} studies excluded (held out)")
    points = label_io.labelled_points(labels, coords)
    folds_frame = assign_folds(labels[["study_id", "column", "label"]], cfg.folds, cfg.seed)
    echo(f"[train] {labels['study_id'].nunique()} studies, {len(points)} labelled points, {cfg.folds} folds "
         f"(grouped by study); jobs: {', '.join(cfg.jobs())}")
    started = time.time()
    examples = prepare_examples(cfg, points, with_slices="detector" in cfg.models)
    echo(f"[train] cut {len(examples.crops)} crops and "
         f"{sum(len(v) for v in examples.slices.values())} labelled slices in {time.time() - started:.1f} s"
         + (f"; {len(examples.problems)} problems recorded" if examples.problems else ""))
    examples_ref = ray.put(examples)
    trials = run_trials(cfg, folds_frame, examples_ref, version, storage, artifacts)
    echo(f"[train] {len(trials)} trials finished in {time.time() - started:.1f} s")

    out_dir = Path(tempfile.mkdtemp(prefix="lumbar-ray-train-"))
    files: dict[str, Path] = {}
    fold_ids = sorted(folds_frame["fold"].unique().tolist())
    cv_dirs = lambda job: [f"{artifacts}/{job}/{_fold_name(f)}" for f in fold_ids]  # noqa: E731
    report_lines = [f"lumbar-ray training run {version}", ""]
    table = pd.DataFrame()
    per_fold = pd.DataFrame()
    det_table = pd.DataFrame()
    metrics_card: dict[str, Any] = {}
    if SCORER in cfg.jobs():
        oof = _read_parquets(cv_dirs(SCORER), OOF_FILE)
        table, per_fold = scorer_metrics(oof, labels, folds_frame)
        oof.to_parquet(out_dir / "oof_scorer.parquet", index=False)
        table.to_parquet(out_dir / "metrics_scorer.parquet", index=False)
        per_fold.to_parquet(out_dir / "metrics_scorer_per_fold.parquet", index=False)
        plot_confusion_matrices(oof, str(out_dir / "confusion_scorer.png"), title=f"DeepScoreNet out-of-fold ({version})")
        for name in ("oof_scorer.parquet", "metrics_scorer.parquet", "metrics_scorer_per_fold.parquet", "confusion_scorer.png"):
            files[name] = out_dir / name
        report_lines += ["DeepScoreNet, out-of-fold, against baselines on the same rows:", format_metric_table(table), ""]
        metrics_card["scorer"] = table.to_dict(orient="records")
        metrics_card["scorer_per_fold"] = per_fold.to_dict(orient="records")
    det_jobs = [j for j in cfg.jobs() if j != SCORER]
    if det_jobs:
        records = pd.concat([_read_parquets(cv_dirs(j), OOF_FILE) for j in det_jobs], ignore_index=True)
        det_table = detector_metrics(records)
        if not records.empty:
            records.to_parquet(out_dir / "oof_detectors.parquet", index=False)
            det_table.to_parquet(out_dir / "metrics_detectors.parquet", index=False)
            files["oof_detectors.parquet"] = out_dir / "oof_detectors.parquet"
            files["metrics_detectors.parquet"] = out_dir / "metrics_detectors.parquet"
            report_lines += [("Detectors, out-of-fold (share of labelled targets on the right instance within 5/10 mm "
                              "in-plane; *_3d: within 5/10 mm of the labelled point in patient space):"),
                             det_table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), ""]
        metrics_card["detectors"] = det_table.to_dict(orient="records")
    from lumbar_ray.storage import filesystem_for

    if cfg.final_fit:
        shipped = {job: ALL_FOLDS for job in cfg.jobs()}
    else:
        best = best_folds(det_table, per_fold, fold_ids)
        shipped = {job: best.get(job, fold_ids[0]) for job in cfg.jobs()}
        echo("[train] no final fit: shipping each model's best-validated fold: "
             + ", ".join(f"{job} {_fold_name(f)}" for job, f in shipped.items()))
    for job, fold in shipped.items():
        fs, src = filesystem_for(f"{artifacts}/{job}/{_fold_name(fold)}/{weights_file(job)}")
        local = out_dir / weights_file(job)
        fs.get_file(src, str(local))
        files[weights_file(job)] = local
    shipped_names = {job: _fold_name(fold) for job, fold in shipped.items()}
    folds_frame.to_parquet(out_dir / "folds.parquet", index=False)
    files["folds.parquet"] = out_dir / "folds.parquet"
    report = "\n".join(report_lines)
    (out_dir / "cv_report.txt").write_text(report)
    files["cv_report.txt"] = out_dir / "cv_report.txt"
    priors = prior_baseline(labels[["study_id", "column", "label"]])
    card = {
        "name": "lumbar-ray",
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "git_commit": git_commit(),
        "config": cfg.to_dict(),
        "targets": targets_mod.as_records(),
        "input_spec": {
            "scorer": {"crop_px": 32, "channels": cfg.scorer.channels, "crop_mm": cfg.scorer.crop_mm,
                       "in_channels": int(examples.crops.shape[1]) if len(examples.crops) else 3,
                       "normalisation": "per-crop robust percentile scaling (scorer.normalize_crop)",
                       "classes": list(targets_mod.SEVERITIES)},
            "detectors": {j: {"series_type": series_type_of_job(j), "imgsz": cfg.detector.imgsz,
                              "box_mm": cfg.detector.box_mm, "classes": targets_mod.detector_class_names(series_type_of_job(j))}
                          for j in det_jobs},
        },
        "models": {j: weights_file(j) for j in cfg.jobs()},
        # one fold name when every model ships the same fold (the all-studies fit), else "per model"
        "shipped_fold": (next(iter(shipped_names.values())) if len(set(shipped_names.values())) == 1
                         else "per model"),
        "shipped_folds": shipped_names,
        "data": {"root": cfg.data, "split": cfg.split, "n_studies": int(labels["study_id"].nunique()),
                 "excluded_studies": sorted(int(s) for s in cfg.exclude_studies),
                 "n_labelled_points": int(len(points)), "fingerprint": data_fingerprint(cfg.data, cfg.split)},
        "metrics": metrics_card,
        "priors": {c: [float(v) for v in priors.loc[c].to_numpy()] for c in priors.index},
        "trials": [dataclasses.asdict(t) | {"metrics": None} for t in trials],
        "problems": examples.problems[:1000],
        "n_problems": len(examples.problems),
    }
    registry.publish(version, {k: str(v) for k, v in files.items()}, card)
    echo(f"[train] published {registry.url('versions', version)}")
    return TrainingOutcome(version, cfg.registry, table, det_table, trials, report, examples.problems, artifacts)
