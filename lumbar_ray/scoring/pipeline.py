"""Bulk scoring on Ray Data: studies -> read (CPU tasks) -> detectors (actor pool) -> DeepScoreNet
(actor pool) -> 25 rows per study -> Parquet, resumable.

The unit of streaming is the study: each row of the dataset is one study all the way through,
so per-study aggregation needs no shuffle. The driver writes each finished batch of studies as
whole Parquet part files (atomic), so a killed run keeps what it wrote and a rerun skips every
study already in the output for that model version.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import pandas as pd

from lumbar_ray.scoring import study as scoring
from lumbar_ray.scoring.output_lock import OutputLock

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    input: str  # data root (local or s3://)
    models: str  # REGISTRY[@version]
    out: str  # output root (local or s3://)
    split: str = "test"
    run_id: str | None = None
    # Resources: the same code on a laptop's CPUs or on GPUs.
    # Half a CPU per read task: on a small machine a read then fits beside one detector actor
    # (1 CPU) and one scorer (0.5) and overlaps with detection, instead of being fused into the
    # detector actor as Ray Data does when both ask for the same resources (`make bench`, 2 cores,
    # 80 studies, 3 rounds each: 16.2-16.4 s vs 17.5-17.8 s fused). On a GPU node, where decode
    # tasks would crowd the detector actors' host work, give them a whole CPU (--read-cpus 1).
    read_cpus: float = 0.5
    # Studies per read task (each still its own row downstream). Why: a read task costs Ray a
    # scheduling round trip that, on 2 busy cores, took longer than reading one small study
    # (80 one-study tasks: reads delivered 6.4 studies/s and kept the detector actor waiting;
    # 20 four-study tasks: 10.8 studies/s, run 16.2 -> 14.3 s).
    read_batch_studies: int = 4
    detector_pool: int = 1
    detector_gpus: float = 0.0
    detector_cpus: float = 1.0
    detector_batch_studies: int = 1
    scorer_pool: int = 1
    scorer_gpus: float = 0.0
    scorer_cpus: float = 0.5
    scorer_batch_studies: int = 16
    slice_batch: int = 32  # slices per detector forward pass
    flush_studies: int = 16  # studies per written part file
    # Object-store memory the run may fill with blocks between stages (MiB; 0 = Ray Data's own
    # budget, a share of the object store). Why: on a node with many CPUs the read tasks outrun
    # the detector actors, and Ray Data's default budget (~15 % of RAM) lets the backlog of decoded
    # studies (~50 MB each at full size) grow with the number of studies (`make bench` on a 16-CPU
    # GPU node: peak summed RSS 9.2 GB at 20 studies, 15.6 GB at 100). A fixed cap bounds it.
    buffer_mb: float = 4096.0
    limit: int | None = None
    retry_errors: bool = False
    # Seconds to wait while another run holds the output (0: refuse at once). Why: a retry on a
    # fresh cluster after the old one died finds the dead run's lock until its heartbeat goes
    # stale (5 min); cluster/kuberay/rayjob-score.yaml waits for that instead of failing the retry.
    lock_wait_s: float = 0.0
    study_ids: list[str] | None = None  # score only these


# The pipeline's resource settings: one flag each, shared by `lumbar-ray score` / jobs/score.py
# and `make bench` (add_resource_args), so that the two cannot drift apart.
_RESOURCE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("read_cpus", float, "CPUs per read/decode task"),
    ("read_batch_studies", int, "studies per read task"),
    ("detector_pool", int, "detector actors"),
    ("detector_cpus", float, "CPUs per detector actor"),
    ("detector_gpus", float, "GPUs per detector actor (0 = CPU)"),
    ("detector_batch_studies", int, "studies per detector call"),
    ("scorer_pool", int, "DeepScoreNet actors"),
    ("scorer_cpus", float, "CPUs per DeepScoreNet actor"),
    ("scorer_gpus", float, "GPUs per DeepScoreNet actor (0 = CPU)"),
    ("scorer_batch_studies", int, "studies per DeepScoreNet call (their crops in one pass)"),
    ("slice_batch", int, "slices per detector forward pass"),
    ("flush_studies", int, "studies per Parquet part file"),
    ("buffer_mb", float, "object-store MiB for blocks between stages (0 = Ray Data's default share)"),
)
RESOURCE_FIELDS = tuple(name for name, _, _ in _RESOURCE_FLAGS)


def add_resource_args(parser, defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None) -> None:
    """Add ``--read-cpus`` … ``--buffer-mb`` to an argparse parser or group; defaults are
    ScoreConfig's unless ``defaults`` overrides them (e.g. None = decided later from --num-gpus)."""
    base = ScoreConfig(input="", models="", out="")
    defaults, helps = dict(defaults or {}), dict(helps or {})
    for name, kind, text in _RESOURCE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults.get(name, getattr(base, name)),
                            help=helps.get(name, text))


def resource_kwargs(args) -> dict[str, Any]:
    """The resource settings of parsed arguments, as ScoreConfig keyword arguments."""
    return {name: getattr(args, name) for name in RESOURCE_FIELDS}


@dataclass
class StudyItem:
    """What travels between stages for one study. Ray Data stores it as one Python object, never
    None (Arrow would turn a missing object into NaN): each field may be None instead."""

    study_id: str
    study: Any = None  # dicom_io.Study after reading
    detected: Any = None  # scoring.DetectedStudy after detection
    error: dict | None = None  # an errors-table row when the study failed as a whole
    predictions: pd.DataFrame | None = None  # the 25 rows after grading
    errors: pd.DataFrame | None = None  # the errors-table rows after grading


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


def _read_study_row(row: dict, root: str, split: str, descriptions: pd.DataFrame | None) -> dict:
    from lumbar_ray.dicom.read import read_study

    study_id = str(row["study_id"])
    try:
        study = read_study(root, study_id, split=split, descriptions=descriptions)
        scoring.require_readable(study)
        item = StudyItem(study_id, study=pack_volumes(study))
    except Exception as exc:  # recorded, never raised: one bad study must not stop the job
        item = StudyItem(study_id, error={"study_id": study_id, "series_id": None, "stage": "read",
                                          "error_type": type(exc).__name__, "message": str(exc)[:1000]})
    return {"study_id": study_id, "item": item}


def _read_study_rows(batch: dict[str, np.ndarray], root: str, split: str, descriptions: pd.DataFrame | None) -> dict:
    """A read task over several studies: one row (and one StudyItem) per study, as above."""
    rows = [_read_study_row({"study_id": s}, root, split, descriptions) for s in batch["study_id"]]
    return {"study_id": np.array([r["study_id"] for r in rows]), "item": _objects([r["item"] for r in rows])}


class DetectStage:
    """Actor: loads the three detectors once (not DeepScoreNet); all slices of a series go in
    batched passes."""

    def __init__(self, models: str, slice_batch: int = 32):
        self.bundle = scoring.ModelBundle.from_registry(models, parts=("detectors",))
        self.slice_batch = slice_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = []
        for item in batch["item"]:
            if item.study is not None:
                try:
                    item.detected = scoring.detect_study(self.bundle, item.study, batch_size=self.slice_batch)
                except Exception as exc:
                    item.error = {"study_id": item.study_id, "series_id": None, "stage": "detect",
                                  "error_type": type(exc).__name__, "message": str(exc)[:1000]}
                item.study = None  # the volumes are not needed downstream
            items.append(item)
        return {"study_id": batch["study_id"], "item": _objects(items)}


class ScoreStage:
    """Actor: loads DeepScoreNet once (not the detectors: no Ultralytics import); grades the
    crops of a batch of studies in one pass."""

    def __init__(self, models: str, run_id: str):
        self.bundle = scoring.ModelBundle.from_registry(models, parts=("scorer",))
        self.run_id = run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        now = pd.Timestamp.now(tz="UTC")
        items = list(batch["item"])
        ready = [item.detected for item in items if item.detected is not None]
        crops = np.concatenate([d.crops for d in ready]) if ready else np.zeros((0, 3, 32, 32), np.float32)
        probs = scoring.grade_crops(self.bundle, crops)
        offset = 0
        for item in items:
            detected = item.detected
            if detected is None:
                item.errors = scoring.error_frame([item.error], self.bundle.version, self.run_id, now)
                continue
            n = len(detected.crops)
            item.predictions = scoring.study_rows(detected, probs[offset:offset + n], self.bundle.version,
                                                  self.bundle.priors, self.run_id, now)
            offset += n
            item.errors = scoring.error_frame(detected.errors, self.bundle.version, self.run_id, now)
            item.detected = None
        return {"study_id": batch["study_id"], "item": _objects(items)}


def _objects(values: list) -> np.ndarray:
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

    @property
    def studies_per_s(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else float("nan")


def build_dataset(cfg: ScoreConfig, study_ids: list[str], run_id: str, descriptions: pd.DataFrame | None):
    """The Ray Data plan (lazy): read -> detect -> score."""
    import ray

    from lumbar_ray.storage import ray_remote_args_with_storage_env

    ds = ray.data.from_items([{"study_id": s} for s in study_ids], override_num_blocks=max(1, len(study_ids)))
    read_kwargs = {"root": cfg.input, "split": cfg.split, "descriptions": descriptions}
    if cfg.read_batch_studies > 1:
        ds = ds.map_batches(_read_study_rows, fn_kwargs=read_kwargs, batch_size=cfg.read_batch_studies,
                            batch_format="numpy", num_cpus=cfg.read_cpus, **ray_remote_args_with_storage_env())
    else:
        ds = ds.map(_read_study_row, fn_kwargs=read_kwargs, num_cpus=cfg.read_cpus, **ray_remote_args_with_storage_env())
    ds = ds.map_batches(DetectStage, fn_constructor_kwargs={"models": cfg.models, "slice_batch": cfg.slice_batch},
                        compute=ray.data.ActorPoolStrategy(size=cfg.detector_pool), num_gpus=cfg.detector_gpus,
                        num_cpus=cfg.detector_cpus, batch_size=cfg.detector_batch_studies, batch_format="numpy",
                        **ray_remote_args_with_storage_env())
    ds = ds.map_batches(ScoreStage, fn_constructor_kwargs={"models": cfg.models, "run_id": run_id},
                        compute=ray.data.ActorPoolStrategy(size=cfg.scorer_pool), num_gpus=cfg.scorer_gpus,
                        num_cpus=cfg.scorer_cpus, batch_size=cfg.scorer_batch_studies, batch_format="numpy",
                        **ray_remote_args_with_storage_env())
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
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.dicom.read import load_descriptions
    from lumbar_ray.outputs.store import scored_studies

    listed = [str(s) for s in (cfg.study_ids or list_studies(cfg.input, split=cfg.split))]
    done = scored_studies(cfg.out, model_version, include_errors=not cfg.retry_errors)
    todo = [s for s in listed if s not in done]
    n_done = len(listed) - len(todo)
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    return todo, len(listed), n_done, load_descriptions(cfg.input, cfg.split)


def run_scoring(cfg: ScoreConfig, echo: Callable[[str], None] = log.info) -> ScoreSummary:
    """Score every study of ``cfg.input`` not yet in ``cfg.out`` for this model version."""
    import ray

    from lumbar_ray.models.registry import ModelRegistry, parse_model_spec

    if not ray.is_initialized():
        raise RuntimeError("run_scoring needs a Ray runtime: call ray.init() first (jobs/score.py does)")
    root, version = parse_model_spec(cfg.models)
    model_version = ModelRegistry(root).resolve(version)
    # Pin the version so every actor loads the same one even if the champion moves meanwhile.
    cfg = _with(cfg, models=f"{root}@{model_version}")
    run_id = cfg.run_id or time.strftime("r%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    # One run per output at a time; taken before listing what is done, so that two runs can
    # never both decide to score the same study.
    with OutputLock(cfg.out, run_id, wait_s=cfg.lock_wait_s) as lock:
        return _score_locked(cfg, run_id, model_version, lock, echo)


def _score_locked(cfg: ScoreConfig, run_id: str, model_version: str, lock: OutputLock,
                  echo: Callable[[str], None]) -> ScoreSummary:
    from lumbar_ray.outputs.store import OutputWriter

    todo, n_listed, n_done, descriptions = studies_to_score(cfg, model_version)
    echo(f"[score] {n_listed} studies listed, {n_done} already scored by {model_version}; "
         f"scoring {len(todo)} (run {run_id})")
    writer = OutputWriter(cfg.out, run_id, model_version)
    started = time.time()
    n_scored = n_with_errors = n_failed = rows = 0
    pending_preds: list[pd.DataFrame] = []
    pending_errs: list[pd.DataFrame] = []
    pending = 0

    def flush() -> None:
        nonlocal pending, pending_preds, pending_errs
        if pending:
            lock.check()  # another run took the output over: stop before writing anything twice
            writer.write(pd.concat(pending_preds, ignore_index=True) if pending_preds else None,
                         pd.concat(pending_errs, ignore_index=True) if pending_errs else None)
        pending, pending_preds, pending_errs = 0, [], []

    if todo:
        ds = build_dataset(cfg, todo, run_id, descriptions)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for item in batch["item"]:
                preds, errs = item.predictions, item.errors
                if preds is not None:
                    pending_preds.append(preds)
                    rows += len(preds)
                    n_scored += 1
                    n_with_errors += int(errs is not None and len(errs) > 0)
                else:
                    n_failed += 1
                if errs is not None and len(errs):
                    pending_errs.append(errs)
                pending += 1
            if pending >= cfg.flush_studies:
                flush()
                done = n_scored + n_failed
                echo(f"[score] {done}/{len(todo)} studies, {done / max(time.time() - started, 1e-9):.2f} studies/s")
        flush()
    writer.close()
    seconds = time.time() - started
    summary = ScoreSummary(run_id, model_version, n_listed, n_done, n_scored, n_with_errors, n_failed,
                           seconds, rows)
    echo(f"[score] done: {n_scored} scored ({n_with_errors} with recorded problems), {n_failed} failed, "
         f"{rows} prediction rows in {seconds:.1f} s -> {cfg.out}")
    return summary


def _with(cfg: ScoreConfig, **changes: Any) -> ScoreConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)
