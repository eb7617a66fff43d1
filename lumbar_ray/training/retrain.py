"""Scheduled retraining: train a challenger, compare it with the champion on the same holdout,
promote only if it is better by a margin, and record the decision in the registry.

Holdout: a study belongs to the holdout when ``sha256(salt + study_id) mod 10_000 < fraction *
10_000``. Membership needs no state and is stable as data grows: a study is holdout in every
retrain or in none. Challengers never train on holdout studies. Both models are scored end to
end (detectors -> crops -> DeepScoreNet, the scoring code path) on the holdout studies and
compared with the RSNA metric (lower is better).

Promotion is a compare-and-swap: under an exclusive lock object (``locks/promote.lock``,
created with exclusive-create semantics: ``O_EXCL`` locally, ``If-None-Match: *`` on S3), the
pointer moves only if the champion is still the one the challenger was compared with. So two
concurrent retrains cannot both promote: the second sees a changed champion (or a held lock)
and records a refusal.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from lumbar_ray import storage
from lumbar_ray.config import TrainConfig
from lumbar_ray.models.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)

LOCK_NAME = "locks/promote.lock"
DECISIONS = "decisions"


class PromotionLockBusy(RegistryError):
    """Another process holds the promotion lock."""


def is_holdout(study_id: Any, fraction: float, salt: str = "lumbar-ray-holdout") -> bool:
    digest = hashlib.sha256(f"{salt}:{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < int(round(fraction * 10_000))


def holdout_studies(study_ids, fraction: float, salt: str = "lumbar-ray-holdout") -> list:
    return [s for s in study_ids if is_holdout(s, fraction, salt)]


@dataclass
class RetrainConfig:
    train: TrainConfig  # its .registry is the registry; its .data the labelled data
    margin: float = 0.005  # challenger must be better (lower RSNA score) by at least this much
    holdout_fraction: float = 0.2
    holdout_salt: str = "lumbar-ray-holdout"


@dataclass
class Decision:
    challenger: str
    champion: str | None
    challenger_score: float | None
    champion_score: float | None
    margin: float
    promoted: bool
    reason: str
    holdout_studies: int
    decided_at: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PromotionLock:
    registry: ModelRegistry
    owner: str

    @property
    def path(self) -> str:
        return self.registry._path(*LOCK_NAME.split("/"))

    @property
    def url(self) -> str:
        return self.registry.url(*LOCK_NAME.split("/"))

    def __enter__(self) -> "PromotionLock":
        body = json.dumps({"owner": self.owner, "pid": os.getpid(),
                           "since": _dt.datetime.now(_dt.timezone.utc).isoformat()}).encode()
        if not storage.create_exclusive(self.url, body):
            try:
                held = self.registry.read_json(self.path)
            except Exception:  # noqa: BLE001 - only for the message
                held = {}
            raise PromotionLockBusy(
                f"{self.url} is held by {held.get('owner')} since "
                f"{held.get('since')}; if that process is gone, delete the lock object")
        return self

    def __exit__(self, *exc) -> None:
        storage.remove(self.url)


def promote_if_unchanged(registry: ModelRegistry, challenger: str, expected_champion: str | None, reason: str,
                         owner: str) -> tuple[bool, str]:
    """Compare-and-swap of the champion pointer under the promotion lock."""
    try:
        with PromotionLock(registry, owner):
            current = registry.champion()
            current_version = current["version"] if current else None
            if current_version != expected_champion:
                return False, (f"champion changed from {expected_champion} to {current_version} while "
                               f"{challenger} was evaluated; not promoted (re-run to compare with the new champion)")
            registry.set_champion(challenger, reason=reason)
            return True, reason
    except PromotionLockBusy as exc:
        return False, f"not promoted: {exc}"


def record_decision(registry: ModelRegistry, decision: Decision) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = registry._path(DECISIONS, f"{stamp}-{decision.challenger}.json")
    registry.write_json(path, decision.as_dict())
    return registry.url(DECISIONS, f"{stamp}-{decision.challenger}.json")


def decisions(registry: ModelRegistry) -> list[dict]:
    base = registry._path(DECISIONS)
    if not registry.fs.exists(base):
        return []
    return [registry.read_json(p) for p in sorted(registry.fs.ls(base, detail=False)) if p.endswith(".json")]


def holdout_score(spec: str, data: str, study_ids: list, labels: pd.DataFrame, split: str = "train") -> float:
    """RSNA score of one registry version scored end to end on the holdout studies."""
    from lumbar_ray.metrics.rsna import rsna_score
    from lumbar_ray.outputs.store import select_scores
    from lumbar_ray.scoring.study import ModelBundle, score_in_process

    bundle = ModelBundle.from_registry(spec)
    predictions, _ = score_in_process(bundle, data, [str(s) for s in study_ids], split=split)
    scored = select_scores(predictions)
    frame = scored.assign(study_id=scored["study_id"].astype(str))[["study_id", "column", "normal_mild", "moderate", "severe"]]
    truth = labels.assign(study_id=labels["study_id"].astype(str))[["study_id", "column", "label"]]
    merged = frame.merge(truth, on=["study_id", "column"], how="inner")
    probs = merged[["normal_mild", "moderate", "severe"]].to_numpy(dtype=np.float64)
    merged[["normal_mild", "moderate", "severe"]] = probs / probs.sum(axis=1, keepdims=True)
    return rsna_score(merged).score


def run_retrain(cfg: RetrainConfig, echo: Callable[[str], None] = log.info) -> Decision:
    """Train a challenger on the non-holdout studies, compare with the champion, maybe promote."""
    from lumbar_ray.metrics import labels as label_io
    from lumbar_ray.training.cv import run_training

    train_cfg = cfg.train
    registry = ModelRegistry(train_cfg.registry)
    labels = label_io.read_labels(train_cfg.data)
    studies = sorted(labels["study_id"].unique().tolist())
    holdout = holdout_studies(studies, cfg.holdout_fraction, cfg.holdout_salt)
    if not holdout:
        raise ValueError(f"no holdout studies among {len(studies)} at fraction {cfg.holdout_fraction}; raise it")
    pointer = registry.champion()
    champion = pointer["version"] if pointer else None
    echo(f"[retrain] champion: {champion or 'none'}; {len(holdout)} of {len(studies)} studies held out")
    train_cfg = dataclasses.replace(train_cfg, exclude_studies=tuple(int(s) for s in holdout))
    outcome = run_training(train_cfg, echo=echo)
    challenger = outcome.version
    holdout_labels = labels[labels["study_id"].isin(holdout)]
    challenger_score = holdout_score(f"{train_cfg.registry}@{challenger}", train_cfg.data, holdout, holdout_labels,
                                     train_cfg.split)
    champion_score = None
    if champion is not None:
        champion_score = holdout_score(f"{train_cfg.registry}@{champion}", train_cfg.data, holdout, holdout_labels,
                                       train_cfg.split)
    echo(f"[retrain] holdout RSNA score (lower is better): challenger {challenger} {challenger_score:.4f}"
         + (f", champion {champion} {champion_score:.4f}" if champion_score is not None else ", no champion"))
    if champion_score is None:
        better, why = True, "no champion yet"
    elif challenger_score <= champion_score - cfg.margin:
        better, why = True, f"better by {champion_score - challenger_score:.4f} >= margin {cfg.margin}"
    else:
        better, why = False, (f"not better by the margin: {champion_score - challenger_score:+.4f} < {cfg.margin}; "
                              f"champion {champion} stays")
    promoted = False
    if better:
        promoted, why = promote_if_unchanged(registry, challenger, champion, reason=f"retrain: {why}", owner=challenger)
    decision = Decision(challenger, champion, challenger_score, champion_score, cfg.margin, promoted, why,
                        len(holdout), _dt.datetime.now(_dt.timezone.utc).isoformat())
    where = record_decision(registry, decision)
    echo(f"[retrain] {'PROMOTED' if promoted else 'kept champion'}: {why} (decision: {where})")
    return decision
