"""Severity scorer: DeepScoreNet, its focal loss, crops, and minority-class augmentation.

Everything here is pure (numpy / torch, no Ray, no storage):

* :class:`DeepScoreNet` — a straight PyTorch transcription of the published Keras layout
  (3x32x32 crop -> 3 severity logits). 2,784,259 trainable parameters plus 3,392 BatchNorm
  running-stat values = 2,787,651, the number Keras reports for the same layout.
* :class:`FocalLoss` — class-weighted multi-class focal loss (gamma = 3 in the paper).
* :func:`extract_crop` / :func:`extract_crops` — crops around a point of a volume, in pixels or
  in millimetres, single-slice ("repeat") or 2.5D ("adjacent").
* :func:`augment_crop`, :func:`augment_crops`, :class:`CropDataset` — minority-class
  oversampling with label-preserving augmentation.
* :func:`predict_proba` — batched softmax inference.

Volumes follow docs/CONVENTIONS.md: numpy ``(n_slices, rows, cols)``, points as
(slice index, x = column, y = row), PixelSpacing = (row_spacing, col_spacing) in mm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES, SEVERITIES

log = logging.getLogger(__name__)

NUM_CLASSES = len(SEVERITIES)
CROP_SIZE = 32
# Keras BatchNormalization defaults: epsilon=1e-3, momentum=0.99 (moving = 0.99*moving + 0.01*batch).
KERAS_BN_EPS = 1e-3


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def keras_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow/Keras ``padding='same'`` along one axis.

    Output size is ``ceil(size / stride)``; the total padding needed is split with the smaller
    half *before* and the larger half *after* (asymmetric when odd), unlike PyTorch's symmetric
    ``padding=``. E.g. size 32, kernel 3, stride 2 -> (0, 1).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasSameMaxPool2d(nn.Module):
    """``keras.layers.MaxPooling2D(kernel, strides, padding='same')``.

    TensorFlow ignores padded cells in a max pool, i.e. pads with -inf; done explicitly with
    ``F.pad`` because PyTorch's ``MaxPool2d(padding=...)`` pads symmetrically.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = keras_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = keras_same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same' (Keras)"


class ResidualBlock(nn.Module):
    """n x [ReLU, Conv3x3(f, same), BN] -> MaxPool(3, 2, same) + Conv1x1(f, stride 2)(input).

    The 1x1 stride-2 residual conv needs no padding for Keras 'same' (total padding is always 0
    for a 1x1 kernel), and gives ceil(size / 2) like the pool, so the shapes always add up.
    """

    def __init__(self, in_channels: int, filters: int, n_convs: int, bn_momentum: float):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(n_convs):
            layers += [
                nn.ReLU(),  # not in-place: the block input also feeds the residual
                nn.Conv2d(channels, filters, kernel_size=3, padding=1, bias=True),
                nn.BatchNorm2d(filters, eps=KERAS_BN_EPS, momentum=bn_momentum),
            ]
            channels = filters
        self.body = nn.Sequential(*layers)
        self.pool = KerasSameMaxPool2d(3, 2)
        self.residual = nn.Conv2d(in_channels, filters, kernel_size=1, stride=2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)) + self.residual(x)


class DeepScoreNet(nn.Module):
    """The paper's severity CNN, transcribed layer by layer from its Keras layout.

    Keras layout (all convs ``padding='same'`` with bias, the Keras default)::

        x = Conv2D(32, 3)(in); x = BatchNormalization()(x); x = ReLU(x); prev = x
        for f, n in ((64, 2), (128, 4), (256, 4)):
            n x [ReLU, Conv2D(f, 3), BatchNormalization]
            x = MaxPooling2D(3, strides=2, padding='same')(x)
            x = add([x, Conv2D(f, 1, strides=2, padding='same')(prev)]); prev = x
        GlobalAveragePooling2D -> Dense(256, relu) -> Dense(128, relu) -> Dense(3, softmax)

    ``forward`` returns logits (softmax at inference, see :func:`predict_proba`). At 3x32x32:
    2,784,259 trainable parameters + 3,392 BN running statistics (1,696 channels x 2, which
    Keras counts as non-trainable parameters) = 2,787,651. Spatial size goes 32 -> 16 -> 8 -> 4.

    ``bn_momentum`` is PyTorch's convention (weight of the *new* batch). Keras' default 0.99
    corresponds to 0.01; the PyTorch default 0.1 is used here because with short trainings
    Keras' slow moving averages leave eval-mode statistics far from the data.
    ``keras_init`` uses Keras' initialisers (Glorot-uniform kernels, zero biases).
    """

    BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 4), (256, 4))

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = NUM_CLASSES,
        bn_momentum: float = 0.1,
        keras_init: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, bias=True),
            nn.BatchNorm2d(32, eps=KERAS_BN_EPS, momentum=bn_momentum),
            nn.ReLU(),
        )
        blocks = []
        channels = 32
        for filters, n_convs in self.BLOCKS:
            blocks.append(ResidualBlock(channels, filters, n_convs, bn_momentum))
            channels = filters
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        if keras_init:
            self._keras_init()

    def _keras_init(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    bn_running_stats: int  # running_mean + running_var values (Keras' non-trainable params)

    @property
    def keras_total(self) -> int:
        return self.trainable + self.bn_running_stats


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable parameters and BatchNorm running-stat values (``num_batches_tracked`` excluded)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    running = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            running += m.running_mean.numel() + m.running_var.numel()
    return ParameterCount(trainable, running)


# --------------------------------------------------------------------------------------------
# Loss and class weights
# --------------------------------------------------------------------------------------------


class FocalLoss(nn.Module):
    """Class-weighted multi-class focal loss (Lin et al. 2017).

    Per sample with true class t: ``loss = -w[t] * (1 - p_t) ** gamma * log(p_t)``, p = softmax.
    ``reduction='mean'`` divides by the number of (non-ignored) samples, like Keras'
    ``CategoricalFocalCrossentropy`` (not by the sum of weights as ``F.cross_entropy(weight=)``
    does); with :func:`class_weights_from_labels` the average weight per sample is 1, so the
    scale matches the unweighted loss. ``gamma=0`` without weights is exactly cross entropy.
    Targets equal to ``ignore_index`` (missing label, -1) are dropped.
    """

    def __init__(
        self,
        gamma: float = 3.0,
        class_weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -1,
    ):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        self.gamma = float(gamma)
        self.reduction = reduction
        self.ignore_index = ignore_index
        if class_weights is None:
            self.register_buffer("class_weights", None)
        else:
            self.register_buffer("class_weights", torch.as_tensor(np.asarray(class_weights, dtype=np.float32)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        valid = target != self.ignore_index
        logits, target = logits[valid], target[valid]
        log_p = F.log_softmax(logits.float(), dim=1)
        log_p_t = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        p_t = log_p_t.exp()
        loss = -((1.0 - p_t).clamp_min(0.0) ** self.gamma) * log_p_t
        if self.class_weights is not None:
            loss = loss * self.class_weights.to(loss.device)[target]
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        if loss.numel() == 0:  # a batch of only missing labels: zero, but keep the graph
            return logits.sum() * 0.0
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts of each class id; missing labels (< 0) are ignored."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    labels = labels[labels >= 0]
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} out of range for {num_classes} classes")
    return np.bincount(labels, minlength=num_classes)


def class_weights_from_labels(labels: Sequence[int] | np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Inverse-frequency class weights, normalised so the mean weight per *sample* is 1.

    ``w_c = N / (K * n_c)`` (scikit-learn's ``class_weight='balanced'``), so
    ``sum_c n_c * w_c = N``. A class absent from ``labels`` is counted as 1 (a large but finite
    weight). Missing labels (-1) are ignored.
    """
    counts = class_counts(labels, num_classes)
    n = counts.sum()
    if n == 0:
        return np.ones(num_classes, dtype=np.float32)
    return (n / (num_classes * np.maximum(counts, 1))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------


def _slice_indices(n_slices: int, k: int, channels: str, n_channels: int) -> np.ndarray:
    if not 0 <= k < n_slices:
        raise IndexError(f"slice index {k} outside a volume of {n_slices} slices")
    if channels == "repeat":
        return np.full(n_channels, k)
    if channels == "adjacent":
        # k - C//2 ... k + C//2 (k-1, k, k+1 for 3 channels), edge slices repeated at the ends.
        return np.clip(k + np.arange(n_channels) - n_channels // 2, 0, n_slices - 1)
    raise ValueError(f"channels must be 'repeat' or 'adjacent', got {channels!r}")


def normalize_crop(
    crop: np.ndarray, valid: np.ndarray | None = None, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Robust per-crop scaling to [0, 1]: the low/high percentiles of the valid pixels (all
    channels together, so relative intensities of adjacent slices survive) map to 0/1, values
    beyond are clipped. Invalid pixels (outside the image) become 0; a flat crop becomes 0."""
    crop = np.asarray(crop, dtype=np.float32)
    if valid is None:
        valid = np.isfinite(crop)
    out = np.zeros(crop.shape, dtype=np.float32)
    values = crop[valid]
    if values.size == 0:
        return out
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        return out
    scaled = np.clip((crop - lo) / (hi - lo), 0.0, 1.0)
    out[valid] = scaled[valid]
    return out


def _sample_plane(
    plane: np.ndarray, rows: np.ndarray, cols: np.ndarray, sigma: tuple[float, float]
) -> np.ndarray:
    """Bilinear samples of ``plane`` on the grid rows x cols; NaN outside the image.

    When the grid is coarser than the pixels (``sigma`` > 0) a Gaussian pre-filter on a local
    window avoids aliasing (sigma = (step - 1) / 2, as scikit-image's anti-aliasing)."""
    n_rows, n_cols = plane.shape
    r0, c0 = 0, 0
    window = plane
    if max(sigma) > 0:
        margin = [int(math.ceil(4 * s)) + 1 for s in sigma]
        r0 = max(int(math.floor(rows.min())) - margin[0], 0)
        r1 = min(int(math.ceil(rows.max())) + margin[0] + 1, n_rows)
        c0 = max(int(math.floor(cols.min())) - margin[1], 0)
        c1 = min(int(math.ceil(cols.max())) + margin[1] + 1, n_cols)
        if r1 <= r0 or c1 <= c0:
            return np.full((rows.size, cols.size), np.nan, dtype=np.float32)
        window = ndimage.gaussian_filter(plane[r0:r1, c0:c1].astype(np.float32), sigma, mode="nearest")
    rr, cc = np.meshgrid(rows - r0, cols - c0, indexing="ij")
    # mode='constant': points outside [0, n-1] get cval, no interpolation across the edge.
    return ndimage.map_coordinates(
        window.astype(np.float32, copy=False), [rr, cc], order=1, mode="constant", cval=np.nan
    ).astype(np.float32)


def extract_crop(
    volume: np.ndarray,
    slice_index: int,
    x: float,
    y: float,
    size_px: int = CROP_SIZE,
    channels: str = "repeat",
    mm: float | tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    n_channels: int = 3,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """A ``(n_channels, size_px, size_px)`` float32 crop centred on (x = column, y = row).

    * Pixel mode (``mm=None``): the centre is rounded to the nearest pixel and the crop copies
      pixels ``[round(y) - size_px//2, round(y) + size_px - size_px//2)`` (rows; columns alike),
      so the point sits at index ``size_px // 2``.
    * Millimetre mode (``mm`` = side in mm, or (rows_mm, cols_mm)): a crop of that physical size
      resampled bilinearly to size_px x size_px, with ``pixel_spacing`` = (row_spacing,
      col_spacing); output pixel i is at offset ``(i - size_px//2) * mm / size_px`` from the
      (sub-pixel) centre. ``mm = size_px * spacing`` reproduces pixel mode at integer centres.
    * ``channels='repeat'``: slice k in every channel; ``'adjacent'``: slices k-1, k, k+1 (2.5D,
      in the volume's sorted slice order; the first/last slice is repeated at the ends).

    Pixels outside the image are padding: excluded from the percentile scaling and set to 0
    (see :func:`normalize_crop`). A 2-D ``volume`` is one slice.
    """
    volume = np.asarray(volume)
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slices, rows, cols), got shape {volume.shape}")
    k = int(round(float(slice_index)))
    slices = _slice_indices(volume.shape[0], k, channels, n_channels)
    offsets = np.arange(size_px, dtype=np.float64) - size_px // 2
    if mm is None:
        rows = math.floor(float(y) + 0.5) + offsets
        cols = math.floor(float(x) + 0.5) + offsets
        sigma = (0.0, 0.0)
    else:
        if pixel_spacing is None:
            raise ValueError("mm mode needs pixel_spacing=(row_spacing, col_spacing)")
        mm_r, mm_c = (float(mm), float(mm)) if np.isscalar(mm) else (float(mm[0]), float(mm[1]))
        step_r = mm_r / size_px / float(pixel_spacing[0])
        step_c = mm_c / size_px / float(pixel_spacing[1])
        rows = float(y) + offsets * step_r
        cols = float(x) + offsets * step_c
        sigma = (max(0.0, (step_r - 1) / 2), max(0.0, (step_c - 1) / 2))
    planes: dict[int, np.ndarray] = {}
    crop = np.empty((n_channels, size_px, size_px), dtype=np.float32)
    for c, s in enumerate(slices):
        s = int(s)
        if s not in planes:
            planes[s] = _sample_plane(volume[s], rows, cols, sigma)
        crop[c] = planes[s]
    valid = np.isfinite(crop)
    return normalize_crop(crop, valid, percentiles)


def extract_crops(
    volume: np.ndarray,
    points: np.ndarray | Sequence[Sequence[float]],
    size_px: int = CROP_SIZE,
    channels: str = "repeat",
    mm: float | tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    n_channels: int = 3,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """Crops for many points of one volume: ``points`` is (N, 3) of (slice_index, x, y);
    returns (N, n_channels, size_px, size_px) float32."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.empty((len(pts), n_channels, size_px, size_px), dtype=np.float32)
    for i, (k, x, y) in enumerate(pts):
        out[i] = extract_crop(
            volume, int(round(k)), x, y, size_px=size_px, channels=channels, mm=mm,
            pixel_spacing=pixel_spacing, n_channels=n_channels, percentiles=percentiles,
        )
    return out


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def mirror_axis(series_type: str | None, channels: str = "repeat") -> int | None:
    """The crop axis along which a flip is a patient left-right mirror, or None.

    Only the patient left-right mirror is used: the body is close to left-right symmetric, so a
    mirrored crop is still plausible anatomy with the same severity. Flips along other
    directions are not valid anatomy and are never used:

    * Axial T2 (subarticular): columns run towards patient Left, so a horizontal flip (axis 2)
      is the mirror. It turns a left recess into what a right one looks like; the label (the
      grade of the structure in the crop) is unchanged, which is right because one scorer
      grades both sides and is not told the side. A vertical flip would swap anterior and
      posterior (not valid), and so would reversing "adjacent" axial channels (superior and
      inferior).
    * Sagittal T1/T2 (foraminal, spinal): a horizontal flip swaps anterior/posterior and a
      vertical one superior/inferior (both invalid). The patient left-right axis is the slice
      axis, so with ``channels='adjacent'`` reversing the channel order (axis 0) is the mirror;
      with 'repeat' there is nothing to mirror.
    * ``None`` (unknown series): no flip.
    """
    if series_type is None:
        return None
    if series_type not in SERIES_TYPES:
        raise KeyError(f"unknown series type {series_type!r}; expected one of {SERIES_TYPES}")
    if series_type == AXIAL_T2:
        return 2
    if series_type in (SAGITTAL_T1, SAGITTAL_T2) and channels == "adjacent":
        return 0
    return None


@dataclass(frozen=True)
class AugmentConfig:
    """Label-preserving augmentation of normalised crops (values in [0, 1])."""

    mirror_p: float = 0.5  # probability of the patient left-right mirror (see mirror_axis)
    max_rotation_deg: float = 10.0  # uniform in [-a, a], about the crop's centre point
    max_shift_px: float = 2.0  # uniform in [-a, a] per axis
    max_scale: float = 0.1  # zoom uniform in [1 - a, 1 + a]
    gamma: float = 0.2  # intensity gamma exp(U(-a, a))
    contrast: float = 0.1  # multiply by U(1 - a, 1 + a)
    brightness: float = 0.1  # add U(-a, a)
    noise_std: float = 0.02  # additive Gaussian noise


def augment_crop(
    crop: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig = AugmentConfig(),
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
    config: AugmentConfig = AugmentConfig(),
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


class CropDataset(torch.utils.data.Dataset):
    """Crops + labels for training, with minority oversampling and on-the-fly augmentation.

    Items are (float32 tensor (C, H, W), int64 label). The index (originals + oversampled
    Moderate/Severe rows) is redrawn by :meth:`set_epoch`; oversampled rows are always
    augmented, originals only when ``augment_all``. Randomness is keyed on (seed, epoch, item),
    so results do not depend on DataLoader workers. ``oversample=False`` and ``augment=None``
    give a plain evaluation dataset.
    """

    def __init__(
        self,
        crops: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        series_type: str | None = None,
        channels: str = "repeat",
        augment: AugmentConfig | None = AugmentConfig(),
        oversample: bool = True,
        max_factor: float = 4.0,
        augment_all: bool = False,
        seed: int = 0,
    ):
        self.crops = np.asarray(crops, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64).ravel()
        if len(self.crops) != len(self.labels):
            raise ValueError(f"{len(self.crops)} crops but {len(self.labels)} labels")
        self.flip_axis = mirror_axis(series_type, channels)
        self.augment = augment
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

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(self.index[item])
        crop = self.crops[i]
        if self.augment is not None and (self.augment_all or item >= len(self.labels)):
            rng = np.random.default_rng([self.seed, self.epoch, 1, item])
            crop = augment_crop(crop, rng, self.augment, self.flip_axis)
        return torch.from_numpy(np.ascontiguousarray(crop)), torch.tensor(self.labels[i])


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Scoring-only speed-ups, in place: every Conv2d directly followed by a BatchNorm2d in a
    Sequential becomes one convolution (eval-mode statistics folded in; the BatchNorm becomes
    Identity) and the weights are stored channels-last. Same probabilities up to float rounding
    (tested); about a third faster on this project's CPU. Not for a model that will be trained
    again."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    crops: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    fixed_batch: bool = False,
) -> np.ndarray:
    """Softmax probabilities (N, num_classes) float32 of crops (N, C, H, W), in eval mode
    (the model's previous train/eval mode is restored afterwards).

    ``fixed_batch``: every forward pass gets exactly ``batch_size`` crops, the last one padded
    with zeros whose outputs are dropped (in eval mode each crop's output depends on that crop
    alone). Why: a long-lived CPU process that feeds the network ever new batch sizes grows
    without bound — glibc keeps the heap that each new size's activations fragmented (120 calls
    of 1..200 crops: private memory 340 -> 1,578 MB in whole-call passes, flat at 369 MB in
    fixed ones; ``python docs/experiments/scorer_memory.py``). One shape per model keeps the
    scoring actors flat over a run of any length."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n = len(crops)
    num_classes = getattr(model, "num_classes", NUM_CLASSES)
    out = np.empty((n, num_classes), dtype=np.float32)
    try:
        for start in range(0, n, batch_size):
            batch = crops[start : start + batch_size]
            batch = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
            m = len(batch)
            if fixed_batch and m < batch_size:
                batch = torch.cat([batch, batch.new_zeros((batch_size - m, *batch.shape[1:]))])
            logits = model(batch.to(device=device, dtype=torch.float32))
            out[start : start + m] = torch.softmax(logits[:m].float(), dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return out
