"""Champion promotion: a compare-and-swap of the champion pointer under an exclusive lock, and
the record of every retrain's decision in the registry.

Under the lock object (``locks/promote.lock``, created with exclusive-create semantics:
``O_EXCL`` locally, ``If-None-Match: *`` on S3) the pointer moves only if the champion is still
the one the challenger was compared with. So two concurrent retrains cannot both promote: the
second sees a changed champion (or a held lock) and records a refusal.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone

from lumbar_ray import storage
from lumbar_ray.models.registry import ModelRegistry, RegistryError

LOCK_NAME = "locks/promote.lock"
DECISIONS = "decisions"


class PromotionLockBusy(RegistryError):
    """Another process holds the promotion lock."""


@dataclass
class Decision:
    """What a retrain decided, as recorded under ``decisions/`` of the registry."""

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
    """``with PromotionLock(registry, owner):`` — hold the registry's promotion lock."""

    registry: ModelRegistry
    owner: str

    @property
    def path(self) -> str:
        return self.registry.path(*LOCK_NAME.split("/"))

    @property
    def url(self) -> str:
        return self.registry.url(*LOCK_NAME.split("/"))

    def __enter__(self) -> "PromotionLock":
        body = json.dumps({"owner": self.owner, "pid": os.getpid(),
                           "since": datetime.now(timezone.utc).isoformat()}).encode()
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
    """Compare-and-swap of the champion pointer under the promotion lock: (promoted, why)."""
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
    """Write ``decision`` under ``decisions/`` (named by time and challenger); returns its URL."""
    name = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{decision.challenger}.json"
    registry.write_json(registry.path(DECISIONS, name), decision.as_dict())
    return registry.url(DECISIONS, name)


def decisions(registry: ModelRegistry) -> list[dict]:
    """Every recorded decision, oldest first."""
    base = registry.path(DECISIONS)
    if not registry.fs.exists(base):
        return []
    return [registry.read_json(p) for p in sorted(registry.fs.ls(base, detail=False)) if p.endswith(".json")]
