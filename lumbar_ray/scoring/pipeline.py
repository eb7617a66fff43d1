"""Bulk scoring on Ray Data: studies -> read (CPU tasks) -> detectors (actor pool) -> DeepScoreNet
(actor pool) -> 25 rows per study -> Parquet, resumable.

The unit of streaming is the study: each row of the dataset is one study all the way through,
so per-study aggregation needs no shuffle. The driver writes each finished batch of studies as
whole Parquet part files (atomic), so a killed run keeps what it wrote and a rerun skips every
study already in the output for that model version.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import ray

from lumbar_ray.config import ScoreConfig
from lumbar_ray.dicom.read import list_studies, load_descriptions, read_study
from lumbar_ray.models.compat import check_version
from lumbar_ray.models.registry import ModelRegistry, parse_model_spec
from lumbar_ray.outputs.catalog import series_rows
from lumbar_ray.outputs.store import OutputWriter, scored_studies
from lumbar_ray.outputs.worklist import study_worklist
from lumbar_ray.scoring.output_lock import OutputLock
from lumbar_ray.scoring.study import (
    ModelBundle,
    detect_study,
    error_frame,
    error_row,
    grade_crops,
    is_out_of_memory,
    is_study_failure,
    require_readable,
    study_rows,
)
from lumbar_ray.storage import is_transient, ray_remote_args_with_storage_env

log = logging.getLogger(__name__)


@dataclass
class StudyItem:
    """What travels between stages for one study. Ray Data stores it as one Python object, never
    None (Arrow would turn a missing object into NaN): each field may be None instead."""

    study_id: str
    study: Any = None  # dicom.read.Study after reading
    detected: Any = None  # study.DetectedStudy after detection
    error: dict | None = None  # an errors-table row when the study failed as a whole
    predictions: pd.DataFrame | None = None  # the 25 rows after grading
    errors: pd.DataFrame | None = None  # the errors-table rows after grading
    # the series catalog rows, built by the read stage (a few small dicts, not the volumes)
    series: list[dict] | None = None


def pack_volumes(study) -> Any:
    """Store each series' volume as int16 when that is lossless, in place; returns the study.

    Why: a decoded study crosses the object store from its read task to a detector actor as
    float32 (~50 MB for a full-size study); MRI pixels are integers well inside int16, so the
    copy, the pickling and the backlog in memory halve. The detector (preprocessing) and the
    crops read integer volumes as the same float32 values, so the results are unchanged.
    """
    for series in study.series.values():
        volume = series.volume
        if volume.dtype != np.float32 or volume.size == 0:
            continue
        lo, hi = float(volume.min()), float(volume.max())  # NaN makes both comparisons false
        if not (-32768.0 <= lo and hi <= 32767.0):
            continue
        packed = volume.astype(np.int16)
        if np.array_equal(packed, volume):
            series.volume = packed
    return study


def failure_row(study_id: str, stage: str, exc: BaseException) -> dict:
    """The errors-table row of a study that failed as a whole, with ``retryable``: true when
    storage failed transiently (after its bounded retries, StorageUnavailableError; or a raw
    timeout/reset/5xx from a call outside them). Such a study is not counted as scored, so the
    next run of the same command scores it."""
    return {**error_row(study_id, stage, exc), "retryable": is_transient(exc)}


def error_rows_frame(rows: list[dict], version: str, run_id: str, recorded_at: pd.Timestamp) -> pd.DataFrame:
    """:func:`error_frame` with each row's ``retryable`` (false where a row has none)."""
    frame = error_frame(rows, version, run_id, recorded_at)
    frame["retryable"] = [bool(row.get("retryable", False)) for row in rows]
    return frame


def read_study_row(row: dict, root: str, split: str, descriptions: pd.DataFrame | None) -> dict:
    """A read task over one study: its row, with a StudyItem holding the study or its error."""
    study_id = str(row["study_id"])
    catalog = None
    try:
        study = read_study(root, study_id, split=split, descriptions=descriptions)
        catalog = series_rows(study)  # before the check: a study with nothing readable lists its folders too
        require_readable(study)
        item = StudyItem(study_id, study=pack_volumes(study), series=catalog)
    except Exception as exc:  # recorded: one bad study must not stop the job; a bug propagates
        if not is_study_failure(exc):
            raise
        item = StudyItem(study_id, error=failure_row(study_id, "read", exc), series=catalog)
    return {"study_id": study_id, "item": item}


def read_study_rows(batch: dict[str, np.ndarray], root: str, split: str, descriptions: pd.DataFrame | None) -> dict:
    """A read task over several studies: one row (and one StudyItem) per study, as above."""
    rows = [read_study_row({"study_id": s}, root, split, descriptions) for s in batch["study_id"]]
    return {"study_id": np.array([r["study_id"] for r in rows]), "item": object_array([r["item"] for r in rows])}


class DetectStage:
    """Actor: loads the three detectors once (not DeepScoreNet); all slices of a series go in
    batched passes."""

    def __init__(self, models: str, slice_batch: int = 32):
        self.bundle = ModelBundle.from_registry(models, parts=("detectors",))
        self.slice_batch = slice_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = []
        for item in batch["item"]:
            if item.study is not None:
                try:
                    item.detected = detect_study(self.bundle, item.study, batch_size=self.slice_batch)
                except Exception as exc:  # a bad study, or out of memory in batches of one; a bug propagates
                    if not is_study_failure(exc):
                        raise
                    item.error = failure_row(item.study_id, "detect", exc)
                item.study = None  # the volumes are not needed downstream
            items.append(item)
        return {"study_id": batch["study_id"], "item": object_array(items)}


class ScoreStage:
    """Actor: loads DeepScoreNet once (not the detectors: no Ultralytics import); grades the
    crops of a batch of studies in one pass."""

    def __init__(self, models: str, run_id: str):
        self.bundle = ModelBundle.from_registry(models, parts=("scorer",))
        self.run_id = run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        now = pd.Timestamp.now(tz="UTC")
        version, items = self.bundle.version, list(batch["item"])
        probs = self.grade(items)
        offset = 0
        for item in items:
            detected = item.detected
            if detected is None:
                item.errors = error_rows_frame([item.error], version, self.run_id, now)
                continue
            n = len(detected.crops)
            item.predictions = study_rows(detected, probs[offset:offset + n], version, self.bundle.priors,
                                          self.run_id, now, self.bundle.temperatures)
            offset += n
            item.errors = error_rows_frame(detected.errors, version, self.run_id, now)
            item.detected = None
        return {"study_id": batch["study_id"], "item": object_array(items)}

    def grade(self, items: list[StudyItem]) -> np.ndarray:
        """The probabilities of the crops of every detected study of ``items``, in one pass. When
        even batches of one crop run out of memory, each of those studies gets that error as its
        row instead (stage "score"; the crops are not one study's fault, so none is scored, and the
        row is retryable: the next run of the same command scores them, with their detection's
        own rows then)."""
        ready = [item.detected for item in items if item.detected is not None]
        crops = np.concatenate([d.crops for d in ready]) if ready else np.zeros((0, 3, 32, 32), np.float32)
        try:
            return grade_crops(self.bundle, crops)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            for item in items:
                if item.detected is not None:
                    item.error = {**failure_row(item.study_id, "score", exc), "retryable": True}
                    item.detected = None
            return np.zeros((0, 3), np.float32)


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (np.array would try to stack dataclasses' fields)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


@dataclass
class ScoreSummary:
    run_id: str
    model_version: str
    n_listed: int
    n_skipped_done: int
    n_scored: int
    n_with_errors: int
    n_failed: int
    seconds: float
    prediction_rows: int
    problems: list[str] = field(default_factory=list)
    # Of n_failed: studies whose only rows are retryable (storage failed transiently); the next
    # run of the same command scores them.
    n_retryable: int = 0
    # Of n_failed: studies that killed their worker process on every try (error_type WorkerCrashed).
    crashed: list[str] = field(default_factory=list)

    @property
    def studies_per_s(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else float("nan")


def actor_crash_bounds(cfg: ScoreConfig, n_studies: int) -> dict[str, int]:
    """``max_task_retries`` and ``max_restarts`` of a stage's actors. Ray Data's defaults (-1,
    -1) retry a batch whose actor died for ever: one study that kills its process (a decoder
    crash, the OOM killer) would loop. A batch is tried ``1 + crash_retries`` times; then it
    fails, the run drops it (``max_errored_blocks``) and scores its studies one at a time
    (:func:`score_alone`). Restarts are bounded too, by what those tries can use up (every
    block holds at least one study): in Ray 2.60 an actor past its ``max_restarts`` stays dead
    in its pool and is never replaced, so a smaller bound would leave the run waiting for ever."""
    tries = 1 + max(0, cfg.crash_retries)
    return {"max_task_retries": tries - 1, "max_restarts": tries * max(1, n_studies)}


def build_dataset(cfg: ScoreConfig, study_ids: list[str], run_id: str, descriptions: pd.DataFrame | None):
    """The Ray Data plan (lazy): read -> detect -> score. A batch that fails for good (its
    process died on every try) is dropped, not fatal: the driver scores its studies again."""
    ds = ray.data.from_items([{"study_id": s} for s in study_ids], override_num_blocks=max(1, len(study_ids)))
    read_kwargs = {"root": cfg.input, "split": cfg.split, "descriptions": descriptions}
    read_args = ray_remote_args_with_storage_env(max_retries=max(0, cfg.crash_retries))
    if cfg.read_batch_studies > 1:
        ds = ds.map_batches(read_study_rows, fn_kwargs=read_kwargs, batch_size=cfg.read_batch_studies,
                            batch_format="numpy", num_cpus=cfg.read_cpus, **read_args)
    else:
        ds = ds.map(read_study_row, fn_kwargs=read_kwargs, num_cpus=cfg.read_cpus, **read_args)
    actor_args = ray_remote_args_with_storage_env(**actor_crash_bounds(cfg, len(study_ids)))
    ds = ds.map_batches(DetectStage, fn_constructor_kwargs={"models": cfg.models, "slice_batch": cfg.slice_batch},
                        compute=ray.data.ActorPoolStrategy(size=cfg.detector_pool), num_gpus=cfg.detector_gpus,
                        num_cpus=cfg.detector_cpus, batch_size=cfg.detector_batch_studies, batch_format="numpy",
                        **actor_args)
    ds = ds.map_batches(ScoreStage, fn_constructor_kwargs={"models": cfg.models, "run_id": run_id},
                        compute=ray.data.ActorPoolStrategy(size=cfg.scorer_pool), num_gpus=cfg.scorer_gpus,
                        num_cpus=cfg.scorer_cpus, batch_size=cfg.scorer_batch_studies, batch_format="numpy",
                        **actor_args)
    # Every dropped batch's studies are scored again alone (score_holding_lock): nothing is lost,
    # and a bug (which fails every batch) still surfaces there, from the first study.
    ds.context.max_errored_blocks = -1
    # Each row carries a StudyItem, which Arrow cannot hold: Ray Data stores such columns as
    # pickled objects by design. Saying so (instead of leaving the setting unset) keeps it from
    # logging "Failed to convert column 'item' into pyarrow array" in every worker of every job.
    ds.context.enable_fallback_to_arrow_object_ext_type = True
    if cfg.buffer_mb and cfg.buffer_mb > 0:
        # The dataset's own copy of the DataContext: other datasets of this driver keep theirs.
        ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=float(cfg.buffer_mb) * 2**20)
    return ds


def studies_to_score(cfg: ScoreConfig, model_version: str) -> tuple[list[str], int, int, pd.DataFrame | None]:
    """(studies to score now, studies listed, studies already done for this version, descriptions)."""
    listed = [str(s) for s in (cfg.study_ids or list_studies(cfg.input, split=cfg.split))]
    done = scored_studies(cfg.out, model_version, include_errors=not cfg.retry_errors)
    todo = [s for s in listed if s not in done]
    n_done = len(listed) - len(todo)
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    return todo, len(listed), n_done, load_descriptions(cfg.input, cfg.split)


def run_scoring(cfg: ScoreConfig, echo: Callable[[str], None] = log.info) -> ScoreSummary:
    """Score every study of ``cfg.input`` not yet in ``cfg.out`` for this model version."""
    if not ray.is_initialized():
        raise RuntimeError("run_scoring needs a Ray runtime: call ray.init() first (jobs/score.py does)")
    root, version = parse_model_spec(cfg.models)
    registry = ModelRegistry(root)
    model_version = registry.resolve(version)
    # Every weight file against the card, here and before the output is touched: a version that
    # does not fit stops the run with one message naming the file, instead of failing in every
    # actor (or scoring with the wrong classes) after the lock and the listing.
    checked = check_version(registry, model_version)
    echo(f"[score] model {model_version}: {len(checked)} weight files fit the card's architecture")
    # Pin the version so every actor loads the same one even if the champion moves meanwhile.
    cfg = dataclasses.replace(cfg, models=f"{root}@{model_version}")
    run_id = cfg.run_id or time.strftime("r%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    # One run per output at a time; taken before listing what is done, so that two runs can
    # never both decide to score the same study.
    with OutputLock(cfg.out, run_id, wait_s=cfg.lock_wait_s) as lock:
        return score_holding_lock(cfg, run_id, model_version, lock, echo)


@dataclass
class PartFiles:
    """The finished studies of a run not yet written, and the run's counts: each flush writes
    them as one part file per table."""

    writer: OutputWriter
    lock: OutputLock
    n_scored: int = 0
    n_with_errors: int = 0
    n_failed: int = 0
    n_retryable: int = 0  # of n_failed: only retryable error rows (storage failed transiently)
    crashed: list[str] = field(default_factory=list)  # of n_failed: killed their process (WorkerCrashed)
    rows: int = 0
    pending: int = 0  # studies since the last flush
    predictions: list[pd.DataFrame] = field(default_factory=list)
    errors: list[pd.DataFrame] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)

    def add(self, item: StudyItem) -> None:
        preds, errs = item.predictions, item.errors
        self.series.extend(item.series or [])
        if preds is not None:
            self.predictions.append(preds)
            self.rows += len(preds)
            self.n_scored += 1
            self.n_with_errors += int(errs is not None and len(errs) > 0)
        else:
            self.n_failed += 1
            retryable = errs["retryable"] if errs is not None and "retryable" in errs else None
            self.n_retryable += int(retryable is not None and len(retryable) > 0 and bool(retryable.all()))
            if item.error is not None and item.error.get("error_type") == WORKER_CRASHED:
                self.crashed.append(item.study_id)
        if errs is not None and len(errs):
            self.errors.append(errs)
        self.pending += 1

    def flush(self) -> None:
        if self.pending:
            self.lock.check()  # another run took the output over: stop before writing anything twice
            predictions = pd.concat(self.predictions, ignore_index=True) if self.predictions else None
            errors = pd.concat(self.errors, ignore_index=True) if self.errors else None
            # The worklist rows of the scored studies, in the same flush: resume and the lock cover them.
            studies = study_worklist(predictions, errors) if predictions is not None else None
            self.writer.write(predictions, errors, studies=studies,
                              series=pd.DataFrame(self.series) if self.series else None)
        self.pending, self.predictions, self.errors, self.series = 0, [], [], []


def score_holding_lock(cfg: ScoreConfig, run_id: str, model_version: str, lock: OutputLock,
                       echo: Callable[[str], None]) -> ScoreSummary:
    """The body of :func:`run_scoring`, run while ``lock`` holds the output."""
    todo, n_listed, n_done, descriptions = studies_to_score(cfg, model_version)
    echo(f"[score] {n_listed} studies listed, {n_done} already scored by {model_version}; "
         f"scoring {len(todo)} (run {run_id})")
    parts = PartFiles(OutputWriter(cfg.out, run_id, model_version), lock)
    started = time.time()
    if todo:
        seen: set[str] = set()
        for batch in build_dataset(cfg, todo, run_id, descriptions).iter_batches(batch_size=None,
                                                                                 batch_format="numpy"):
            for item in batch["item"]:
                parts.add(item)
                seen.add(item.study_id)
            if parts.pending >= cfg.flush_studies:
                parts.flush()
                done = parts.n_scored + parts.n_failed
                echo(f"[score] {done}/{len(todo)} studies, {done / max(time.time() - started, 1e-9):.2f} studies/s")
        parts.flush()
        dropped = [s for s in todo if s not in seen]
        if dropped:
            echo(f"[score] {len(dropped)} studies were in batches whose worker process died on every try; "
                 "scoring them one at a time")
            for study_id in dropped:
                parts.add(score_alone(cfg, study_id, run_id, model_version, descriptions))
                if parts.pending >= cfg.flush_studies:
                    parts.flush()
            parts.flush()
    parts.writer.close()
    seconds = time.time() - started
    summary = ScoreSummary(run_id, model_version, n_listed, n_done, parts.n_scored, parts.n_with_errors,
                           parts.n_failed, seconds, parts.rows, n_retryable=parts.n_retryable,
                           crashed=parts.crashed)
    echo(f"[score] done: {parts.n_scored} scored ({parts.n_with_errors} with recorded problems), "
         f"{parts.n_failed} failed ({parts.n_retryable} of them transiently: storage; {len(parts.crashed)} "
         f"killed their worker process), {parts.rows} prediction rows in {seconds:.1f} s -> {cfg.out}")
    return summary


# Ray's errors for a task whose process died under it: a crash (os._exit, SIGSEGV, SIGKILL), Ray's
# memory monitor or the kernel's OOM killer, a lost node.
PROCESS_DIED = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError,
                ray.exceptions.RayActorError)
WORKER_CRASHED = "WorkerCrashed"  # error_type of a study that killed its process on every try


def detect_alone(models: str, slice_batch: int, item: StudyItem) -> StudyItem:
    """A Ray task: :class:`DetectStage` (its models loaded here) over the one study ``item``."""
    return DetectStage(models, slice_batch)({"study_id": np.array([item.study_id]), "item": object_array([item])})["item"][0]


def score_alone_stage(models: str, run_id: str, item: StudyItem) -> StudyItem:
    """A Ray task: :class:`ScoreStage` (its model loaded here) over the one study ``item``."""
    return ScoreStage(models, run_id)({"study_id": np.array([item.study_id]), "item": object_array([item])})["item"][0]


def score_alone(cfg: ScoreConfig, study_id: str, run_id: str, model_version: str,
                descriptions: pd.DataFrame | None) -> StudyItem:
    """One study of a dropped batch, on its own: read, detect and score, each a Ray task with the
    stage's resources, tried ``1 + crash_retries`` times when its process dies. A study that
    kills its process on every try gets one error row (``WorkerCrashed``, the stage that died,
    not retryable) and no predictions; its batch-mates are scored as in the pipeline. Models are
    loaded per task: slow, but only for the few studies of a failed batch."""
    retries = {"max_retries": max(0, cfg.crash_retries)}
    stage, catalog = "read", None
    try:
        read = ray.remote(read_study_row).options(num_cpus=cfg.read_cpus, **ray_remote_args_with_storage_env(**retries))
        item = ray.get(read.remote({"study_id": study_id}, cfg.input, cfg.split, descriptions))["item"]
        catalog = item.series  # kept: the process that dies later takes the item with it
        if item.study is not None:
            stage = "detect"
            detect = ray.remote(detect_alone).options(num_cpus=cfg.detector_cpus, num_gpus=cfg.detector_gpus,
                                                      **ray_remote_args_with_storage_env(**retries))
            item = ray.get(detect.remote(cfg.models, cfg.slice_batch, item))
        if item.detected is None:  # failed as a whole: its row needs no model
            item.errors = error_rows_frame([item.error], model_version, run_id, pd.Timestamp.now(tz="UTC"))
            return item
        stage = "score"
        grade = ray.remote(score_alone_stage).options(num_cpus=cfg.scorer_cpus, num_gpus=cfg.scorer_gpus,
                                                      **ray_remote_args_with_storage_env(**retries))
        return ray.get(grade.remote(cfg.models, run_id, item))
    except PROCESS_DIED as exc:
        row = {"study_id": study_id, "series_id": None, "stage": stage, "error_type": WORKER_CRASHED,
               "message": (f"the {stage} process died on each of {1 + max(0, cfg.crash_retries)} tries with this "
                           f"study alone ({type(exc).__name__}): {exc}")[:1000],
               # a lost node is not the study's doing: the next run scores it again
               "retryable": isinstance(exc, ray.exceptions.NodeDiedError)}
        log.error("study %s killed its %s process on every try; recorded as %s", study_id, stage, WORKER_CRASHED)
        return StudyItem(study_id, error=row, series=catalog,
                         errors=error_rows_frame([row], model_version, run_id, pd.Timestamp.now(tz="UTC")))
