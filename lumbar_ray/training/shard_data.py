"""What a trial's worker loop trains and validates on, read from the run's example shards
(:mod:`lumbar_ray.training.shards`): only its own model's shards (a detector: its series type's),
only the folds it needs, and only a few chunks in memory at a time.

* :func:`scorer_fold_data` — DeepScoreNet's training :class:`CropDataset` and validation rows.
* :func:`detector_fold_data` — a detector's training slices, validation studies and their points.
* :func:`block_loader` — a DataLoader whose :class:`ShardBlockSampler` shuffles chunk by chunk, so
  that a small cache of decoded chunks serves a whole epoch; it is a ``DistributedSampler``, so
  ``ray.train.torch.prepare_data_loader`` keeps it and each DDP rank reads its share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data.distributed import DistributedSampler

from lumbar_ray.config import ScorerConfig
from lumbar_ray.models.deepscorenet import predict_proba
from lumbar_ray.training.artifacts import ALL_FOLDS
from lumbar_ray.training.crop_data import CropDataset
from lumbar_ray.training.shards import Manifest, ShardedCrops, ShardedSamples, read_points

# Chunks shuffled together: the items of this many chunks are mixed within an epoch, and a reader
# keeps as many decoded (a few tens of MB); batches then mix ~30 studies, not one.
WINDOW_CHUNKS = 4


def block_shuffled_order(blocks: np.ndarray, rng: np.random.Generator, window: int = WINDOW_CHUNKS) -> np.ndarray:
    """A permutation of ``range(len(blocks))`` that visits the blocks in random order,
    ``window`` blocks at a time, the items of each window shuffled together."""
    blocks = np.asarray(blocks)
    unique = rng.permutation(np.unique(blocks))
    parts = []
    for start in range(0, len(unique), max(1, window)):
        items = np.flatnonzero(np.isin(blocks, unique[start:start + window]))
        parts.append(rng.permutation(items))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


class ShardBlockSampler(DistributedSampler):
    """This rank's items of a chunk-wise shuffle (:func:`block_shuffled_order`), redrawn by
    :meth:`set_epoch`. Ranks take every ``num_replicas``-th item of one shared order (padded as
    ``DistributedSampler`` pads), so they read the same chunks at the same time."""

    def __init__(self, dataset, blocks_of: Callable[[], np.ndarray], seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 window: int = WINDOW_CHUNKS):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.blocks_of, self.window = blocks_of, window

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.num_replicas)

    def __iter__(self):
        # the dataset's items may change with the epoch (CropDataset redraws its oversampling)
        blocks = np.asarray(self.blocks_of())
        order = block_shuffled_order(blocks, np.random.default_rng([self.seed, self.epoch, 3]), self.window)
        total = len(self) * self.num_replicas
        if total > len(order) and len(order):
            order = np.concatenate([order, np.resize(order, total - len(order))])
        return iter(order[self.rank:total:self.num_replicas].tolist())


def block_loader(dataset, batch_size: int, seed: int, *, num_replicas: int = 1, rank: int = 0,
                 collate_fn=None, drop_last: bool = False, window: int = WINDOW_CHUNKS) -> torch.utils.data.DataLoader:
    """A training DataLoader over ``dataset`` (which has ``item_blocks()``) shuffled chunk-wise
    by a :class:`ShardBlockSampler` for rank ``rank`` of ``num_replicas``."""
    sampler = ShardBlockSampler(dataset, dataset.item_blocks, seed=seed, num_replicas=num_replicas, rank=rank,
                                window=window)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                       collate_fn=collate_fn)


def fold_chunks(manifest: Manifest, fold: int):
    """(training chunks, validation chunks) of ``fold``: the other folds' and its own; every
    fold's and none for :data:`ALL_FOLDS`."""
    if fold == ALL_FOLDS:
        return manifest.chunks_for(None), []
    return manifest.chunks_for(None, exclude=fold), manifest.chunks_for({fold})


def known_studies(points: pd.DataFrame, folds: dict[int, int]) -> pd.DataFrame:
    """Rows of studies that have a fold (the trial's fold map decides, as it always did)."""
    if points.empty:
        return points.reset_index(drop=True)
    return points[points["study_id"].astype(np.int64).isin([int(s) for s in folds])].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# DeepScoreNet
# ---------------------------------------------------------------------------------------------


@dataclass
class ScorerValidation:
    """A fold's validation rows: their labelled points, and their crops read chunk by chunk."""

    points: pd.DataFrame  # POINT_COLUMNS (+ chunk, row), row i <-> crops row i
    crops: ShardedCrops

    def __len__(self) -> int:
        return len(self.points)

    def predict(self, net, device, batch_size: int = 512) -> np.ndarray:
        """(n, 3) probabilities of ``net`` for every validation row, in row order."""
        parts = [predict_proba(net, batch, batch_size=batch_size, device=device) for batch in self.crops.batches(batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.float32)


@dataclass
class ScorerFoldData:
    dataset: CropDataset  # the training rows, oversampled and augmented
    labels: np.ndarray  # the training rows' labels (before oversampling)
    in_channels: int
    val: ScorerValidation


def scorer_fold_data(cfg: dict, fold: int) -> ScorerFoldData:
    """DeepScoreNet's data for ``fold`` from the worker config (``examples``: the run's examples
    folder, ``folds``: study -> fold, ``scorer``, ``seed``)."""
    sc = ScorerConfig(**cfg["scorer"])
    manifest = Manifest.read(cfg["examples"])
    train_chunks, val_chunks = fold_chunks(manifest, fold)
    train_points = known_studies(read_points(manifest.root, train_chunks), cfg["folds"])
    val_points = known_studies(read_points(manifest.root, val_chunks), cfg["folds"])
    labels = train_points["label"].to_numpy(dtype=np.int64) if len(train_points) else np.zeros(0, dtype=np.int64)
    # One scorer grades every series type, so no single mirror rule applies: no flips
    # (CropDataset's series_type=None); the other augmentations are label-preserving. The
    # training rows also get the localisation noise of detection (a neighbouring slice's crop,
    # a few mm of shift); validation grades the labelled slice's crops.
    dataset = CropDataset(ShardedCrops(manifest.root, train_points, manifest.channels), labels, channels=sc.channels,
                          max_factor=sc.max_oversample, seed=cfg["seed"], crop_mm=sc.crop_mm)
    val = ScorerValidation(val_points, ShardedCrops(manifest.root, val_points, manifest.channels, cache_chunks=1))
    return ScorerFoldData(dataset, labels, manifest.channels, val)


# ---------------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------------


@dataclass
class DetectorFoldData:
    train_samples: ShardedSamples  # the training folds' slices of the series type, read lazily
    val_studies: list[int]  # the fold's studies (none for ALL_FOLDS)
    points: pd.DataFrame  # the labelled points of the validation studies, every series type's


def detector_fold_data(cfg: dict, series_type: str, fold: int) -> DetectorFoldData:
    """A detector's data for ``fold``: only ``series_type``'s slice shards are read."""
    manifest = Manifest.read(cfg["examples"])
    train_chunks, val_chunks = fold_chunks(manifest, fold)
    samples = ShardedSamples(manifest.root, series_type, train_chunks)
    val_studies = [] if fold == ALL_FOLDS else sorted(int(s) for s, f in cfg["folds"].items() if f == fold)
    points = known_studies(read_points(manifest.root, val_chunks), cfg["folds"])
    return DetectorFoldData(samples, val_studies, points)
