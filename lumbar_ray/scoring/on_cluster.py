"""Score a list of studies with one model bundle as Ray tasks: chunks of studies, each chunk a task
that loads the bundle and runs the in-process loop (:func:`~lumbar_ray.scoring.study.score_in_process`,
the same per-study functions as the pipeline) on a worker, with a GPU when asked for.

For evaluations that need the rows in memory, not written outputs: training's out-of-fold end-to-end
CV (one bundle per fold) and retraining's holdout comparison. Why not in the driver: a retrain's
driver is the RayCronJob's head, which has neither a GPU nor CPUs to spare (``num-cpus: 0``); and
why not the Ray Data pipeline: it writes Parquet under an output lock, resumes, and loads one
registry version per run, while these need several bundles at once (one per fold) and no output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import ray

from lumbar_ray.scoring.pipeline import PROCESS_DIED, WORKER_CRASHED
from lumbar_ray.scoring.study import ERROR_COLUMNS, ModelBundle, score_in_process
from lumbar_ray.storage import ray_remote_args_with_storage_env

log = logging.getLogger(__name__)

# What a task calls to build its bundle: a picklable callable, e.g.
# functools.partial(ModelBundle.from_registry, "REGISTRY@v3") or a partial of ModelBundle.from_files.
BundleLoader = Callable[[], ModelBundle]
MAX_STUDIES_PER_TASK = 32


@dataclass(frozen=True)
class TaskResources:
    """Resources of one scoring task and how many studies it scores. ``num_gpus`` None: one GPU
    per task when the caller asks for GPUs (training with ``use_gpu``) or the cluster has GPUs
    now, else none (:func:`gpus_per_task`)."""

    studies_per_task: int = 8
    num_cpus: float = 1.0
    num_gpus: float | None = None
    # Times a task is tried again after its process died (a decoder crash, the OOM killer); then
    # its studies get a WorkerCrashed error row each.
    crash_retries: int = 1


def gpus_per_task(requested: float | None, use_gpu: bool = False) -> float:
    """The GPUs each task asks for: ``requested`` if given; else 1 with ``use_gpu`` (an
    autoscaling cluster may show no GPU until a task asks for one) or when the cluster has a GPU
    now, else 0."""
    if requested is not None:
        return float(requested)
    return 1.0 if use_gpu or ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def plan_tasks(studies_per_bundle: int, n_bundles: int = 1, use_gpu: bool = False,
               at_most: int = MAX_STUDIES_PER_TASK) -> TaskResources:
    """Resources for ``n_bundles`` bundles scoring up to ``studies_per_bundle`` studies each, all
    at once: a GPU per task as :func:`gpus_per_task` decides, and enough studies per task that
    every bundle's studies spread over its share of the cluster's task slots (its CPUs, or GPUs
    for GPU tasks), at most ``at_most`` (a task loads its bundle once: larger tasks load it fewer
    times)."""
    gpus = gpus_per_task(None, use_gpu)
    slots = ray.cluster_resources().get("GPU" if gpus else "CPU", 1) / max(gpus, 1.0)
    return TaskResources(studies_per_task=studies_per_task(studies_per_bundle, n_bundles, slots, at_most),
                         num_cpus=1.0, num_gpus=gpus)


def studies_per_task(studies_per_bundle: int, n_bundles: int, slots: float, at_most: int = MAX_STUDIES_PER_TASK) -> int:
    """Studies per task so that each of ``n_bundles`` bundles' ``studies_per_bundle`` studies
    spread over its share of ``slots`` tasks at a time, between 1 and ``at_most``."""
    tasks_per_bundle = max(1, int(slots) // max(1, n_bundles))
    return max(1, min(at_most, math.ceil(max(1, studies_per_bundle) / tasks_per_bundle)))


def chunks(study_ids: Sequence[str], size: int) -> list[list[str]]:
    """``study_ids`` in consecutive chunks of at most ``size`` (at least 1)."""
    size = max(1, int(size))
    ids = [str(s) for s in study_ids]
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def score_chunk(load_bundle: BundleLoader, root: str, study_ids: list[str], split: str,
                run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A Ray task: build the bundle here, on the worker, and score ``study_ids`` in process."""
    return score_in_process(load_bundle(), root, study_ids, split=split, run_id=run_id)


@dataclass
class PendingChunk:
    """One submitted task: its studies, the caller's tag (e.g. the fold) and its result's ref."""

    tag: Any
    study_ids: list[str]
    ref: Any


@dataclass
class ScoredChunks:
    """What the tasks of one or more bundles gave back, each row with its caller's ``tag``."""

    predictions: pd.DataFrame = field(default_factory=pd.DataFrame)
    errors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ERROR_COLUMNS + ["tag"]))

    def failed_studies(self) -> set[str]:
        """Studies with error rows and no prediction rows (they failed as a whole)."""
        scored = set(self.predictions["study_id"].astype(str)) if len(self.predictions) else set()
        return set(self.errors["study_id"].astype(str)) - scored if len(self.errors) else set()


def submit_scoring(load_bundle: BundleLoader, root: str, study_ids: Sequence[str], split: str,
                   resources: TaskResources, tag: Any = None, run_id: str = "cluster",
                   num_gpus: float | None = None) -> list[PendingChunk]:
    """Start one task per chunk of ``study_ids``; collect them with :func:`gather_scoring`.
    ``num_gpus`` overrides ``resources.num_gpus`` (None there: :func:`gpus_per_task`)."""
    gpus = num_gpus if num_gpus is not None else gpus_per_task(resources.num_gpus)
    task = ray.remote(score_chunk).options(
        num_cpus=resources.num_cpus, num_gpus=gpus,
        **ray_remote_args_with_storage_env(max_retries=max(0, resources.crash_retries)))
    return [PendingChunk(tag, chunk, task.remote(load_bundle, root, chunk, split, run_id))
            for chunk in chunks(study_ids, resources.studies_per_task)]


def gather_scoring(pending: Sequence[PendingChunk], crash_retries: int = 1,
                   echo: Callable[[str], None] = log.info) -> ScoredChunks:
    """Wait for every task of ``pending``. A task whose process died on every try gives each of
    its studies a ``WorkerCrashed`` error row (no predictions); any other exception (a bug, a
    model that does not load) propagates."""
    by_ref = {p.ref: p for p in pending}
    remaining = list(by_ref)
    predictions, errors = [], []
    done_studies, total = 0, sum(len(p.study_ids) for p in pending)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        chunk = by_ref[ready[0]]
        try:
            pred, err = ray.get(ready[0])
        except PROCESS_DIED as exc:
            err = pd.DataFrame([{"study_id": s, "series_id": None, "stage": "score", "error_type": WORKER_CRASHED,
                                 "message": (f"the scoring task died on each of {1 + max(0, crash_retries)} tries "
                                             f"({type(exc).__name__}): {exc}")[:1000],
                                 "model_version": None, "run_id": None, "recorded_at": pd.Timestamp.now(tz="UTC")}
                                for s in chunk.study_ids], columns=ERROR_COLUMNS)
            pred = pd.DataFrame()
            log.error("a scoring task of %d studies died on every try: %s", len(chunk.study_ids), exc)
        if len(pred):
            predictions.append(pred.assign(tag=[chunk.tag] * len(pred)))
        if len(err):
            errors.append(err.assign(tag=[chunk.tag] * len(err)))
        done_studies += len(chunk.study_ids)
        echo(f"[score on cluster] {done_studies}/{total} studies")
    out = ScoredChunks()
    if predictions:
        out.predictions = pd.concat(predictions, ignore_index=True)
    if errors:
        out.errors = pd.concat(errors, ignore_index=True)
    return out


def score_on_cluster(load_bundle: BundleLoader, root: str, study_ids: Sequence[str], split: str,
                     resources: TaskResources = TaskResources(), use_gpu: bool = False,
                     run_id: str = "cluster", echo: Callable[[str], None] = log.info) -> ScoredChunks:
    """Score ``study_ids`` of ``root`` with the bundle ``load_bundle`` builds, as Ray tasks
    (:func:`submit_scoring` + :func:`gather_scoring`). Needs ``ray.init``."""
    if not ray.is_initialized():
        raise RuntimeError("score_on_cluster needs a Ray runtime: call ray.init() first")
    gpus = gpus_per_task(resources.num_gpus, use_gpu)
    pending = submit_scoring(load_bundle, root, study_ids, split, resources, run_id=run_id, num_gpus=gpus)
    echo(f"[score on cluster] {len(study_ids)} studies in {len(pending)} tasks "
         f"({resources.num_cpus:g} CPU, {gpus:g} GPU each)")
    return gather_scoring(pending, resources.crash_retries, echo)

