"""What a cross-validated run leaves per (job, fold), and where: the weights, the out-of-fold
predictions and the epoch history, copied from the trial's last checkpoint to
``{artifacts}/{job}/{fold name}/``."""

from __future__ import annotations

ALL_FOLDS = -1  # fold id of the final fit on every study
STATE_FILE = "state.pt"  # a checkpoint's resume state; stays with the checkpoint, not copied
OOF_FILE = "oof.parquet"
HISTORY_FILE = "history.json"


def weights_file(job: str) -> str:
    """The file name of a job's shipped weights (in the artefacts and in the registry version)."""
    return f"{job}.pt"


def fold_name(fold: int) -> str:
    """``all`` for the fit on every study, else ``fold{k}``."""
    return "all" if fold == ALL_FOLDS else f"fold{fold}"


def fold_dir(artifacts: str, job: str, fold: int) -> str:
    """The folder of one (job, fold)'s artefacts."""
    return f"{artifacts}/{job}/{fold_name(fold)}"
