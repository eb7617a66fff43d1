"""Cross-validated training on Ray, end to end (``run_training``).

Flow:
  labels + coordinates -> folds grouped by study (stratified) -> training examples cut from the
  studies by Ray tasks into shard files on the run's storage, per chunk of one fold's studies
  and per series type (:mod:`.shards`; each trial reads its own; removed once the version is
  published) -> Tune runs one trial per (model, fold) — plus one per model on all studies, the
  version that ships — each a ``TorchTrainer`` that resumes from its last checkpoint when a
  worker dies (:mod:`.trials`) -> out-of-fold predictions, and end to end: each fold's models
  score its validation studies as scoring does, Ray tasks (:mod:`.end_to_end`; the headline) ->
  metrics against the majority and prior baselines (:mod:`.cv_metrics`) -> a registry version
  (:mod:`.publish`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import ray

from lumbar_ray.config import TrainConfig
from lumbar_ray.metrics import labels as label_io
from lumbar_ray.models.registry import ModelRegistry, new_version_id
from lumbar_ray.storage import is_url
from lumbar_ray.training.artifacts import fold_name
from lumbar_ray.training.cv_metrics import collect_cv_metrics
from lumbar_ray.training.end_to_end import end_to_end_oof
from lumbar_ray.training.examples import cut_examples
from lumbar_ray.training.folds import assign_folds
from lumbar_ray.training.publish import model_card, shipped_folds, version_files
from lumbar_ray.training.shards import examples_dir, remove_examples
from lumbar_ray.training.trials import TrialSummary, run_trials
from lumbar_ray.training.warm_start import load_warm_start

log = logging.getLogger(__name__)


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
    headline: str = ""  # the card's headline line: the end-to-end figure, or why there is none


@dataclass
class RunPaths:
    version: str
    storage: str  # Ray Train/Tune storage: the trials' checkpoints and the Tune experiment
    artifacts: str  # {storage}/{version}/artifacts


@dataclass
class LabelledStudies:
    labels: pd.DataFrame  # one row per (study, target) label
    points: pd.DataFrame  # the labelled points with their label
    folds: pd.DataFrame  # study_id, fold


def run_paths(cfg: TrainConfig) -> RunPaths:
    """The run's version id and where its checkpoints and artefacts go (a local storage
    folder is made absolute and created)."""
    version = cfg.run_name or new_version_id()
    storage = cfg.storage_path or f"{str(cfg.registry).rstrip('/')}/runs"
    if not is_url(storage):
        storage = str(Path(storage).resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    return RunPaths(version, storage, f"{storage}/{version}/artifacts")


def labelled_studies(cfg: TrainConfig, echo: Callable[[str], None]) -> LabelledStudies:
    """Labels and labelled points of every study not excluded, and their folds."""
    labels = label_io.read_labels(cfg.data)
    coords = label_io.read_coordinates(cfg.data)
    if cfg.exclude_studies:
        excluded = set(int(s) for s in cfg.exclude_studies)
        labels = labels[~labels["study_id"].isin(excluded)]
        coords = coords[~coords["study_id"].isin(excluded)]
        echo(f"[train] {len(excluded)} studies excluded (held out)")
    points = label_io.labelled_points(labels, coords)
    folds = assign_folds(labels[["study_id", "column", "label"]], cfg.folds, cfg.seed)
    echo(f"[train] {labels['study_id'].nunique()} studies, {len(points)} labelled points, {cfg.folds} folds "
         f"(grouped by study); jobs: {', '.join(cfg.jobs())}")
    return LabelledStudies(labels, points, folds)


def run_training(cfg: TrainConfig, echo: Callable[[str], None] = log.info) -> TrainingOutcome:
    """Cross-validate, fit the final models and publish a registry version. Needs ``ray.init``."""
    if not ray.is_initialized():
        raise RuntimeError("run_training needs a Ray runtime: call ray.init() first (jobs/train.py does)")
    registry = ModelRegistry(cfg.registry)
    paths = run_paths(cfg)
    warm = load_warm_start(cfg) if cfg.init_from else None  # refuses a bad --init-from before any work
    if warm is not None:
        echo(f"[train] warm start: every model starts from {warm.registry}@{warm.version}")
    data = labelled_studies(cfg, echo)
    started = time.time()
    # shards on the run's storage; the driver keeps counts and problems only
    examples = cut_examples(cfg, data.points, data.folds, examples_dir(paths.storage, paths.version),
                            with_slices="detector" in cfg.models)
    echo(f"[train] cut {examples.n_crops} crops and {sum(examples.n_slices.values())} labelled slices "
         f"into {len(examples.chunks)} chunks of shards in {time.time() - started:.1f} s"
         + (f"; {len(examples.problems)} problems recorded" if examples.problems else ""))
    init_refs = {job: ray.put(weights) for job, weights in warm.weights.items()} if warm else {}
    trials = run_trials(cfg, data.folds, examples.root, paths.version, paths.storage, paths.artifacts,
                        init_refs=init_refs)
    echo(f"[train] {len(trials)} trials finished in {time.time() - started:.1f} s")
    # the headline figure: each fold's models score its validation studies as scoring would
    end_to_end = end_to_end_oof(cfg, data.labels, data.folds, paths.artifacts, echo)

    # the version's files are assembled in a temporary folder that publish copies from
    with tempfile.TemporaryDirectory(prefix="lumbar-ray-train-") as scratch:
        out_dir = Path(scratch)
        metrics = collect_cv_metrics(cfg.jobs(), data.labels, data.folds, paths.artifacts, out_dir, paths.version,
                                     end_to_end=end_to_end, final_fit=cfg.final_fit)
        shipped = shipped_folds(cfg, metrics, sorted(data.folds["fold"].unique().tolist()))
        if not cfg.final_fit:
            echo("[train] no final fit: shipping each model's best-validated fold: "
                 + ", ".join(f"{job} {fold_name(f)}" for job, f in shipped.items()))
        files, report = version_files(out_dir, metrics, paths.artifacts, shipped, data.folds)
        card = model_card(cfg, data.labels, len(data.points), examples, trials, metrics.card, shipped,
                          init_from=warm.card() if warm else None)
        registry.publish(paths.version, {k: str(v) for k, v in files.items()}, card)
    echo(f"[train] published {registry.url('versions', paths.version)}")
    # the shards can be large and the version no longer needs them; a failed run leaves them
    # under {storage}/{version}/examples (a rerun of that version cuts them afresh)
    remove_examples(examples.root)
    return TrainingOutcome(paths.version, cfg.registry, metrics.scorer_table, metrics.detector_table, trials,
                           report, examples.problems, paths.artifacts, metrics.card.get("headline", ""))
