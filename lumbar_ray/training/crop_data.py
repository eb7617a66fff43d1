"""DeepScoreNet's training data: minority oversampling with label-preserving crop augmentation.

* :class:`CropAugment`, :func:`augment_crop`, :func:`augment_crops` — random augmentation of
  normalised crops (flips only along the patient left-right mirror, see
  :func:`lumbar_ray.models.crops.mirror_axis`).
* :func:`oversample_indices`, :class:`CropDataset` — oversampled Moderate/Severe rows, augmented
  on the fly, with the localisation noise a detector brings: now and then the crop of a
  neighbouring slice (:attr:`CropAugment.slice_jitter_p`) and an in-plane shift of a few mm
  (:attr:`CropAugment.max_shift_mm`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from lumbar_ray.models.crops import mirror_axis
from lumbar_ray.models.deepscorenet import class_counts


@dataclass(frozen=True)
class CropAugment:
    """Label-preserving augmentation of normalised crops (values in [0, 1])."""

    mirror_p: float = 0.5  # probability of the patient left-right mirror (see mirror_axis)
    max_rotation_deg: float = 10.0  # uniform in [-a, a], about the crop's centre point
    max_shift_px: float = 2.0  # uniform in [-a, a] per axis (crops in pixels; see max_shift_mm)
    # For crops cut in mm (ScorerConfig.crop_mm) the shift is set in mm and replaces max_shift_px
    # (shift_in_pixels): the detectors' in-plane error is a few mm (99 % within 5 mm,
    # docs/RESULTS.md), so +-3 mm per axis (up to 4.2 mm off the point) covers what the grader
    # meets; 3 px of a 32 mm crop.
    max_shift_mm: float | None = 3.0
    # Probability that a training item is the crop of slice k-1 or k+1 (of the labelled slice's
    # slab, even odds) instead of k, when the dataset has neighbour crops. The detectors put
    # 5-7 % of sagittal targets on a neighbouring slice (docs/RESULTS.md) and a label near the
    # midpoint of two slices is itself a coin toss, so the grader must give a neighbouring slice
    # the same grade; several times the detectors' error rate makes that robust, while 70 % of
    # the draws still show the labelled slice that validation grades.
    slice_jitter_p: float = 0.3
    max_scale: float = 0.1  # zoom uniform in [1 - a, 1 + a]
    gamma: float = 0.2  # intensity gamma exp(U(-a, a))
    contrast: float = 0.1  # multiply by U(1 - a, 1 + a)
    brightness: float = 0.1  # add U(-a, a)
    noise_std: float = 0.02  # additive Gaussian noise


def shift_in_pixels(config: CropAugment, crop_mm: float | None, size_px: int) -> CropAugment:
    """``config`` with ``max_shift_px`` = ``max_shift_mm`` in pixels of a crop ``crop_mm`` wide
    cut to ``size_px``; unchanged for crops in pixels (``crop_mm`` None: their mm per pixel
    varies with the series) or without ``max_shift_mm``."""
    if crop_mm is None or config.max_shift_mm is None:
        return config
    if not crop_mm > 0:
        raise ValueError(f"crop_mm must be positive, got {crop_mm}")
    return dataclasses.replace(config, max_shift_px=float(config.max_shift_mm) * size_px / float(crop_mm))


def augment_crop(
    crop: np.ndarray,
    rng: np.random.Generator,
    config: CropAugment = CropAugment(),
    flip_axis: int | None = None,
) -> np.ndarray:
    """One random augmentation of a (C, H, W) crop in [0, 1]; returns a new float32 array in
    [0, 1]. ``flip_axis`` from :func:`mirror_axis` (None: no flip)."""
    out = np.asarray(crop, dtype=np.float32)
    if out.ndim != 3:
        raise ValueError(f"crop must be (C, H, W), got {out.shape}")
    if flip_axis is not None and rng.random() < config.mirror_p:
        out = np.flip(out, axis=flip_axis)
    angle = math.radians(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
    scale = rng.uniform(1 - config.max_scale, 1 + config.max_scale)
    shift = rng.uniform(-config.max_shift_px, config.max_shift_px, size=2)
    if angle or scale != 1 or shift.any():
        h, w = out.shape[1:]
        centre = np.array([h // 2, w // 2], dtype=np.float64)  # where extract_crop puts the point
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        m2 = np.array([[cos, -sin], [sin, cos]])
        matrix = np.eye(3)
        matrix[1:, 1:] = m2
        offset = np.zeros(3)
        offset[1:] = centre - m2 @ centre - shift
        out = ndimage.affine_transform(out, matrix, offset=offset, order=1, mode="nearest")
    out = np.clip(out, 0.0, 1.0) ** math.exp(rng.uniform(-config.gamma, config.gamma))
    out = out * rng.uniform(1 - config.contrast, 1 + config.contrast) + rng.uniform(
        -config.brightness, config.brightness
    )
    if config.noise_std > 0:
        out = out + rng.normal(0.0, config.noise_std, size=out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def oversample_indices(
    labels: Sequence[int] | np.ndarray,
    rng: np.random.Generator,
    max_factor: float = 4.0,
    classes: Sequence[int] = (1, 2),
) -> np.ndarray:
    """Indices of the originals (0..N-1, in order) followed by extra draws of minority rows.

    Each class c in ``classes`` (Moderate, Severe) grows to ``min(n_max, round(max_factor *
    n_c))`` rows, n_max = the largest class count; extra rows cycle through a shuffled order of
    the class so every original is repeated about equally often. Missing labels (-1) are never
    oversampled.
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    n_max = class_counts(labels).max() if labels.size else 0
    extra = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        target = min(n_max, int(round(max_factor * idx.size)))
        n_extra = max(target - idx.size, 0)
        if n_extra:
            extra.append(np.resize(rng.permutation(idx), n_extra))
    return np.concatenate([np.arange(labels.size)] + extra).astype(np.int64)


def augment_crops(
    crops: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    rng: np.random.Generator,
    series_type: str | None = None,
    channels: str = "repeat",
    config: CropAugment = CropAugment(),
    max_factor: float = 4.0,
    minority_classes: Sequence[int] = (1, 2),
) -> tuple[np.ndarray, np.ndarray]:
    """Minority-class augmentation of a set of crops (N, C, H, W) with labels (N,).

    Returns the originals, unchanged and in order, followed by augmented copies of Moderate and
    Severe crops (:func:`oversample_indices`); labels are carried over unchanged. Flips only as
    :func:`mirror_axis` allows for ``series_type`` / ``channels``.
    """
    crops = np.asarray(crops, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if len(crops) != len(labels):
        raise ValueError(f"{len(crops)} crops but {len(labels)} labels")
    index = oversample_indices(labels, rng, max_factor, minority_classes)
    flip = mirror_axis(series_type, channels)
    extra = index[len(labels):]
    out = np.empty((len(index),) + crops.shape[1:], dtype=np.float32)
    out[: len(labels)] = crops
    for j, i in enumerate(extra, start=len(labels)):
        out[j] = augment_crop(crops[i], rng, config, flip)
    return out, labels[index]


class ArrayCropRows:
    """Crops held in memory as a :class:`CropDataset` row source: (N, C, H, W) crops and,
    optionally, their (N, 2, C, H, W) neighbour crops (slices k-1, k+1)."""

    def __init__(self, crops: np.ndarray, neighbour_crops: np.ndarray | None = None):
        self.crops = np.asarray(crops, dtype=np.float32)
        self.neighbour_crops = None if neighbour_crops is None else np.asarray(neighbour_crops, dtype=np.float32)
        if self.neighbour_crops is not None and self.neighbour_crops.shape != (len(self.crops), 2, *self.crops.shape[1:]):
            raise ValueError(f"neighbour_crops must be {(len(self.crops), 2, *self.crops.shape[1:])}, "
                             f"got {self.neighbour_crops.shape}")
        self.shape = self.crops.shape
        self.has_neighbours = self.neighbour_crops is not None

    def __len__(self) -> int:
        return len(self.crops)

    def crop(self, i: int, offset: int = 0) -> np.ndarray:
        """Row i's crop (offset 0), or its neighbour on slice k-1 / k+1 (offset -1 / +1)."""
        return self.crops[i] if offset == 0 else self.neighbour_crops[i, (offset + 1) // 2]


class CropDataset(torch.utils.data.Dataset):
    """Crops + labels for training, with minority oversampling and on-the-fly augmentation.

    Items are (float32 tensor (C, H, W), int64 label). The index (originals + oversampled
    Moderate/Severe rows) is redrawn by :meth:`set_epoch`; oversampled rows are always
    augmented, originals only when ``augment_all``. Randomness is keyed on (seed, epoch, item),
    so results do not depend on DataLoader workers. ``oversample=False`` and ``augment=None``
    give a plain evaluation dataset (no slice jitter either).

    ``neighbour_crops`` (N, 2, C, H, W), the crops of slices k-1 and k+1
    (:func:`lumbar_ray.models.crops.extract_neighbour_crops`): with ``augment``, every item,
    originals included, is one of them with probability ``augment.slice_jitter_p`` — on
    originals too, or the jittered crops would all be Moderate/Severe oversampled rows and the
    grader would learn "off the labelled slice" as a sign of severity. ``crop_mm``: the crops'
    side in mm, which turns ``augment.max_shift_mm`` into pixels (:func:`shift_in_pixels`).

    ``crops`` may also be a row source read lazily (``crop(i, offset)``, ``shape``,
    ``has_neighbours``, ``blocks``: :class:`lumbar_ray.training.shards.ShardedCrops`), its
    neighbours included; :meth:`item_blocks` then tells a sampler which items share a shard.
    """

    def __init__(
        self,
        crops: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        series_type: str | None = None,
        channels: str = "repeat",
        augment: CropAugment | None = CropAugment(),
        oversample: bool = True,
        max_factor: float = 4.0,
        augment_all: bool = False,
        seed: int = 0,
        neighbour_crops: np.ndarray | None = None,
        crop_mm: float | None = None,
    ):
        # an in-memory array, or a lazily read row source (training.shards.ShardedCrops)
        self.rows = crops if hasattr(crops, "crop") else ArrayCropRows(crops, neighbour_crops)
        self.labels = np.asarray(labels, dtype=np.int64).ravel()
        if len(self.rows) != len(self.labels):
            raise ValueError(f"{len(self.rows)} crops but {len(self.labels)} labels")
        self.flip_axis = mirror_axis(series_type, channels)
        self.augment = None if augment is None else shift_in_pixels(augment, crop_mm, self.rows.shape[-1])
        self.oversample = oversample
        self.max_factor = max_factor
        self.augment_all = augment_all
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.oversample:
            rng = np.random.default_rng([self.seed, epoch, 0])
            self.index = oversample_indices(self.labels, rng, self.max_factor)
        else:
            self.index = np.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.index)

    def item_blocks(self) -> np.ndarray:
        """This epoch's block (shard chunk) of each item, for
        :class:`lumbar_ray.training.shard_data.ShardBlockSampler`; one block in memory."""
        blocks = getattr(self.rows, "blocks", None)
        return np.zeros(len(self.index), dtype=np.int64) if blocks is None else np.asarray(blocks)[self.index]

    def slice_offset(self, item: int) -> int:
        """Which slice item ``item`` shows this epoch: 0 (the labelled one), -1 or +1."""
        if self.augment is None or not self.rows.has_neighbours or not self.augment.slice_jitter_p > 0:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, 2, item])
        if rng.random() >= self.augment.slice_jitter_p:
            return 0
        return -1 if rng.random() < 0.5 else 1

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(self.index[item])
        offset = self.slice_offset(item)
        crop = self.rows.crop(i, offset)
        if self.augment is not None and (self.augment_all or item >= len(self.labels)):
            rng = np.random.default_rng([self.seed, self.epoch, 1, item])
            crop = augment_crop(crop, rng, self.augment, self.flip_axis)
        return torch.from_numpy(np.ascontiguousarray(crop)), torch.tensor(self.labels[i])
