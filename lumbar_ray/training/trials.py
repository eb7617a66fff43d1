"""The Tune side of cross-validation: one Tune trial per (job, fold), each launching a
``TorchTrainer`` (Ray Train V2: ``Tuner(trainer)`` is deprecated) with a checkpoint per epoch and
a ``FailureConfig``, so a killed worker resumes from its last checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lumbar_ray.config import SCORER, ResourceConfig, TrainConfig, series_type_of_job
from lumbar_ray.storage import filesystem_for, ray_storage
from lumbar_ray.training.artifacts import ALL_FOLDS, HISTORY_FILE, STATE_FILE, fold_dir, fold_name
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


# A retry's seed: the run's seed + this x the attempt number (another initialisation and data
# order, reproducible, and far from the seeds of other runs' first attempts).
RETRY_SEED_OFFSET = 1000
# The keys of a fold's outcome (worker loops' last report) that its trial reports and the card keeps.
OUTCOME_KEYS = ("best_epoch", "best_value", "selection_metric", "shipped_epoch", "epochs_trained",
                "stopped_early", "validation_rounds", "collapsed", "collapse_reason")


def fold_trial(config: dict) -> None:
    """A Tune function trial. Launches the TorchTrainer of one (job, fold), and again with another
    seed while its detector collapses (:func:`~lumbar_ray.training.detector_eval.collapsed`,
    up to ``collapse_retries`` times), then copies the shipped attempt's final checkpoint's
    artefacts to ``{artifacts}/{job}/{fold name}/`` — its history with every attempt's."""
    job, fold = config["job"], config["fold"]
    started = time.time()
    seed = int(config["worker"]["seed"])
    retries = 0 if job == SCORER else int(config["worker"]["detector"].get("collapse_retries", 0))
    results, outcomes = [], []
    while not outcomes or (outcomes[-1]["collapsed"] and len(outcomes) <= retries):
        attempt = len(outcomes)
        result = fit_attempt(config, attempt, seed + RETRY_SEED_OFFSET * attempt)
        results.append(result)
        outcomes.append({**{k: result.metrics.get(k) for k in OUTCOME_KEYS}, "attempt": attempt,
                         "seed": seed + RETRY_SEED_OFFSET * attempt})
    shipped = shipped_attempt(outcomes)
    history = merged_history([checkpoint_history(r.checkpoint) for r in results], outcomes, shipped)
    finished = time.time()
    result = results[shipped]
    copy_checkpoint_artifacts(result.checkpoint, fold_dir(config["artifacts"], job, fold),
                              replace={HISTORY_FILE: json.dumps(history).encode()} if len(results) > 1 else None)
    tune.report({"job": job, "fold": fold, "started": started, "finished": finished,
                 "node_ip": ray.util.get_node_ip_address(), "node_id": result.metrics.get("node_id", ""),
                 "device": result.metrics.get("device", ""),
                 **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
                 **{k: v for k, v in outcomes[shipped].items() if v is not None},
                 "attempts": len(outcomes), "shipped_attempt": shipped,
                 "retry_reasons": [o["collapse_reason"] for o in outcomes[:-1]]})


def fit_attempt(config: dict, attempt: int, seed: int):
    """One TorchTrainer run of the trial's (job, fold) with ``seed``; attempt k > 0 (a retry)
    has its own run name, so its checkpoints never mix with (or resume from) the first's."""
    job, fold = config["job"], config["fold"]
    res = config["resources"]
    resources_per_worker = {"CPU": res["cpus_per_worker"]}
    if res["use_gpu"]:
        resources_per_worker["GPU"] = res["gpus_per_worker"]
    storage_path, storage_filesystem = ray_storage(config["storage_path"])
    name = f"{config['run_name']}-{job}-{fold_name(fold)}" + (f"-retry{attempt}" if attempt else "")
    trainer = TorchTrainer(
        worker_loop_for(job),
        train_loop_config={**config["worker"], "job": job, "fold": fold, "seed": seed},
        scaling_config=ScalingConfig(num_workers=res["workers_per_trial"], use_gpu=res["use_gpu"],
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=config["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def shipped_attempt(outcomes: list[dict]) -> int:
    """The attempt a fold ships: the first that did not collapse (a retry runs only after a
    collapse, so that is the last one run), else the first (every attempt found nothing)."""
    return next((i for i, o in enumerate(outcomes) if not o.get("collapsed")), 0)


def merged_history(histories: list[list[dict]], outcomes: list[dict], shipped: int) -> list[dict]:
    """One history for a fold trained more than once: each attempt's rows tagged with its
    number, each retry preceded by a ``retry`` event with its seed and the reason, and last a
    ``shipped`` event naming the attempt whose files the fold holds."""
    merged: list[dict] = []
    for attempt, (rows, outcome) in enumerate(zip(histories, outcomes)):
        if attempt:
            merged.append({"event": "retry", "attempt": attempt, "seed": outcome["seed"],
                           "reason": f"attempt {attempt - 1} collapsed: {outcomes[attempt - 1]['collapse_reason']}"})
        merged += [{**row, "attempt": attempt} for row in rows]
    merged.append({"event": "shipped", "attempt": shipped, "seed": outcomes[shipped]["seed"],
                   "collapsed": bool(outcomes[shipped]["collapsed"])})
    return merged


def checkpoint_history(checkpoint) -> list[dict]:
    """The epoch history a checkpoint holds (:data:`HISTORY_FILE`)."""
    with checkpoint.as_directory() as directory:
        return json.loads(Path(directory, HISTORY_FILE).read_text())


def copy_checkpoint_artifacts(checkpoint, out_dir: str, replace: dict[str, bytes] | None = None) -> None:
    """Every file of ``checkpoint`` but its resume state, to ``out_dir`` (local or a URL);
    ``replace``: file name -> the bytes written instead of the checkpoint's file."""
    fs, out_path = filesystem_for(out_dir)
    fs.makedirs(out_path, exist_ok=True)
    replace = replace or {}
    with checkpoint.as_directory() as directory:
        for name in os.listdir(directory):
            if name in replace:
                fs.pipe_file(f"{out_path}/{name}", replace[name])
            elif name != STATE_FILE:
                fs.put_file(os.path.join(directory, name), f"{out_path}/{name}")


def fold_outcomes(trials: list[TrialSummary]) -> dict[str, dict[str, dict[str, Any]]]:
    """The model card's record of each (job, fold): which epoch shipped and why (the best
    validation round and its value; the last epoch of the all-studies fit), whether patience
    stopped it early, whether it collapsed, and its retries with their seeds and reasons."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for t in sorted(trials, key=lambda t: (t.job, t.fold)):
        m = t.metrics
        best_epoch, best_value = m.get("best_epoch", -1), m.get("best_value")
        out.setdefault(t.job, {})[fold_name(t.fold)] = {
            "selection_metric": m.get("selection_metric") or None,
            "best_epoch": int(best_epoch) if best_epoch is not None and best_epoch >= 0 else None,
            "best_value": float(best_value) if best_value is not None and math.isfinite(best_value) else None,
            "shipped_epoch": m.get("shipped_epoch"),
            "epochs_trained": m.get("epochs_trained"),
            "stopped_early": bool(m.get("stopped_early", False)),
            "collapsed": bool(m.get("collapsed", False)),
            "attempts": int(m.get("attempts", 1)),
            "shipped_attempt": int(m.get("shipped_attempt", 0)),
            "seed": m.get("seed"),
            "retry_reasons": list(m.get("retry_reasons") or []),
        }
    return out


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


def worker_config(cfg: TrainConfig, folds_frame: pd.DataFrame, examples: str, init_refs: dict | None = None) -> dict:
    """What every trial's worker loop is given (the trial adds its job and fold). ``init_refs``:
    job -> object ref of the weights file it starts from (a warm start)."""
    return {
        "scorer": dataclasses.asdict(cfg.scorer),
        "detector": dataclasses.asdict(cfg.detector),
        "folds": {int(s): int(f) for s, f in zip(folds_frame["study_id"], folds_frame["fold"])},
        "examples": examples,  # the run's example shards (training/shards.py): each trial reads its own
        # refs inside lists: Tune's param_space would otherwise try to resolve them as search spaces
        "init_refs": {job: [ref] for job, ref in (init_refs or {}).items()},
        "seed": cfg.seed,
        "data": cfg.data,
        "split": cfg.split,
        "threads": max(1, int(cfg.resources.cpus_per_worker)),
    }


def run_trials(cfg: TrainConfig, folds_frame: pd.DataFrame, examples: str, run_name: str, storage_path: str,
               artifacts: str, init_refs: dict | None = None) -> list[TrialSummary]:
    """One trial per (job, fold) — every CV fold, plus :data:`ALL_FOLDS` with ``final_fit`` —
    run concurrently; raises if any trial failed."""
    res = cfg.resources
    fold_ids = sorted(folds_frame["fold"].unique().tolist()) + ([ALL_FOLDS] if cfg.final_fit else [])
    param_space = {
        "job": tune.grid_search(cfg.jobs()),
        "fold": tune.grid_search(fold_ids),
        "worker": worker_config(cfg, folds_frame, examples, init_refs),
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
