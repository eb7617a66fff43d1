"""The Tune side of cross-validation: one Tune trial per (job, fold), each launching a
``TorchTrainer`` (Ray Train V2: ``Tuner(trainer)`` is deprecated) with a checkpoint per epoch and
a ``FailureConfig``, so a killed worker resumes from its last checkpoint."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lumbar_ray.config import SCORER, ResourceConfig, TrainConfig, series_type_of_job
from lumbar_ray.storage import filesystem_for, ray_storage
from lumbar_ray.training.artifacts import ALL_FOLDS, STATE_FILE, fold_dir, fold_name
from lumbar_ray.training.detector_loop import detector_worker_loop
from lumbar_ray.training.scorer_loop import scorer_worker_loop


@dataclass
class TrialSummary:
    job: str
    fold: int
    started: float
    finished: float
    node_ip: str
    node_id: str  # the node of the trial's rank-0 training worker
    metrics: dict[str, Any]


def worker_loop_for(job: str) -> Callable[[dict], None]:
    """The TorchTrainer loop of a job: DeepScoreNet's, or the detector's for a detector job."""
    if job == SCORER:
        return scorer_worker_loop
    series_type_of_job(job)  # raises for unknown jobs
    return detector_worker_loop


def fold_trial(config: dict) -> None:
    """A Tune function trial. Launches the TorchTrainer of one (job, fold) and copies its final
    checkpoint's artefacts to ``{artifacts}/{job}/{fold name}/``."""
    job, fold = config["job"], config["fold"]
    res = config["resources"]
    resources_per_worker = {"CPU": res["cpus_per_worker"]}
    if res["use_gpu"]:
        resources_per_worker["GPU"] = res["gpus_per_worker"]
    storage_path, storage_filesystem = ray_storage(config["storage_path"])
    started = time.time()
    trainer = TorchTrainer(
        worker_loop_for(job),
        train_loop_config={**config["worker"], "job": job, "fold": fold},
        scaling_config=ScalingConfig(num_workers=res["workers_per_trial"], use_gpu=res["use_gpu"],
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=f"{config['run_name']}-{job}-{fold_name(fold)}", storage_path=storage_path,
                             storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=config["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    finished = time.time()
    copy_checkpoint_artifacts(result.checkpoint, fold_dir(config["artifacts"], job, fold))
    tune.report({"job": job, "fold": fold, "started": started, "finished": finished,
                 "node_ip": ray.util.get_node_ip_address(), "node_id": result.metrics.get("node_id", ""),
                 "device": result.metrics.get("device", ""),
                 **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}})


def copy_checkpoint_artifacts(checkpoint, out_dir: str) -> None:
    """Every file of ``checkpoint`` but its resume state, to ``out_dir`` (local or a URL)."""
    fs, out_path = filesystem_for(out_dir)
    fs.makedirs(out_path, exist_ok=True)
    with checkpoint.as_directory() as directory:
        for name in os.listdir(directory):
            if name != STATE_FILE:
                fs.put_file(os.path.join(directory, name), f"{out_path}/{name}")


def max_concurrent_trials(res: ResourceConfig) -> int:
    """As many trials as the cluster's CPUs (GPUs with ``use_gpu``) hold at once, unless set."""
    cluster = ray.cluster_resources()
    if res.use_gpu:
        per_trial = res.workers_per_trial * res.gpus_per_worker
        capacity = int(cluster.get("GPU", 0) // per_trial)
    else:
        per_trial = res.workers_per_trial * res.cpus_per_worker
        capacity = int(cluster.get("CPU", 1) // per_trial)
    return res.max_concurrent_trials or max(1, capacity)


def worker_config(cfg: TrainConfig, folds_frame: pd.DataFrame, examples_ref, init_refs: dict | None = None) -> dict:
    """What every trial's worker loop is given (the trial adds its job and fold). ``init_refs``:
    job -> object ref of the weights file it starts from (a warm start)."""
    return {
        "scorer": dataclasses.asdict(cfg.scorer),
        "detector": dataclasses.asdict(cfg.detector),
        "folds": {int(s): int(f) for s, f in zip(folds_frame["study_id"], folds_frame["fold"])},
        "examples_ref": [examples_ref],
        # refs inside lists: Tune's param_space would otherwise try to resolve them as search spaces
        "init_refs": {job: [ref] for job, ref in (init_refs or {}).items()},
        "seed": cfg.seed,
        "data": cfg.data,
        "split": cfg.split,
        "threads": max(1, int(cfg.resources.cpus_per_worker)),
    }


def run_trials(cfg: TrainConfig, folds_frame: pd.DataFrame, examples_ref, run_name: str, storage_path: str,
               artifacts: str, init_refs: dict | None = None) -> list[TrialSummary]:
    """One trial per (job, fold) — every CV fold, plus :data:`ALL_FOLDS` with ``final_fit`` —
    run concurrently; raises if any trial failed."""
    res = cfg.resources
    fold_ids = sorted(folds_frame["fold"].unique().tolist()) + ([ALL_FOLDS] if cfg.final_fit else [])
    param_space = {
        "job": tune.grid_search(cfg.jobs()),
        "fold": tune.grid_search(fold_ids),
        "worker": worker_config(cfg, folds_frame, examples_ref, init_refs),
        "resources": dataclasses.asdict(res),
        "run_name": run_name,
        "storage_path": storage_path,
        "artifacts": artifacts,
        "max_failures": cfg.max_failures,
    }
    # The trial itself only waits on its TorchTrainer: it holds no CPU, so trials run concurrently
    # up to what the workers' resources allow.
    trainable = tune.with_resources(fold_trial, {"cpu": 0, "memory": res.trial_memory_mb * 1024 * 1024})
    tune_path, tune_filesystem = ray_storage(storage_path)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials(res)),
        run_config=tune.RunConfig(name=f"{run_name}-cv", storage_path=tune_path, storage_filesystem=tune_filesystem,
                                  verbose=0),
    )
    return trial_summaries(tuner.fit())


def trial_summaries(grid) -> list[TrialSummary]:
    """One summary per finished trial of a Tune result grid; raises listing the failed ones."""
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
