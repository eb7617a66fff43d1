"""Scheduled retraining: train a challenger, compare it with the champion on holdout studies
neither trained on, promote only if it is better by a margin, and record the decision in the
registry.

Holdout: a study belongs to the holdout when ``sha256(salt + study_id) mod 10_000 < fraction *
10_000``. Membership needs no state and is stable as data grows: a study is holdout in every
retrain or in none. Challengers never train on holdout studies; the champion is compared on the
holdout studies its card says it never trained on (all of them under the same holdout rule), and
when there are none the comparison is refused, recorded with why, and nothing is promoted. Both
models are scored end to end (detectors -> crops -> DeepScoreNet, the scoring code path) as Ray
tasks on the cluster, on the same rows, and compared with the RSNA metric (lower is better).
Promotion itself is a compare-and-swap (:mod:`lumbar_ray.training.promotion`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from datetime import datetime, timezone
from typing import Any, Callable

import pandas as pd

from lumbar_ray.config import HOLDOUT_SALT, RetrainConfig, TrainConfig
from lumbar_ray.metrics.labels import read_labels
from lumbar_ray.metrics.rsna import rsna_score
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.scoring.on_cluster import gather_scoring, plan_tasks, submit_scoring
from lumbar_ray.scoring.study import ModelBundle
from lumbar_ray.training.cv import run_training
from lumbar_ray.training.end_to_end import labelled_predictions
from lumbar_ray.training.promotion import FIRST_VERSION, Decision, promote_if_unchanged, record_decision
from lumbar_ray.training.warm_start import init_from_spec

log = logging.getLogger(__name__)


def is_holdout(study_id: Any, fraction: float, salt: str = HOLDOUT_SALT) -> bool:
    digest = hashlib.sha256(f"{salt}:{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < int(round(fraction * 10_000))


def holdout_studies(study_ids, fraction: float, salt: str = HOLDOUT_SALT) -> list:
    return [s for s in study_ids if is_holdout(s, fraction, salt)]


def holdout_frames(specs: dict[str, str], data: str, study_ids: list, labels: pd.DataFrame, split: str,
                   use_gpu: bool, echo: Callable[[str], None]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """({name: labelled predictions}, studies that failed for any of them): each registry version
    of ``specs`` ({name: REGISTRY@VERSION}) scored end to end on ``study_ids`` through the scoring
    code path, all at once as Ray tasks on the cluster (:mod:`lumbar_ray.scoring.on_cluster`; a
    GPU per task with ``use_gpu`` or when the cluster has one), not in the driver: a RayCronJob's
    head has no GPU and no CPU to spare."""
    ids = [str(s) for s in study_ids]
    resources = plan_tasks(len(ids), len(specs), use_gpu)
    pending = []
    for name, spec in specs.items():
        pending += submit_scoring(functools.partial(ModelBundle.from_registry, spec), data, ids, split, resources,
                                  tag=name, run_id=f"holdout-{name}")
    echo(f"[retrain] scoring {len(ids)} holdout studies with {', '.join(specs)} in {len(pending)} Ray tasks "
         f"({resources.num_gpus:g} GPU each)")
    scored = gather_scoring(pending, resources.crash_retries, echo=log.info)
    frames = {}
    for name in specs:
        rows = scored.predictions[scored.predictions["tag"] == name] if len(scored.predictions) else scored.predictions
        frames[name] = labelled_predictions(rows, labels) if len(rows) else pd.DataFrame(columns=["study_id", "column"])
    return frames, sorted(scored.failed_studies())


def paired_scores(frames: dict[str, pd.DataFrame]) -> tuple[dict[str, float], int]:
    """({name: RSNA score}, rows): every frame scored on the (study, target) rows that all of
    them have, so that a study one model failed on does not count for the other only."""
    keys = None
    for frame in frames.values():
        these = frame[["study_id", "column"]]
        keys = these if keys is None else keys.merge(these, on=["study_id", "column"], how="inner")
    if keys is None or keys.empty:
        raise ValueError("no holdout row was scored by every model: nothing to compare on")
    return ({name: rsna_score(frame.merge(keys, on=["study_id", "column"], how="inner")).score
             for name, frame in frames.items()}, len(keys))


def unseen_holdout(manifest: dict[str, Any], holdout: list, rule: tuple[float, str] | None) -> list:
    """The studies of ``holdout`` that the version of ``manifest`` never trained on: all of them
    when it was trained under the same holdout ``rule`` (membership is a hash of the study id, so
    a study holdout now was holdout then), else those its card lists as excluded."""
    config = manifest.get("config") or {}
    version_rule = config.get("holdout_rule")
    if rule is not None and version_rule is not None and (float(version_rule[0]), str(version_rule[1])) == rule:
        return list(holdout)
    excluded = {int(s) for s in config.get("exclude_studies") or []}
    excluded |= {int(s) for s in (manifest.get("data") or {}).get("excluded_studies") or []}
    return [s for s in holdout if int(s) in excluded]


def comparison_refusal(champion: str, manifest: dict[str, Any], holdout: list, rule: tuple[float, str],
                       registry: str) -> str:
    """Why the champion cannot be compared on this retrain's holdout (it may have trained on every
    study of it), and what to do instead."""
    theirs = (manifest.get("config") or {}).get("holdout_rule")
    return (f"comparison refused: champion {champion} may have trained on every one of the {len(holdout)} holdout "
            f"studies (its holdout rule {tuple(theirs) if theirs else 'none'} is not this retrain's {rule}, and its "
            f"card excludes none of them), so it would be graded on studies it learned; the challenger is published, "
            f"not promoted. To promote it after review: lumbar-ray champion --registry {registry} --set CHALLENGER; "
            f"later retrains then compare fairly")


def verdict(challenger_score: float, champion_score: float | None, margin: float,
            champion: str | None) -> tuple[bool, str]:
    """(whether the challenger should become the champion, why)."""
    if champion_score is None:
        return True, FIRST_VERSION
    if challenger_score <= champion_score - margin:
        return True, f"better by {champion_score - challenger_score:.4f} >= margin {margin}"
    return False, (f"not better by the margin: {champion_score - challenger_score:+.4f} < {margin}; "
                   f"champion {champion} stays")


def fair_init_from(train_cfg: TrainConfig, holdout: list, echo: Callable[[str], None]) -> str | None:
    """The resolved ``REGISTRY@VERSION`` the challenger may warm-start from, or None (random weights).

    A start version that trained on any holdout study would carry that study into the
    challenger and make the holdout comparison unfair: it is used only if it held out the same
    studies (the same holdout rule, or every holdout study excluded). Without a champion yet
    (``--init-from champion`` on a first retrain) the challenger starts from random weights too."""
    if not train_cfg.init_from:
        return None
    root, version = init_from_spec(train_cfg.init_from, train_cfg.registry)
    source = ModelRegistry(root)
    if version is None and source.champion() is None:
        echo(f"[retrain] no champion in {source.url()} to start from yet: the challenger starts from random weights")
        return None
    version = source.resolve(version)
    seen = set(holdout) - set(unseen_holdout(source.manifest(version), holdout, train_cfg.holdout_rule))
    if seen:
        echo(f"[retrain] not starting from {source.url()}@{version}: it may have trained on {len(seen)} of the "
             f"{len(holdout)} holdout studies, which would make the comparison unfair; random weights instead")
        return None
    return f"{source.url()}@{version}"


def run_retrain(cfg: RetrainConfig, echo: Callable[[str], None] = log.info) -> Decision:
    """Train a challenger on the non-holdout studies, compare it with the champion on the holdout
    studies neither trained on (or refuse to, recording why), maybe promote."""
    train_cfg = cfg.train
    registry = ModelRegistry(train_cfg.registry)
    labels = read_labels(train_cfg.data)
    studies = sorted(labels["study_id"].unique().tolist())
    holdout = holdout_studies(studies, cfg.holdout_fraction, cfg.holdout_salt)
    if not holdout:
        raise ValueError(f"no holdout studies among {len(studies)} at fraction {cfg.holdout_fraction}; raise it")
    rule = (float(cfg.holdout_fraction), str(cfg.holdout_salt))
    pointer = registry.champion()
    champion = pointer["version"] if pointer else None
    echo(f"[retrain] champion: {champion or 'none'}; {len(holdout)} of {len(studies)} studies held out")
    compare_on, refusal = list(holdout), None
    if champion is not None:
        compare_on = unseen_holdout(registry.manifest(champion), holdout, rule)
        if not compare_on:
            refusal = comparison_refusal(champion, registry.manifest(champion), holdout, rule, registry.url())
            echo(f"[retrain] {refusal}")
        elif len(compare_on) < len(holdout):
            echo(f"[retrain] champion {champion} may have trained on {len(holdout) - len(compare_on)} of the holdout "
                 f"studies: comparing on the {len(compare_on)} it never trained on")
    train_cfg = dataclasses.replace(train_cfg, exclude_studies=tuple(int(s) for s in holdout), holdout_rule=rule)
    train_cfg = dataclasses.replace(train_cfg, init_from=fair_init_from(train_cfg, holdout, echo))
    challenger = run_training(train_cfg, echo=echo).version
    specs = {challenger: f"{train_cfg.registry}@{challenger}"}
    if champion is not None and refusal is None:
        specs[champion] = f"{train_cfg.registry}@{champion}"
    # refused: the challenger alone, on the whole holdout (its figure is still worth recording)
    scored_on = compare_on if refusal is None else list(holdout)
    frames, failed = holdout_frames(specs, train_cfg.data, scored_on, labels[labels["study_id"].isin(scored_on)],
                                    train_cfg.split, train_cfg.resources.use_gpu, echo)
    if failed:
        echo(f"[retrain] {len(failed)} holdout studies failed to score and are left out of the comparison: "
             + ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else ""))
    scores, n_rows = paired_scores(frames)
    challenger_score, champion_score = scores[challenger], scores.get(champion) if champion is not None else None
    echo(f"[retrain] holdout RSNA score on {n_rows} labelled targets (lower is better): challenger {challenger} "
         f"{challenger_score:.4f}" + (f", champion {champion} {champion_score:.4f}" if champion_score is not None
                                       else f", champion {champion or 'none'} not scored"))
    promoted = False
    if refusal is not None:
        why = refusal.replace("CHALLENGER", challenger)
    else:
        better, why = verdict(challenger_score, champion_score, cfg.margin, champion)
        if better:
            promoted, why = promote_if_unchanged(registry, challenger, champion, reason=f"retrain: {why}",
                                                 owner=challenger)
    decision = Decision(challenger, champion, challenger_score, champion_score, cfg.margin, promoted, why,
                        len(scored_on), datetime.now(timezone.utc).isoformat())
    where = record_decision(registry, decision)
    echo(f"[retrain] {'PROMOTED' if promoted else 'kept champion'}: {why} (decision: {where})")
    return decision
