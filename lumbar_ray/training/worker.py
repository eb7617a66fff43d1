"""What every TorchTrainer worker loop shares: its threads, resuming from the
trial's last checkpoint, and reporting an epoch with its checkpoint files."""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import ray.train
import ray.train.collective
import ray.train.torch
import torch

from lumbar_ray.training.artifacts import STATE_FILE


def set_worker_threads(cfg: dict) -> None:
    """Torch's intra-op threads: as many as the worker's CPUs."""
    torch.set_num_threads(max(1, int(cfg["threads"])))


def load_resume_state() -> dict | None:
    """The state saved with the trial's last reported checkpoint, or None on a first attempt."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def initial_weights(cfg: dict, job: str) -> bytes | None:
    """The weights file ``job`` starts from on a warm start (training/warm_start.py), else None."""
    refs = cfg.get("init_refs", {}).get(job)
    return ray.get(refs[0]) if refs else None


def start_position(resumed: dict | None) -> tuple[int, list[dict]]:
    """The first epoch to train and the history so far: (0, []) on a first attempt, else the
    epoch after the checkpoint's, with a ``resumed`` event appended to its history."""
    if resumed is None:
        return 0, []
    start_epoch, history = resumed["epoch"] + 1, resumed["history"]
    history.append({"event": "resumed", "epoch": start_epoch, "time": time.time()})
    return start_epoch, history


def is_rank_zero() -> bool:
    return ray.train.get_context().get_world_rank() == 0


def rank_zero_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank. Only rank 0 validates, so only it knows when to stop
    early; every rank must leave the epoch loop together, or the others would wait in their next
    all-reduce. Call it on every rank at the same points of the loop. Ray Train's broadcast (its
    synchronisation actor, as its reports use), not torch.distributed's: ranks wait there while
    rank 0 validates, which may outlast the process group's timeout (30 min) on a large fold."""
    return bool(ray.train.collective.broadcast_from_rank_zero(bool(flag)))


def report_epoch(metrics: dict, state: dict, extra_files: dict[str, bytes] | None = None) -> None:
    """Every rank reports; rank 0 attaches the checkpoint: ``state`` (model, optimizer, epoch,
    history) as :data:`STATE_FILE` and ``extra_files`` (name -> bytes) next to it."""
    # node, device and DDP world size recorded with every epoch: where and how a trial ran is
    # part of its record.
    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id(),
               "device": str(ray.train.torch.get_device()),
               "world_size": ray.train.get_context().get_world_size()}
    if not is_rank_zero():
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, os.path.join(directory, STATE_FILE))
        for name, data in (extra_files or {}).items():
            Path(directory, name).write_bytes(data)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """A frame as the bytes of a parquet file (a checkpoint file)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()
