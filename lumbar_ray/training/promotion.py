"""Champion promotion: every move of the champion pointer goes through the registry's promotion
lock, and every move (and every retrain's refusal) is recorded as a decision in the registry.

Under the lock object (``locks/promote.lock``, created with exclusive-create semantics:
``O_EXCL`` locally, ``If-None-Match: *`` on S3) the pointer moves only if the champion is still
the one the challenger was compared with. So two concurrent retrains cannot both promote: the
second sees a changed champion (or a held lock) and records a refusal.

The lock expires like the scoring output lock (:mod:`lumbar_ray.scoring.output_lock`), less the
heartbeat: a hold lasts one read and one write of the pointer. The lock names its holder (owner,
host, PID namespace, pid and the pid's start time). Another process takes it over when the
holder is gone: on the same host (and PID namespace) when the holder's process no longer exists,
elsewhere when the lock is older than ``stale_after_s``. Until then a pointer move is refused with
:class:`PromotionLockBusy`, saying who holds the lock and when it expires. The lock is released
only by the holder that still owns it, and a holder checks, just before it writes the pointer,
that nobody took the lock over meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lumbar_ray import storage
from lumbar_ray.errors import BusyError
from lumbar_ray.models.registry import ModelRegistry, RegistryError
from lumbar_ray.scoring.output_lock import parse_time, pid_namespace, process_alive, process_start, read_lock

log = logging.getLogger(__name__)

LOCK_NAME = "locks/promote.lock"
DECISIONS = "decisions"
STALE_AFTER_S = 120.0  # a hold is one read and one write of the pointer: seconds, even on S3
FIRST_VERSION = "first version in an empty registry: nothing to beat"


class PromotionLockBusy(BusyError, RegistryError):
    """Another process holds the promotion lock (or took it over from this one): busy (exit 3),
    though a registry error for code that catches those."""

    exit_code = BusyError.exit_code


@dataclass
class Decision:
    """A move of the champion pointer, or a retrain's refusal to move it, as recorded under
    ``decisions/`` of the registry. ``by`` says who decided: ``retrain``, ``train`` (the first
    version of an empty registry), ``train --champion`` or ``champion --set``."""

    challenger: str
    champion: str | None
    challenger_score: float | None
    champion_score: float | None
    margin: float
    promoted: bool
    reason: str
    holdout_studies: int
    decided_at: str
    by: str = "retrain"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class PromotionLock:
    """``with PromotionLock(registry, owner):`` — hold the registry's promotion lock (module doc)."""

    registry: ModelRegistry
    owner: str
    stale_after_s: float = STALE_AFTER_S
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def path(self) -> str:
        return self.registry.path(*LOCK_NAME.split("/"))

    @property
    def url(self) -> str:
        return self.registry.url(*LOCK_NAME.split("/"))

    def _body(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"owner": self.owner, "token": self.token, "host": socket.gethostname(),
                           "pid_ns": pid_namespace(), "pid": pid, "pid_start": process_start(pid),
                           "since": _now().isoformat()}).encode()

    def read(self) -> dict | None:
        """The lock's content (see :func:`read_lock`)."""
        return read_lock(self.url)

    def stale_reason(self, held: dict) -> str | None:
        """Why the holder of ``held`` is gone, or None while it may still be running."""
        pid = held.get("pid")
        if (held.get("host") == socket.gethostname() and held.get("pid_ns") == pid_namespace()
                and isinstance(pid, int)):
            if process_alive(pid, held.get("pid_start")):
                return None
            return f"its process (pid {pid} on this host) is gone"
        since = parse_time(held.get("since"))
        if since is None:
            return None
        age = (_now() - since).total_seconds()
        if age > self.stale_after_s:
            return f"it was taken {age:.0f} s ago (expires after {self.stale_after_s:.0f} s)"
        return None

    def _busy(self, held: dict) -> PromotionLockBusy:
        if not held:
            return PromotionLockBusy(f"{self.url} exists but cannot be read; if no pointer move is under way, "
                                     "delete it and try again")
        return PromotionLockBusy(
            f"{self.url} is held by {held.get('owner')} (host {held.get('host')}, pid {held.get('pid')}) since "
            f"{held.get('since')}; it expires when that process is gone (same host) or {self.stale_after_s:.0f} s "
            "after it was taken: try again then")

    def __enter__(self) -> "PromotionLock":
        for _ in range(3):
            if storage.create_exclusive(self.url, self._body()):
                return self
            held = self.read()
            if held is None:
                continue  # released meanwhile
            why = self.stale_reason(held) if held else None
            if why is None:
                raise self._busy(held)
            log.warning("taking over %s from %s: %s", self.url, held.get("owner"), why)
            storage.remove(self.url)
        raise PromotionLockBusy(f"could not create {self.url}: other processes keep taking it")

    def check(self) -> None:
        """Raise PromotionLockBusy unless this holder still owns the lock."""
        held = self.read()
        if not held or held.get("token") != self.token:
            raise PromotionLockBusy(f"{self.url} was taken over from {self.owner} "
                                    f"(now held by {held.get('owner') if held else 'nobody'})")

    def __exit__(self, *exc) -> None:
        held = self.read()
        if held and held.get("token") == self.token:
            storage.remove(self.url)


def promote_if_unchanged(registry: ModelRegistry, challenger: str, expected_champion: str | None, reason: str,
                         owner: str) -> tuple[bool, str]:
    """Compare-and-swap of the champion pointer under the promotion lock: (promoted, why)."""
    try:
        with PromotionLock(registry, owner) as lock:
            current = registry.champion()
            current_version = current["version"] if current else None
            if current_version != expected_champion:
                return False, (f"champion changed from {expected_champion} to {current_version} while "
                               f"{challenger} was evaluated; not promoted (re-run to compare with the new champion)")
            lock.check()
            registry.set_champion(challenger, reason=reason)
            return True, reason
    except PromotionLockBusy as exc:
        return False, f"not promoted: {exc}"


def pin_champion(registry: ModelRegistry, version: str, reason: str, by: str) -> Decision:
    """An explicit pointer move (``champion --set``, ``train --champion``): under the lock, and
    recorded. Raises RegistryError for an unknown version and PromotionLockBusy while another
    process holds the lock (nothing is moved or recorded then)."""
    registry.resolve(version)  # an unknown version is refused before the lock is taken
    with PromotionLock(registry, owner=f"{by} ({version})") as lock:
        current = registry.champion()
        lock.check()
        registry.set_champion(version, reason=reason)
    decision = Decision(version, current["version"] if current else None, None, None, 0.0, True, reason, 0,
                        _now().isoformat(), by=by)
    record_decision(registry, decision)
    return decision


def champion_after_training(registry: ModelRegistry, version: str, pinned: bool) -> Decision | None:
    """What ``train`` does with the pointer: ``--champion`` pins the new version; otherwise the
    first version of an empty registry becomes the champion (nothing to beat), through the same
    compare-and-swap as a retrain, so a version that another run made champion meanwhile stays.
    None when nothing was decided (a champion exists and ``--champion`` was not given)."""
    if pinned:
        return pin_champion(registry, version, reason="--champion at training", by="train --champion")
    if registry.champion() is not None:
        return None
    promoted, why = promote_if_unchanged(registry, version, None, reason=FIRST_VERSION, owner=f"train ({version})")
    decision = Decision(version, None, None, None, 0.0, promoted, why, 0, _now().isoformat(), by="train")
    record_decision(registry, decision)
    return decision


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
