"""Scheduled retraining: train a challenger, compare it with the champion on the same holdout,
promote only if it is better by a margin, and record the decision in the registry.

Holdout: a study belongs to the holdout when ``sha256(salt + study_id) mod 10_000 < fraction *
10_000``. Membership needs no state and is stable as data grows: a study is holdout in every
retrain or in none. Challengers never train on holdout studies. Both models are scored end to
end (detectors -> crops -> DeepScoreNet, the scoring code path) on the holdout studies and
compared with the RSNA metric (lower is better). Promotion itself is a compare-and-swap
(:mod:`lumbar_ray.training.promotion`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import pandas as pd

from lumbar_ray.config import HOLDOUT_SALT, RetrainConfig, TrainConfig
from lumbar_ray.metrics.labels import read_labels
from lumbar_ray.metrics.rsna import rsna_score
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.outputs.store import select_scores
from lumbar_ray.scoring.study import ModelBundle, score_in_process
from lumbar_ray.training.cv import run_training
from lumbar_ray.training.promotion import FIRST_VERSION, Decision, promote_if_unchanged, record_decision
from lumbar_ray.training.warm_start import init_from_spec

log = logging.getLogger(__name__)


def is_holdout(study_id: Any, fraction: float, salt: str = HOLDOUT_SALT) -> bool:
    digest = hashlib.sha256(f"{salt}:{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < int(round(fraction * 10_000))


def holdout_studies(study_ids, fraction: float, salt: str = HOLDOUT_SALT) -> list:
    return [s for s in study_ids if is_holdout(s, fraction, salt)]


def holdout_score(spec: str, data: str, study_ids: list, labels: pd.DataFrame, split: str = "train") -> float:
    """RSNA score of one registry version scored end to end on the holdout studies."""
    bundle = ModelBundle.from_registry(spec)
    predictions, _ = score_in_process(bundle, data, [str(s) for s in study_ids], split=split)
    scored = select_scores(predictions)
    frame = scored.assign(study_id=scored["study_id"].astype(str))[["study_id", "column", "normal_mild", "moderate", "severe"]]
    truth = labels.assign(study_id=labels["study_id"].astype(str))[["study_id", "column", "label"]]
    merged = frame.merge(truth, on=["study_id", "column"], how="inner")
    probs = merged[["normal_mild", "moderate", "severe"]].to_numpy(dtype=np.float64)
    merged[["normal_mild", "moderate", "severe"]] = probs / probs.sum(axis=1, keepdims=True)
    return rsna_score(merged).score


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
    config = source.manifest(version).get("config", {})
    rule = config.get("holdout_rule")
    same_rule = rule is not None and (float(rule[0]), str(rule[1])) == train_cfg.holdout_rule
    seen = set() if same_rule else {int(s) for s in holdout} - {int(s) for s in config.get("exclude_studies", [])}
    if seen:
        echo(f"[retrain] not starting from {source.url()}@{version}: it may have trained on {len(seen)} of the "
             f"{len(holdout)} holdout studies, which would make the comparison unfair; random weights instead")
        return None
    return f"{source.url()}@{version}"


def run_retrain(cfg: RetrainConfig, echo: Callable[[str], None] = log.info) -> Decision:
    """Train a challenger on the non-holdout studies, compare with the champion, maybe promote."""
    train_cfg = cfg.train
    registry = ModelRegistry(train_cfg.registry)
    labels = read_labels(train_cfg.data)
    studies = sorted(labels["study_id"].unique().tolist())
    holdout = holdout_studies(studies, cfg.holdout_fraction, cfg.holdout_salt)
    if not holdout:
        raise ValueError(f"no holdout studies among {len(studies)} at fraction {cfg.holdout_fraction}; raise it")
    pointer = registry.champion()
    champion = pointer["version"] if pointer else None
    echo(f"[retrain] champion: {champion or 'none'}; {len(holdout)} of {len(studies)} studies held out")
    train_cfg = dataclasses.replace(train_cfg, exclude_studies=tuple(int(s) for s in holdout),
                                    holdout_rule=(float(cfg.holdout_fraction), str(cfg.holdout_salt)))
    train_cfg = dataclasses.replace(train_cfg, init_from=fair_init_from(train_cfg, holdout, echo))
    challenger = run_training(train_cfg, echo=echo).version
    holdout_labels = labels[labels["study_id"].isin(holdout)]

    def score_of(version: str) -> float:
        return holdout_score(f"{train_cfg.registry}@{version}", train_cfg.data, holdout, holdout_labels,
                             train_cfg.split)

    challenger_score = score_of(challenger)
    champion_score = score_of(champion) if champion is not None else None
    echo(f"[retrain] holdout RSNA score (lower is better): challenger {challenger} {challenger_score:.4f}"
         + (f", champion {champion} {champion_score:.4f}" if champion_score is not None else ", no champion"))
    better, why = verdict(challenger_score, champion_score, cfg.margin, champion)
    promoted = False
    if better:
        promoted, why = promote_if_unchanged(registry, challenger, champion, reason=f"retrain: {why}", owner=challenger)
    decision = Decision(challenger, champion, challenger_score, champion_score, cfg.margin, promoted, why,
                        len(holdout), datetime.now(timezone.utc).isoformat())
    where = record_decision(registry, decision)
    echo(f"[retrain] {'PROMOTED' if promoted else 'kept champion'}: {why} (decision: {where})")
    return decision
