"""Out-of-fold end-to-end CV, the figure a user gets: for each fold, that fold's detectors and
DeepScoreNet (its artefacts, ``{artifacts}/{job}/{fold name}/``) score the fold's validation
studies through the scoring code path (detectors on every series -> crops at their detections ->
DeepScoreNet; a target with no detection gets the fallback), as Ray tasks on the cluster
(:mod:`lumbar_ray.scoring.on_cluster`).

No label of a validation study reaches what scores it: the fold's models never trained on it, and
the fallback (the weighted prior) is fitted on the training folds' labels only. The predictions
are raw, uncalibrated: each fold's temperatures are fitted later (:mod:`.cv_metrics`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import ray

from lumbar_ray.config import SCORER, TrainConfig, series_type_of_job
from lumbar_ray.metrics.rsna import LABEL_COLUMNS, prior_baseline, weighted_prior_from_card
from lumbar_ray.outputs.store import normalised_probabilities, select_scores
from lumbar_ray.scoring.on_cluster import BundleLoader, gather_scoring, plan_tasks, submit_scoring
from lumbar_ray.scoring.study import ModelBundle
from lumbar_ray.targets import PROBABILITY_COLUMNS
from lumbar_ray.training.artifacts import fold_dir, fold_name, weights_file

log = logging.getLogger(__name__)

PROBS = list(PROBABILITY_COLUMNS)
# Columns of the end-to-end out-of-fold frame: the metric's long layout plus where each row came from.
FRAME_COLUMNS = [*LABEL_COLUMNS, *PROBS, "fold", "detected", "failed"]


@dataclass
class EndToEndOof:
    """The end-to-end out-of-fold predictions (``frame``: one row per labelled target of every
    validation study, :data:`FRAME_COLUMNS`), or why there are none (``skipped``)."""

    frame: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FRAME_COLUMNS))
    skipped: str | None = None
    problems: list[str] = field(default_factory=list)  # studies that failed as a whole, and why
    seconds: float = 0.0

    @property
    def available(self) -> bool:
        return self.skipped is None and len(self.frame) > 0


def missing_for_end_to_end(jobs: Sequence[str]) -> str | None:
    """Why a run with ``jobs`` cannot be evaluated end to end, or None when it can."""
    detectors = [j for j in jobs if j != SCORER]
    if SCORER not in jobs:
        return "the run trained no DeepScoreNet (--models without scorer): nothing grades the detections"
    if not detectors:
        return "the run trained no detectors (--models scorer): nothing finds the targets to crop"
    return None


def fold_priors(labels: pd.DataFrame, folds_frame: pd.DataFrame, fold: int) -> dict[str, list[float]]:
    """The class prior per target (the model card's layout) of the studies *outside* ``fold``:
    the fallback that fold's bundle gives an undetected target, fitted without its labels."""
    training = folds_frame.loc[folds_frame["fold"] != fold, "study_id"]
    prior = prior_baseline(labels[labels["study_id"].isin(training)][LABEL_COLUMNS])
    return {c: [float(v) for v in prior.loc[c].to_numpy()] for c in prior.index}


def fold_bundle_loader(cfg: TrainConfig, artifacts: str, fold: int, priors: dict[str, list[float]]) -> BundleLoader:
    """What a task calls to build one CV fold's bundle from that fold's artefacts: its detectors,
    its DeepScoreNet, the card's detection threshold, no temperatures (raw probabilities)."""
    detectors = {series_type_of_job(job): f"{fold_dir(artifacts, job, fold)}/{weights_file(job)}"
                 for job in cfg.jobs() if job != SCORER}
    return functools.partial(ModelBundle.from_files, f"cv-{fold_name(fold)}",
                             f"{fold_dir(artifacts, SCORER, fold)}/{weights_file(SCORER)}", detectors,
                             priors=priors, detector_conf=cfg.detector.conf)


def labelled_predictions(predictions: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Scoring's prediction rows joined to their labels: the metric's long frame (study_id as in
    ``labels``, column, label, the probabilities rescaled to sum 1 as the Kaggle export does) plus
    ``detected``. Only labelled targets (label >= 0) of studies with predictions."""
    # the rows of several bundles (one per fold) at once: each study is scored by one of them
    scored = select_scores(predictions.drop(columns=["model_version"], errors="ignore"))
    frame = pd.DataFrame({"key": scored["study_id"].astype(str).to_numpy(), "column": scored["column"].to_numpy(),
                          "detected": scored["detected"].astype(bool).to_numpy()})
    frame[PROBS] = normalised_probabilities(scored)
    truth = labels[LABEL_COLUMNS][labels["label"] >= 0]
    truth = truth.assign(key=truth["study_id"].astype(str))
    merged = truth.merge(frame, on=["key", "column"], how="inner")
    return merged[[*LABEL_COLUMNS, *PROBS, "detected"]]


def end_to_end_frame(predictions: pd.DataFrame, failed: Sequence[str], labels: pd.DataFrame,
                     folds_frame: pd.DataFrame, priors_by_fold: dict[int, dict[str, list[float]]]) -> pd.DataFrame:
    """The end-to-end out-of-fold frame (:data:`FRAME_COLUMNS`) from the validation studies'
    prediction rows. A study in ``failed`` (no rows: unreadable, or its task died) gets its fold's
    weighted prior on every target, as ``export-kaggle --fill-prior`` gives it, marked ``failed``:
    leaving it out would score the model on the studies it could read only."""
    fold_of = dict(zip(folds_frame["study_id"].astype(str), folds_frame["fold"].astype(int)))
    parts = []
    if len(predictions):
        scored = labelled_predictions(predictions, labels)
        parts.append(scored.assign(fold=scored["study_id"].astype(str).map(fold_of).astype(int), failed=False))
    lost = {str(s) for s in failed}
    truth = labels[LABEL_COLUMNS][(labels["label"] >= 0) & labels["study_id"].astype(str).isin(lost)]
    for fold, part in truth.groupby(truth["study_id"].astype(str).map(fold_of)):
        prior = weighted_prior_from_card(priors_by_fold[int(fold)])
        parts.append(part.join(prior[PROBS], on="column").assign(fold=int(fold), detected=False, failed=True))
    if not parts:
        return pd.DataFrame(columns=FRAME_COLUMNS)
    frame = pd.concat(parts, ignore_index=True)[FRAME_COLUMNS]
    frame[PROBS] = frame[PROBS].astype(np.float64)
    return frame.sort_values(["fold", "study_id", "column"], kind="stable").reset_index(drop=True)


def end_to_end_failure(exc: BaseException) -> str:
    """Why the end-to-end pass has no figure, in one line: the type and first line of what was
    raised (for a Ray task error, of the exception raised in the task, not its traceback)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"failed: {type(cause).__name__}: {(lines[0] if lines else 'no message')[:300]}"


def end_to_end_oof(cfg: TrainConfig, labels: pd.DataFrame, folds_frame: pd.DataFrame, artifacts: str,
                   echo: Callable[[str], None] = log.info) -> EndToEndOof:
    """Score every CV fold's validation studies with that fold's models, on the cluster (one task
    per chunk of studies; a GPU each when training uses GPUs or the cluster has them). Skipped,
    with the reason, when the run lacks the detectors or DeepScoreNet."""
    reason = missing_for_end_to_end(cfg.jobs())
    if reason:
        echo(f"[train] end-to-end out-of-fold CV skipped: {reason}")
        return EndToEndOof(skipped=reason)
    started = time.time()
    fold_ids = sorted(int(f) for f in folds_frame["fold"].unique())
    resources = plan_tasks(int(folds_frame["fold"].value_counts().max()), len(fold_ids), cfg.resources.use_gpu)
    priors = {fold: fold_priors(labels, folds_frame, fold) for fold in fold_ids}
    pending = []
    try:
        for fold in fold_ids:
            studies = folds_frame.loc[folds_frame["fold"] == fold, "study_id"].astype(str).tolist()
            pending += submit_scoring(fold_bundle_loader(cfg, artifacts, fold, priors[fold]), cfg.data, studies,
                                      cfg.split, resources, tag=fold, run_id=f"cv-{fold_name(fold)}")
        echo(f"[train] end-to-end out-of-fold CV: {len(folds_frame)} validation studies, each scored by its fold's "
             f"detectors and DeepScoreNet, in {len(pending)} Ray tasks ({resources.num_gpus:g} GPU each)")
        scored = gather_scoring(pending, resources.crash_retries, echo=log.info)
    except Exception as exc:  # noqa: BLE001 - the trained models are published all the same
        # A crashed task already became error rows; what reaches here is a task that raised (a
        # fold's model that does not load, a bug). Hours of training are not thrown away for
        # the evaluation pass: the version is published with this reason in place of the
        # figure (card, report), and the traceback is logged.
        log.exception("end-to-end out-of-fold CV failed")
        for chunk in pending:  # the other tasks would keep holding CPUs and GPUs for nothing
            try:
                ray.cancel(chunk.ref)
            except Exception:  # noqa: BLE001 - a task that already ended cannot be cancelled
                pass
        reason = end_to_end_failure(exc)
        echo(f"[train] WARNING: end-to-end out-of-fold CV {reason}; the version is published without it")
        return EndToEndOof(skipped=reason, seconds=time.time() - started)
    failed = sorted(scored.failed_studies())
    problems = [f"study {row.study_id} ({row.stage}, {row.error_type}): {row.message}"
                for row in scored.errors.itertuples() if str(row.study_id) in set(failed)]
    frame = end_to_end_frame(scored.predictions, failed, labels, folds_frame, priors)
    seconds = time.time() - started
    echo(f"[train] end-to-end out-of-fold CV: {frame['study_id'].nunique()} studies, {len(frame)} labelled targets, "
         f"{frame['detected'].mean() if len(frame) else float('nan'):.1%} detected, {len(failed)} studies failed "
         f"(weighted prior instead), in {seconds:.1f} s")
    return EndToEndOof(frame, None, problems, seconds)
