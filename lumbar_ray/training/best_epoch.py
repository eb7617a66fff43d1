"""Which epoch of a fold ships: the best validation round so far, the files it left (weights,
out-of-fold predictions), and when patience has run out.

Pure bookkeeping (no Ray, no torch): the worker loops (:mod:`.scorer_loop`, :mod:`.detector_loop`)
feed it one validation round at a time and save :meth:`BestEpoch.state_dict` in every checkpoint,
so a worker restarted from a checkpoint resumes with the same best epoch, the same best files and
the same count of rounds without improvement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def is_validation_epoch(epoch: int, epochs: int, val_every: int) -> bool:
    """Whether epoch ``epoch`` (0-based) of ``epochs`` ends with a validation round: every
    ``val_every`` epochs, and always the last, so the best of the rounds covers the final weights."""
    if val_every < 1:
        raise ValueError(f"val_every must be at least 1, not {val_every}")
    return (epoch + 1) % val_every == 0 or epoch == epochs - 1


@dataclass
class BestEpoch:
    """The best validation round of one training run, and its early-stopping count.

    A round's value that is None or NaN is no candidate: nothing was measured, or the model is
    not one to keep (a detector that finds nothing: :func:`.detector_eval.collapsed`). Patience
    counts rounds since the best one, so before any candidate there is nothing to stop on: a
    detector that is slow to find anything gets the whole schedule. Ties keep the earlier epoch.
    """

    higher_is_better: bool
    # Validation rounds without improvement after which training stops; 0 or None: never.
    patience: int | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)  # the best round's metrics, as recorded
    best_files: dict[str, bytes] = field(default_factory=dict)  # the best round's artefact files
    stale_rounds: int = 0  # rounds since the best one
    rounds: int = 0

    def update(self, epoch: int, value: float | None, files: dict[str, bytes],
               metrics: dict[str, Any] | None = None) -> bool:
        """Record one validation round; True when it is the new best (then its ``files`` and
        ``metrics`` are kept)."""
        self.rounds += 1
        if self.is_candidate(value) and self.improves(value):
            self.best_value, self.best_epoch = float(value), int(epoch)
            self.best_files, self.best_metrics = dict(files), dict(metrics or {})
            self.stale_rounds = 0
            return True
        if self.best_epoch is not None:
            self.stale_rounds += 1
        return False

    @staticmethod
    def is_candidate(value: float | None) -> bool:
        return value is not None and math.isfinite(value)

    def improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.higher_is_better else value < self.best_value

    @property
    def should_stop(self) -> bool:
        """Patience has run out: ``patience`` rounds since the best one."""
        return bool(self.patience) and self.best_epoch is not None and self.stale_rounds >= self.patience

    def shipped_files(self, last_files: dict[str, bytes]) -> dict[str, bytes]:
        """What the run ships: the best round's files; the last epoch's (``last_files``) when no
        round was a candidate (no validation data, or a collapsed detector: then the trial retries)."""
        return dict(self.best_files) if self.best_epoch is not None else dict(last_files)

    def summary(self) -> dict[str, Any]:
        """The figures a trial reports and the card records (flat, JSON-safe)."""
        return {"best_epoch": -1 if self.best_epoch is None else self.best_epoch,
                "best_value": float("nan") if self.best_value is None else self.best_value,
                "validation_rounds": self.rounds}

    def state_dict(self) -> dict[str, Any]:
        """Everything, for a checkpoint (``torch.save`` keeps the bytes as they are)."""
        return {"higher_is_better": self.higher_is_better, "patience": self.patience,
                "best_value": self.best_value, "best_epoch": self.best_epoch,
                "best_metrics": dict(self.best_metrics), "best_files": dict(self.best_files),
                "stale_rounds": self.stale_rounds, "rounds": self.rounds}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BestEpoch:
        return cls(**state)
