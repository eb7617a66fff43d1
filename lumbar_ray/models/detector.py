"""Step 1 of the method: one YOLOv8 detector per series type, trained from scratch.

Classes are the targets read on the series type (:func:`lumbar_ray.targets.targets_for_series`):
Sagittal T1 -> 10 foraminal (side x level), Sagittal T2/STIR -> 5 canal levels, Axial T2 -> 10
subarticular (side x level). A training image is one labelled instance (slice) of a series with
one fixed-size box per target labelled on it, centred on the labelled (x, y). Box sizes are in
millimetres (:data:`DEFAULT_BOX_MM`) and become pixels through the series' PixelSpacing.
Optionally a few unlabelled slices far from the labelled ones join as images without boxes
(``negatives``), so that confidence over a whole series peaks on the right slice.

Training is a plain PyTorch loop (:func:`train_one_epoch`, :func:`evaluate`) around Ultralytics'
``DetectionModel`` and ``v8DetectionLoss`` — not Ultralytics' trainer — so the same loop runs in
Ray Train's ``TorchTrainer`` with DDP: pass the DDP-wrapped model, and a loss built with
:func:`make_loss_fn` on the *unwrapped* model (``v8DetectionLoss`` reads the Detect head).

Image geometry: a slice is robust-normalised per *volume* (:func:`normalize_volume`, the same at
training and inference), replicated to 3 channels and letterboxed to ``imgsz`` x ``imgsz``
keeping its aspect ratio (:class:`Letterbox`), so a point maps back to original pixels exactly
(``x = (x' - tx) / scale``). Pixel coordinates follow docs/CONVENTIONS.md: (x = column, y = row),
integer values at pixel centres.

Augmentation (training only): small random scale and translation, gamma/contrast/brightness and
noise. No left-right flips (a flipped sagittal image swaps anterior and posterior; a flipped
axial image swaps the patient's sides) and no mosaic (it can crop away the sacrum that counting
levels relies on).

Ultralytics is imported lazily, after :func:`lumbar_ray.models.ultralytics_env.configure` (offline,
own config dir). Nothing happens at import of this module.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lumbar_ray.targets import (
    AXIAL_T2,
    SAGITTAL_T1,
    SAGITTAL_T2,
    TARGET_BY_NAME_LEVEL,
    Target,
    detector_class_names,
    targets_for_series,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BOX_MM",
    "DEFAULT_NEGATIVE_GAP",
    "DEFAULT_MODEL_YAML",
    "AugmentConfig",
    "Detection",
    "DetectionLoss",
    "DetectorDataset",
    "DetectorSample",
    "HitRates",
    "Letterbox",
    "build_detector",
    "collate_detector",
    "detect_series",
    "detector_hit_rates",
    "evaluate",
    "fit_detector",
    "letterbox_image",
    "load_detector",
    "load_detector_samples",
    "prepare_for_inference",
    "make_loss_fn",
    "make_optimizer",
    "make_scheduler",
    "normalize_volume",
    "preprocess_slices",
    "preprocess_volume",
    "normalization_range",
    "preprocess_volume_torch",
    "recalibrate_batchnorm",
    "samples_from_series",
    "save_detector",
    "select_target_detections",
    "train_one_epoch",
    "unwrap_model",
]

DEFAULT_MODEL_YAML = "yolov8n.yaml"
DEFAULT_IMGSZ = 256
# Side of the square training box per series type, in millimetres (about one disc level high).
DEFAULT_BOX_MM: dict[str, float] = {SAGITTAL_T1: 20.0, SAGITTAL_T2: 20.0, AXIAL_T2: 20.0}
# Training negatives start this many slices from a labelled one: sagittal neighbours are the wrong
# instance (the canal and each foramen have one labelled slice), while an axial neighbour still
# shows the labelled level (detector_hit_rates accepts it), so axial negatives start two away.
DEFAULT_NEGATIVE_GAP: dict[str, int] = {SAGITTAL_T1: 1, SAGITTAL_T2: 1, AXIAL_T2: 2}
CHECKPOINT_FORMAT = "lumbar-ray-detector/1"


# --------------------------------------------------------------------------------------------
# Ultralytics (lazy)
# --------------------------------------------------------------------------------------------


def _ultra():
    """Configure Ultralytics offline (idempotent), then import what we use."""
    from lumbar_ray.models import ultralytics_env

    ultralytics_env.configure()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.nms import non_max_suppression

    return DetectionModel, get_cfg, v8DetectionLoss, non_max_suppression


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP/DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def build_detector(
    series_type: str,
    *,
    imgsz: int = DEFAULT_IMGSZ,
    box_mm: float | None = None,
    model_yaml: str | Mapping[str, Any] = DEFAULT_MODEL_YAML,
    seed: int | None = None,
    bn_momentum: float = 0.1,
) -> nn.Module:
    """A fresh (randomly initialised) YOLOv8 ``DetectionModel`` for one series type.

    ``bn_momentum``: Ultralytics initialises BatchNorm momentum to 0.03, tuned for its long runs;
    with a few hundred steps the running statistics then lag the weights so badly that the
    eval-mode model detects nothing. 0.1 (PyTorch's default) plus :func:`recalibrate_batchnorm`
    at the end of training fixes that.

    ``nc = len(targets_for_series(series_type))``, ``names = detector_class_names(series_type)``;
    ``model.args`` holds Ultralytics' default hyperparameters (loss gains box 7.5, cls 0.5,
    dfl 1.5) as ``v8DetectionLoss`` needs. Our metadata rides on plain attributes:
    ``series_type``, ``imgsz``, ``box_mm``.
    """
    DetectionModel, get_cfg, _, _ = _ultra()
    targets = targets_for_series(series_type)  # raises on unknown series types
    cfg = copy.deepcopy(dict(model_yaml)) if isinstance(model_yaml, Mapping) else model_yaml
    if seed is not None:
        torch.manual_seed(seed)
    model = DetectionModel(cfg, ch=3, nc=len(targets), verbose=False)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = bn_momentum
    model.names = detector_class_names(series_type)
    model.args = get_cfg()
    model.series_type = series_type
    model.imgsz = int(imgsz)
    model.box_mm = float(box_mm if box_mm is not None else DEFAULT_BOX_MM[series_type])
    return model


class DetectionLoss:
    """Ultralytics' ``v8DetectionLoss`` on the bare model, rebuilt whenever the model's parameters
    have moved to another device (``v8DetectionLoss`` pins its device when built, and Ray's
    ``prepare_model`` moves the model *after* the loss is usually made).

    ``loss_fn(preds, batch) -> (loss (3,) * batch_size, {box_loss, cls_loss, dfl_loss})``;
    ``preds`` are the head outputs in training mode (a dict) or the ``(y, dict)`` of eval mode.
    """

    loss_names = ("box_loss", "cls_loss", "dfl_loss")

    def __init__(self, model: nn.Module):
        _, get_cfg, _, _ = _ultra()
        self.model = unwrap_model(model)
        if getattr(self.model, "args", None) is None:
            self.model.args = get_cfg()
        self._loss = None
        self._device = None

    @property
    def criterion(self):
        device = next(self.model.parameters()).device
        if self._loss is None or self._device != device:
            _, _, v8DetectionLoss, _ = _ultra()
            self._loss, self._device = v8DetectionLoss(self.model), device
            self.loss_names = tuple(self._loss.loss_names)
        return self._loss

    def __call__(self, preds, batch):
        return self.criterion(preds, batch)


def make_loss_fn(model: nn.Module) -> DetectionLoss:
    """The detection loss for ``model`` (DDP-wrapped or not): built on the unwrapped model, so it
    reads the Detect head (strides, nc) and ``model.args`` (gains box 7.5, cls 0.5, dfl 1.5).
    Safe to make before or after moving/wrapping the model."""
    return DetectionLoss(model)


# --------------------------------------------------------------------------------------------
# Image geometry
# --------------------------------------------------------------------------------------------


def _percentile_step(n_voxels: int) -> int:
    """Stride of the voxel subsample the normalisation percentiles are taken on (~1M voxels);
    shared by :func:`normalize_volume` and :func:`preprocess_volume_torch`, which must agree."""
    return max(1, n_voxels // 1_000_000)


def percentiles(sample: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.percentile(sample, q)`` (linear interpolation), counted instead of partitioned when
    the values are integers within a 2**20 range — DICOM pixels are — which is ~3x faster on the
    ~1M-voxel subsample a series is normalised with."""
    a = np.asarray(sample).reshape(-1)
    integral = a.dtype.kind in "iub" or (a.dtype.kind == "f" and np.array_equal(a, np.rint(a)))  # NaN: not equal
    if a.size == 0 or not integral:
        return np.percentile(a, q)
    ints = a.astype(np.int64)
    lo = int(ints.min())
    if int(ints.max()) - lo >= 1 << 20:
        return np.percentile(a, q)
    cum = np.cumsum(np.bincount(ints - lo))
    pos = np.asarray(q, dtype=np.float64) / 100.0 * (a.size - 1)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, a.size - 1)
    # the k-th smallest value (0-based) is the first v whose count of values <= v exceeds k
    va = (np.searchsorted(cum, below, side="right") + lo).astype(np.float64)
    vb = (np.searchsorted(cum, above, side="right") + lo).astype(np.float64)
    t = pos - below
    # NumPy's lerp, both branches, so that the results are the same floats
    return np.where(t >= 0.5, vb - (vb - va) * (1 - t), va + (vb - va) * t)


def normalization_range(volume: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float] | None:
    """The (lo, hi) that :func:`normalize_volume` maps to (0, 1): percentiles of a voxel
    subsample, or the finite min/max when those are degenerate; None for a constant volume."""
    flat = np.asarray(volume).reshape(-1)
    step = _percentile_step(flat.size)
    lo, hi = (float(v) for v in percentiles(flat[::step], [lo_pct, hi_pct]))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        lo, hi = float(np.nanmin(flat)), float(np.nanmax(flat))
        if not hi > lo:
            return None
    return lo, hi


def _normalize_into(src: np.ndarray, lo: float, hi: float, out: np.ndarray) -> np.ndarray:
    """``clip((src - lo) / (hi - lo), 0, 1)`` in float32 with NaN -> 0, written into ``out``."""
    np.subtract(src, np.float32(lo), out=out, dtype=np.float32, casting="unsafe")
    np.divide(out, np.float32(hi - lo), out=out)
    np.fmax(out, np.float32(0.0), out=out)  # fmax/fmin drop NaN: NaN -> 0, as nan_to_num did
    np.fmin(out, np.float32(1.0), out=out)
    return out


def normalize_volume(volume: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Robust min-max to [0, 1] float32 over the whole volume (percentiles on a subsample).
    Slice by slice, in float32: each slice's arithmetic stays in the CPU cache."""
    vol = np.asarray(volume)
    out = np.zeros(vol.shape, dtype=np.float32)
    rng = normalization_range(vol, lo_pct, hi_pct)
    if rng is not None:
        for k in range(vol.shape[0]):
            _normalize_into(vol[k], *rng, out=out[k])
    return out


@dataclass(frozen=True)
class Letterbox:
    """Square letterbox of a (rows, cols) image: ``x' = scale * x + tx``, ``y' = scale * y + ty``.

    Pixel centres are at integer coordinates on both sides; the image is centred, its longer
    side fills ``imgsz`` exactly (its outer pixel edges land on the canvas edges).
    """

    scale: float
    tx: float
    ty: float
    imgsz: int

    @classmethod
    def fit(cls, rows: int, cols: int, imgsz: int) -> Letterbox:
        s = imgsz / max(rows, cols)
        pad_x = (imgsz - s * cols) / 2.0
        pad_y = (imgsz - s * rows) / 2.0
        return cls(s, pad_x - 0.5 + 0.5 * s, pad_y - 0.5 + 0.5 * s, int(imgsz))

    def forward(self, x, y):
        return np.asarray(x) * self.scale + self.tx, np.asarray(y) * self.scale + self.ty

    def inverse(self, x, y):
        return (np.asarray(x) - self.tx) / self.scale, (np.asarray(y) - self.ty) / self.scale

    def then(self, scale: float, dx: float, dy: float) -> Letterbox:
        """Compose with a zoom by ``scale`` about the canvas centre and a shift (augmentation)."""
        c = (self.imgsz - 1) / 2.0
        return Letterbox(
            self.scale * scale,
            (self.tx - c) * scale + c + dx,
            (self.ty - c) * scale + c + dy,
            self.imgsz,
        )

    def matrix(self) -> np.ndarray:
        return np.array([[self.scale, 0.0, self.tx], [0.0, self.scale, self.ty]], dtype=np.float64)


def letterbox_image(image: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Warp a 2-D float image onto the ``lb.imgsz`` square canvas (zeros outside).

    Downscaling is anti-aliased with a Gaussian blur first, so training and inference agree.
    """
    import cv2

    img = np.ascontiguousarray(image, dtype=np.float32)
    if lb.scale < 0.9:
        sigma = 0.5 * math.sqrt(1.0 / lb.scale**2 - 1.0)
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.warpAffine(
        img, lb.matrix(), (lb.imgsz, lb.imgsz), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0
    )


def preprocess_volume(volume: np.ndarray, imgsz: int, lo_pct: float = 0.5, hi_pct: float = 99.5
                      ) -> tuple[torch.Tensor, Letterbox]:
    """:func:`normalize_volume` + :func:`preprocess_slices` fused, on the CPU: the raw
    (n, rows, cols) volume in, (n, 3, imgsz, imgsz) float32 out.
    Each slice is normalised into one reused buffer and letterboxed at once, so the full-size
    normalised volume is never written out (4x faster than the two steps on a 48-slice 352²
    series here; equal to them within float rounding, tested)."""
    vol = np.asarray(volume)
    n, rows, cols = vol.shape
    lb = Letterbox.fit(rows, cols, imgsz)
    out = np.zeros((n, 1, lb.imgsz, lb.imgsz), dtype=np.float32)
    rng = normalization_range(vol, lo_pct, hi_pct)
    if rng is not None:
        buf = np.empty((rows, cols), dtype=np.float32)
        for k in range(n):
            out[k, 0] = letterbox_image(_normalize_into(vol[k], *rng, out=buf), lb)
    return torch.from_numpy(out).expand(-1, 3, -1, -1).contiguous(), lb


def preprocess_slices(volume01: np.ndarray, imgsz: int) -> tuple[torch.Tensor, Letterbox]:
    """(n, rows, cols) normalised volume -> (n, 3, imgsz, imgsz) float32 tensor and its Letterbox."""
    n, rows, cols = volume01.shape
    lb = Letterbox.fit(rows, cols, imgsz)
    out = np.empty((n, imgsz, imgsz), dtype=np.float32)
    for k in range(n):
        out[k] = letterbox_image(volume01[k], lb)
    t = torch.from_numpy(out)[:, None].expand(-1, 3, -1, -1).contiguous()
    return t, lb


def _gaussian_kernel(scale: float) -> np.ndarray | None:
    """The 1-D kernel :func:`letterbox_image` blurs with before downscaling by ``scale`` (None: no
    blur). OpenCV sizes a float image's kernel as ``round(8 sigma + 1) | 1``."""
    if scale >= 0.9:
        return None
    import cv2

    sigma = 0.5 * math.sqrt(1.0 / scale**2 - 1.0)
    ksize = int(round(sigma * 4 * 2 + 1)) | 1
    return cv2.getGaussianKernel(ksize, sigma).astype(np.float32).ravel()


def _blur_along(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Convolve (n, 1, H, W) along H (dim=2) or W (dim=3), border mirrored as OpenCV's
    BORDER_REFLECT (``cba|abc``), which ``F.pad`` does not offer: pad by gathering indices."""
    import torch.nn.functional as F

    r = (kernel.numel() - 1) // 2
    size = x.shape[dim]
    index = torch.as_tensor(np.pad(np.arange(size), r, mode="symmetric"), device=x.device)
    padded = x.index_select(dim, index)
    weight = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
    return F.conv2d(padded, weight)


@torch.no_grad()
def preprocess_volume_torch(
    volume: np.ndarray, imgsz: int, device: torch.device | str, lo_pct: float = 0.5, hi_pct: float = 99.5
) -> tuple[torch.Tensor, Letterbox]:
    """:func:`normalize_volume` + :func:`preprocess_slices` in torch, on ``device``: the raw
    (n, rows, cols) volume in, (n, 3, imgsz, imgsz) float32 on the device out.

    Why: on a GPU node the NumPy/OpenCV version costs ~0.1 s of one CPU core per study (percentiles,
    blur, warp of ~80 slices), which caps one detector actor far below the GPU's rate; here the
    volume crosses to the GPU once and every step runs there. Same arithmetic: percentiles of the
    same subsample (linear interpolation), OpenCV's Gaussian kernel with its mirrored border, and
    bilinear sampling with zeros outside. It differs from OpenCV only by OpenCV's 1/32-pixel
    fixed-point interpolation weights (tests pin the tolerance).
    """
    import torch.nn.functional as F

    device = torch.device(device)
    host = np.ascontiguousarray(volume)
    if host.dtype not in (np.int16, np.uint8, np.int32, np.float32):
        host = host.astype(np.float32)
    # integer volumes (the pipeline ships int16) cross to the device at their own size
    vol = torch.as_tensor(host).to(device, non_blocking=True).float()
    n, rows, cols = vol.shape
    flat = vol.reshape(-1)
    step = _percentile_step(flat.numel())
    q = torch.tensor([lo_pct / 100.0, hi_pct / 100.0], device=device, dtype=torch.float32)
    lo, hi = (float(v) for v in torch.quantile(flat[::step], q).cpu())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        finite = flat[torch.isfinite(flat)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
    lb = Letterbox.fit(rows, cols, imgsz)
    if hi <= lo:
        return torch.zeros((n, 3, lb.imgsz, lb.imgsz), dtype=torch.float32, device=device), lb
    x = ((vol - lo) / (hi - lo)).clamp_(0.0, 1.0).nan_to_num_(0.0)[:, None]
    kernel = _gaussian_kernel(lb.scale)
    if kernel is not None:
        k = torch.as_tensor(kernel, device=device)
        x = _blur_along(_blur_along(x, k, 3), k, 2)
    # Output pixel (u, v) samples source pixel ((u - tx) / s, (v - ty) / s); with
    # align_corners=False, source pixel i sits at (2i + 1) / size - 1 in grid units.
    u = torch.arange(lb.imgsz, device=device, dtype=torch.float32)
    gx = (2.0 * (u - lb.tx) / lb.scale + 1.0) / cols - 1.0
    gy = (2.0 * (u - lb.ty) / lb.scale + 1.0) / rows - 1.0
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (imgsz, imgsz, 2) as (x, y)
    out = F.grid_sample(x, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.expand(-1, 3, -1, -1).contiguous(), lb


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


@dataclass
class DetectorSample:
    """One labelled instance of a series: its normalised slice and the targets labelled on it."""

    study_id: int
    series_id: int
    instance_number: int
    image: np.ndarray  # (rows, cols) uint8, the slice after normalize_volume() of its series, x255
    pixel_spacing: tuple[float, float]  # (row, col) mm
    class_ids: np.ndarray  # (m,) int64 detector class ids
    points: np.ndarray  # (m, 2) float64 labelled (x, y) in original pixels


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time jitter. No flips and no mosaic by design (see module docstring)."""

    scale: float = 0.10  # zoom factor drawn from [1 - scale, 1 + scale]
    translate: float = 0.06  # shift drawn from +-translate * imgsz in x and y
    gamma: float = 0.25  # gamma drawn log-uniformly from [1/(1+g), 1+g]
    contrast: float = 0.15  # multiplier drawn from [1 - c, 1 + c]
    brightness: float = 0.08  # offset drawn from [-b, b]
    noise: float = 0.02  # Gaussian noise sigma drawn from [0, noise]


def _series_slices_for_labels(series, rows) -> list[tuple[int, list[Target], np.ndarray]]:
    out = []
    for inst, grp in rows.groupby("instance_number", sort=True):
        try:
            k = int(series.index_of_instance(int(inst)))
        except (KeyError, ValueError, IndexError):
            log.warning("study %s series %s: labelled instance %s not in series; skipped", series.study_id, series.series_id, inst)
            continue
        targets = [TARGET_BY_NAME_LEVEL[(c, lv)] for c, lv in zip(grp["condition"], grp["level"])]
        pts = grp[["x", "y"]].to_numpy(dtype=np.float64)
        out.append((k, targets, pts))
    return out


def _coords_on_series(coords, series, series_type: str):
    """Rows of ``coords`` on this series (when the columns exist) for conditions read on its type."""
    wanted = {t.condition.name for t in targets_for_series(series_type)}
    rows = coords
    if "series_id" in rows.columns:
        rows = rows[rows["series_id"].astype(np.int64) == int(series.series_id)]
    if "study_id" in rows.columns:
        rows = rows[rows["study_id"].astype(np.int64) == int(series.study_id)]
    return rows[rows["condition"].isin(wanted)]


def samples_from_series(
    series, coords, series_type: str | None = None, *, negatives: int = 0, negative_gap: int | None = None
) -> list[DetectorSample]:
    """Training samples of one series: one per labelled instance, with every box labelled on it.

    ``coords``: rows of train_label_coordinates.csv (any superset; filtered here to this series
    and to conditions read on ``series_type``, default ``series.series_type``).
    ``negatives``: also keep up to this many unlabelled slices (no boxes), at least
    ``negative_gap`` slices away from every labelled one: first the slices exactly
    ``negative_gap`` away (the hardest negatives: with ``negative_gap=1`` the neighbours of the
    labelled slice, which teach the canal detector that the mid-sagittal slice, not the one
    beside it, carries the target), then evenly spread over the rest. They teach the detector
    that off-target slices hold no target, which picking a slice over the whole series relies on.
    ``negative_gap`` None: :data:`DEFAULT_NEGATIVE_GAP` of the series type.
    """
    series_type = series_type or series.series_type
    rows = _coords_on_series(coords, series, series_type)
    if rows.empty:
        return []
    vol01 = normalize_volume(series.volume)
    spacing = (float(series.pixel_spacing[0]), float(series.pixel_spacing[1]))

    def sample(k: int, class_ids: np.ndarray, points: np.ndarray) -> DetectorSample:
        return DetectorSample(study_id=int(series.study_id), series_id=int(series.series_id),
                              instance_number=int(series.instance_numbers[k]),
                              image=np.rint(vol01[k] * 255.0).astype(np.uint8), pixel_spacing=spacing,
                              class_ids=class_ids, points=points)

    labelled = _series_slices_for_labels(series, rows)
    samples = [sample(k, np.array([t.detector_class_id for t in targets], dtype=np.int64), pts)
               for k, targets, pts in labelled]
    if negatives > 0 and labelled:
        ks = np.array([k for k, _, _ in labelled])
        gap = max(1, DEFAULT_NEGATIVE_GAP[series_type] if negative_gap is None else negative_gap)
        free = [k for k in range(vol01.shape[0]) if np.abs(ks - k).min() >= gap]
        hardest = [k for k in free if np.abs(ks - k).min() == gap][:negatives]
        rest = [k for k in free if k not in hardest]
        n_rest = min(negatives - len(hardest), len(rest))
        spread = {rest[int(round(i))] for i in np.linspace(0, len(rest) - 1, n_rest)} if n_rest > 0 else set()
        samples += [sample(k, np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.float64))
                    for k in sorted({*hardest, *spread})]
    return samples


def _study_series(study) -> list:
    found = []
    for v in [*study.series.values(), *getattr(study, "other_series", [])]:
        if isinstance(v, (list, tuple)):
            found.extend(v)
        else:
            found.append(v)
    return found


def load_detector_samples(
    root, split: str, study_ids: Iterable[int], coords, series_type: str, *, negatives: int = 0,
    negative_gap: int | None = None,
) -> list[DetectorSample]:
    """Read each study once (via :func:`lumbar_ray.dicom.read.read_study`) and keep, in memory,
    only the normalised labelled slices of ``series_type`` (uint8), plus ``negatives``
    unlabelled slices per series (see :func:`samples_from_series`)."""
    from lumbar_ray.dicom import read as dicom_io

    wanted = {t.condition.name for t in targets_for_series(series_type)}
    coords = coords[coords["condition"].isin(wanted)]
    study_ids = [int(s) for s in study_ids]
    coords = coords[coords["study_id"].astype(np.int64).isin(study_ids)]
    samples: list[DetectorSample] = []
    for sid in study_ids:
        rows = coords[coords["study_id"].astype(np.int64) == sid]
        if rows.empty:
            continue
        study = dicom_io.read_study(root, sid, split)
        by_id = {int(s.series_id): s for s in _study_series(study)}
        for series_id, srows in rows.groupby("series_id"):
            series = by_id.get(int(series_id))
            if series is None:
                log.warning("study %s: labelled series %s not found; skipped", sid, series_id)
                continue
            if series.series_type != series_type:
                log.warning(
                    "study %s series %s is %r, labels are for %r; skipped", sid, series_id, series.series_type, series_type
                )
                continue
            samples.extend(samples_from_series(series, srows, series_type, negatives=negatives, negative_gap=negative_gap))
    return samples


class DetectorDataset(torch.utils.data.Dataset):
    """Letterboxed labelled slices + mm-sized boxes for one series type.

    Build from storage (``DetectorDataset(root, split, study_ids, coords, series_type)``; the
    labelled slices are decoded once and cached in memory as uint8) or from samples you already
    have (:meth:`from_samples`). Items are dicts consumed by :func:`collate_detector`.
    """

    def __init__(
        self,
        root=None,
        split: str = "train",
        study_ids: Iterable[int] | None = None,
        coords=None,
        series_type: str = SAGITTAL_T2,
        *,
        imgsz: int = DEFAULT_IMGSZ,
        box_mm: float | None = None,
        augment: bool | AugmentConfig = False,
        samples: Sequence[DetectorSample] | None = None,
        negatives: int = 0,
    ):
        targets_for_series(series_type)
        self.series_type = series_type
        self.imgsz = int(imgsz)
        self.box_mm = float(box_mm if box_mm is not None else DEFAULT_BOX_MM[series_type])
        self.augment = AugmentConfig() if augment is True else (augment or None)
        if samples is None:
            if root is None or coords is None:
                raise ValueError("give root, coords (and study_ids) or samples")
            if study_ids is None:
                study_ids = sorted(coords["study_id"].astype(np.int64).unique())
            samples = load_detector_samples(root, split, study_ids, coords, series_type, negatives=negatives)
        self.samples = list(samples)

    @classmethod
    def from_samples(cls, samples: Sequence[DetectorSample], series_type: str, **kw) -> DetectorDataset:
        return cls(series_type=series_type, samples=samples, **kw)

    def with_augment(self, augment: bool | AugmentConfig) -> DetectorDataset:
        """Same cached samples, other augmentation (e.g. a val view of a train set)."""
        return DetectorDataset(
            series_type=self.series_type, imgsz=self.imgsz, box_mm=self.box_mm, augment=augment, samples=self.samples
        )

    def __len__(self) -> int:
        return len(self.samples)

    def box_size_px(self, sample: DetectorSample, scale: float = 1.0) -> tuple[float, float]:
        """(width, height) of a box in pixels of an image drawn at ``scale`` x the original."""
        row_mm, col_mm = sample.pixel_spacing
        return self.box_mm / col_mm * scale, self.box_mm / row_mm * scale

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        rows, cols = s.image.shape
        lb = Letterbox.fit(rows, cols, self.imgsz)
        img = s.image.astype(np.float32) / 255.0
        aug = self.augment
        rng = None
        if aug is not None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            zoom = rng.uniform(1.0 - aug.scale, 1.0 + aug.scale)
            dx, dy = rng.uniform(-aug.translate, aug.translate, size=2) * self.imgsz
            lb = lb.then(zoom, dx, dy)
        canvas = letterbox_image(img, lb)
        if aug is not None:
            gamma = math.exp(rng.uniform(-1.0, 1.0) * math.log1p(aug.gamma))
            canvas = np.power(canvas, gamma, dtype=np.float32)
            canvas = canvas * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + rng.uniform(-aug.brightness, aug.brightness)
            sigma = rng.uniform(0.0, aug.noise)
            if sigma > 0:
                canvas = canvas + rng.normal(0.0, sigma, size=canvas.shape).astype(np.float32)
            canvas = np.clip(canvas, 0.0, 1.0).astype(np.float32)
        cx, cy = lb.forward(s.points[:, 0], s.points[:, 1])
        w, h = self.box_size_px(s, lb.scale)
        n = self.imgsz
        keep = (cx >= 0) & (cx <= n - 1) & (cy >= 0) & (cy <= n - 1)
        x1, x2 = np.clip(cx - w / 2, 0, n), np.clip(cx + w / 2, 0, n)
        y1, y2 = np.clip(cy - h / 2, 0, n), np.clip(cy + h / 2, 0, n)
        keep &= (x2 - x1 > 1) & (y2 - y1 > 1)
        xywh = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)[keep] / n
        row_mm, col_mm = s.pixel_spacing
        return {
            "img": torch.from_numpy(canvas)[None],  # (1, n, n); collate makes 3 channels
            "cls": torch.from_numpy(s.class_ids[keep].astype(np.float32))[:, None],
            "bboxes": torch.from_numpy(xywh.astype(np.float32)).reshape(-1, 4),
            "points": torch.from_numpy(np.stack([cx, cy], axis=1)[keep].astype(np.float32)).reshape(-1, 2),
            # mm per canvas pixel along x (columns) and y (rows)
            "mm_per_px": torch.tensor([col_mm / lb.scale, row_mm / lb.scale], dtype=torch.float32),
            "index": i,
        }


def collate_detector(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch dict as ``v8DetectionLoss`` expects: ``img`` (B,3,n,n) in [0,1], ``batch_idx`` (N,),
    ``cls`` (N,1), ``bboxes`` (N,4) normalised xywh; plus ``points`` (N,2) canvas pixels of the
    labelled centres, ``mm_per_px`` (B,2) and ``index`` (B,) for evaluation."""
    imgs = torch.stack([it["img"] for it in items]).expand(-1, 3, -1, -1).contiguous()
    batch_idx = torch.cat([torch.full((len(it["cls"]),), i, dtype=torch.float32) for i, it in enumerate(items)])
    return {
        "img": imgs,
        "batch_idx": batch_idx,
        "cls": torch.cat([it["cls"] for it in items]).reshape(-1, 1),
        "bboxes": torch.cat([it["bboxes"] for it in items]).reshape(-1, 4),
        "points": torch.cat([it["points"] for it in items]).reshape(-1, 2),
        "mm_per_px": torch.stack([it["mm_per_px"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
    }


# --------------------------------------------------------------------------------------------
# Training loop (plain PyTorch; DDP-friendly)
# --------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, lr: float = 2e-3, weight_decay: float = 5e-4, betas=(0.9, 0.999)):
    """AdamW with weight decay on conv/linear weights only (not on norms and biases), as
    Ultralytics groups them."""
    decay, no_decay = [], []
    for module in unwrap_model(model).modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias" or isinstance(module, nn.modules.batchnorm._NormBase) or "norm" in type(module).__name__.lower():
                no_decay.append(p)
            else:
                decay.append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas
    )


def make_scheduler(optimizer, total_steps: int, warmup_steps: int = 0, final_lr_ratio: float = 0.05):
    """Per-iteration LambdaLR: linear warm-up, then cosine decay to ``final_lr_ratio`` x lr."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _targets_to(batch: Mapping[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
    *,
    scheduler=None,
    ema=None,
    max_grad_norm: float | None = 10.0,
) -> dict[str, float]:
    """One pass over ``loader``. ``model`` may be DDP-wrapped: the forward goes through the
    wrapper (gradient sync), the loss reads its head outputs via ``loss_fn`` (built on the
    unwrapped model, :func:`make_loss_fn`). ``scaler`` turns on CUDA autocast (fp16);
    ``scheduler`` steps per iteration; ``ema`` (Ultralytics ``ModelEMA``) updates per step.

    Returns means per image of ``loss`` (box+cls+dfl with Ultralytics' gains) and its parts,
    ``n_images``, ``seconds``, ``images_per_s``, ``lr`` (at the end).
    """
    device = torch.device(device)
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)
    n_img = 0
    n_batches = 0
    t0 = time.perf_counter()
    use_amp = scaler is not None and device.type == "cuda"
    names = getattr(loss_fn, "loss_names", ("box_loss", "cls_loss", "dfl_loss"))
    for batch in loader:
        batch = _targets_to(batch, device)
        imgs = batch["img"]
        bs = imgs.shape[0]
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            preds = model(imgs)
            loss, items = loss_fn(preds, batch)
        total = loss.sum()
        if not torch.isfinite(total):
            log.warning("non-finite detector loss %s; batch skipped", loss.detach().cpu().tolist())
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            if max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            if max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        sums += torch.stack([items[k].detach().float().cpu() for k in names]).double() * bs
        n_img += bs
        n_batches += 1
    secs = time.perf_counter() - t0
    out = {k: float(v / max(1, n_img)) for k, v in zip(names, sums)}
    out["loss"] = float(sums.sum() / max(1, n_img))
    out.update(
        n_images=n_img,
        n_batches=n_batches,
        seconds=secs,
        images_per_s=n_img / secs if secs > 0 else float("nan"),
        lr=float(optimizer.param_groups[0]["lr"]),
    )
    return out


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> int:
    """Recompute BatchNorm running statistics as plain averages over ``loader`` ("precise BN").

    Run it on the model you will save (e.g. the EMA model) with un-augmented training images,
    after the last epoch: the running averages collected during training describe weights that
    no longer exist. Works on the unwrapped model (run it on one rank, or on each rank's shard);
    leaves the model in eval mode. Returns the number of images seen.
    """
    bare = unwrap_model(model)
    bns = [m for m in bare.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    bare.train()
    n = 0
    device = torch.device(device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        imgs = batch["img"].to(device, non_blocking=True)
        bare(imgs)
        n += imgs.shape[0]
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    bare.eval()
    return n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    loss_fn=None,
    device: torch.device | str = "cpu",
    *,
    conf: float = 0.01,
    iou: float = 0.5,
    tolerances_mm: Sequence[float] = (5.0, 10.0),
) -> dict[str, float]:
    """Validation loss (if ``loss_fn``) and per-image localisation on labelled slices.

    For each labelled box, the most confident detection of its class *on that image* is a hit
    at tolerance t if its centre lies within t mm of the labelled point. (Choosing the slice is
    not measured here; :func:`detector_hit_rates` does that on whole series.) Runs the
    unwrapped model. Counts (``n_images``, ``n_targets``, ``n_found``, ``hits_<t>mm``) are
    returned next to rates so DDP ranks can all-reduce them.
    """
    _, _, _, nms = _ultra()
    device = torch.device(device)
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    names = getattr(loss_fn, "loss_names", ("box_loss", "cls_loss", "dfl_loss"))
    sums = torch.zeros(3, dtype=torch.float64)
    n_img = n_tgt = n_found = 0
    hits = {float(t): 0 for t in tolerances_mm}
    for batch in loader:
        batch = _targets_to(batch, device)
        y, raw = bare(batch["img"])
        bs = batch["img"].shape[0]
        if loss_fn is not None:
            _, items = loss_fn(raw, batch)
            sums += torch.stack([items[k].float().cpu() for k in names]).double() * bs
        dets = [d.cpu() for d in nms(y, conf_thres=conf, iou_thres=iou, multi_label=True, max_det=300)]
        bidx = batch["batch_idx"].long().cpu()
        cls = batch["cls"].view(-1).long().cpu()
        pts = batch["points"].cpu()
        mmpp = batch["mm_per_px"].cpu()
        for j in range(len(cls)):
            b = int(bidx[j])
            d = dets[b]
            n_tgt += 1
            d = d[d[:, 5].long() == cls[j]]
            if len(d) == 0:
                continue
            n_found += 1
            best = d[d[:, 4].argmax()]
            cx, cy = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
            dist = math.hypot(float(cx - pts[j, 0]) * float(mmpp[b, 0]), float(cy - pts[j, 1]) * float(mmpp[b, 1]))
            for t in hits:
                hits[t] += dist <= t
        n_img += bs
    if was_training:
        bare.train()
    out: dict[str, float] = {"n_images": n_img, "n_targets": n_tgt, "n_found": n_found}
    if loss_fn is not None:
        out.update({k: float(v / max(1, n_img)) for k, v in zip(names, sums)})
        out["loss"] = float(sums.sum() / max(1, n_img))
    for t, h in hits.items():
        out[f"hits_{t:g}mm"] = h
        out[f"hit_rate_{t:g}mm"] = h / n_tgt if n_tgt else float("nan")
    return out


def _as_dataset(data, series_type: str, imgsz: int, box_mm: float | None, augment) -> DetectorDataset:
    if isinstance(data, DetectorDataset):
        if data.series_type != series_type:
            raise ValueError(f"dataset is for {data.series_type!r}, not {series_type!r}")
        return DetectorDataset(
            series_type=series_type, imgsz=imgsz, box_mm=box_mm if box_mm is not None else data.box_mm,
            augment=augment, samples=data.samples,
        )
    return DetectorDataset.from_samples(list(data), series_type, imgsz=imgsz, box_mm=box_mm, augment=augment)


def fit_detector(
    train_samples,
    val_samples,
    series_type: str,
    epochs: int = 30,
    imgsz: int = DEFAULT_IMGSZ,
    batch_size: int = 16,
    lr: float = 2e-3,
    device: torch.device | str = "cpu",
    *,
    box_mm: float | None = None,
    augment: bool | AugmentConfig = True,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 1.0,
    use_ema: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    eval_every: int = 1,
    time_budget_s: float | None = None,
    model: nn.Module | None = None,
    precise_bn: bool = True,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a detector locally (no Ray): for tests and small runs.

    ``train_samples``/``val_samples``: a :class:`DetectorDataset` or a sequence of
    :class:`DetectorSample` (``val_samples`` may be empty/None). Returns the trained model
    (the EMA weights when ``use_ema``), in eval mode on ``device``, and one history row per epoch
    (train metrics, ``val_*`` metrics from :func:`evaluate`). ``time_budget_s`` stops early
    (the learning-rate schedule still assumes ``epochs``). ``precise_bn``: after the last epoch,
    recompute BatchNorm statistics of the returned model on the un-augmented training images
    (:func:`recalibrate_batchnorm`; the last ``val_*`` row is measured after it).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    train_ds = _as_dataset(train_samples, series_type, imgsz, box_mm, augment)
    val_ds = _as_dataset(val_samples, series_type, imgsz, train_ds.box_mm, False) if val_samples else None
    if len(train_ds) == 0:
        raise ValueError("no training samples")
    if model is None:
        model = build_detector(series_type, imgsz=imgsz, box_mm=train_ds.box_mm, seed=seed)
    model = model.to(device)
    loss_fn = make_loss_fn(model)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size,
        collate_fn=collate_detector, num_workers=num_workers, generator=gen,
        persistent_workers=num_workers > 0,
    )
    val_loader = (
        torch.utils.data.DataLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_detector)
        if val_ds is not None and len(val_ds)
        else None
    )
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, len(loader))
    scheduler = make_scheduler(optimizer, steps, int(warmup_epochs * len(loader)))
    ema = None
    if use_ema:
        from ultralytics.utils.torch_utils import ModelEMA

        ema = ModelEMA(model)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    history: list[dict[str, float]] = []
    t_start = time.perf_counter()
    for epoch in range(epochs):
        row: dict[str, float] = {"epoch": epoch + 1}
        row.update(train_one_epoch(model, loader, optimizer, loss_fn, device, scaler, scheduler=scheduler, ema=ema))
        eval_model = ema.ema if ema is not None else model
        last = epoch == epochs - 1 or (time_budget_s is not None and time.perf_counter() - t_start > time_budget_s)
        if last and precise_bn:
            plain = torch.utils.data.DataLoader(train_ds.with_augment(False), batch_size=batch_size, shuffle=False,
                                                collate_fn=collate_detector)
            recalibrate_batchnorm(eval_model, plain, device)
        if val_loader is not None and ((epoch + 1) % max(1, eval_every) == 0 or last):
            row.update({f"val_{k}": v for k, v in evaluate(eval_model, val_loader, loss_fn, device).items()})
        history.append(row)
        log.info("detector %s epoch %d: %s", series_type, epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if last:
            break
    final = ema.ema if ema is not None else model
    for attr in ("names", "args", "series_type", "imgsz", "box_mm"):
        setattr(final, attr, getattr(unwrap_model(model), attr))
    final.eval()
    return final, history


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """One detection, in original pixel coordinates of slice ``slice_index`` of its series."""

    class_id: int
    slice_index: int
    instance_number: int
    x: float
    y: float
    confidence: float
    width: float = float("nan")  # box size, original pixels
    height: float = float("nan")


@torch.no_grad()
def detect_series(
    model: nn.Module,
    series,
    imgsz: int | None = None,
    conf: float = 0.01,
    iou: float = 0.5,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    *,
    multi_label: bool = True,
    max_det: int = 100,
    preprocess: str = "auto",
    timings: dict[str, float] | None = None,
    candidates: str = "best",
) -> list[Detection]:
    """Run every slice of ``series`` through the detector in batches of ``batch_size``.

    Boxes come back to original pixels (centre x = column, y = row). ``candidates``:

    - ``"best"`` (default): each class's most confident box on each slice, when above ``conf``
      (:func:`best_box_per_class`) — all that :func:`select_target_detections` looks at, since
      every rule picks a class's best box on a slice or over slices. Per-class NMS always keeps
      that box, so the selection is the same as with "nms" (tested), without NMS's per-image cost.
    - ``"nms"``: Ultralytics' NMS; ``multi_label`` keeps a box once per class above ``conf``
      (per-class NMS), ``max_det`` caps the boxes of a slice.
    ``preprocess``: "numpy" (NumPy/OpenCV on the CPU, as in training), "torch"
    (:func:`preprocess_volume_torch` on ``device``) or "auto" (torch on a CUDA device, else numpy).
    ``timings``: when a dict is given, the seconds spent in "preprocess", "forward", "candidates"
    (best boxes or NMS, with the copy to the host) and "boxes" are added to it, the device
    synchronised at each step (profiling only: the syncs cost time on a GPU).
    """
    if candidates not in ("best", "nms"):
        raise ValueError(f"candidates must be 'best' or 'nms', not {candidates!r}")
    bare = unwrap_model(model)
    bare.eval()
    imgsz = int(imgsz or getattr(bare, "imgsz", DEFAULT_IMGSZ))
    device = torch.device(device)
    clock = StageClock(timings, device)
    if preprocess not in ("auto", "numpy", "torch"):
        raise ValueError(f"preprocess must be auto, numpy or torch, not {preprocess!r}")
    on_device = preprocess == "torch" or (preprocess == "auto" and device.type == "cuda")
    if on_device:
        images, lb = preprocess_volume_torch(series.volume, imgsz, device)
    else:
        images, lb = preprocess_volume(series.volume, imgsz)
    clock.lap("preprocess")
    instance_numbers = np.asarray(series.instance_numbers)
    dets: list[Detection] = []
    for start in range(0, len(instance_numbers), batch_size):
        y = bare(images[start : start + batch_size].to(device))
        y = y[0] if isinstance(y, (tuple, list)) else y
        clock.lap("forward")
        if candidates == "best":
            # On the model's device, then one small copy: at most (slices x classes) rows.
            host = best_box_per_class(y, conf).cpu().numpy()
        else:
            host = _nms_boxes(y, conf, iou, multi_label, max_det)
        clock.lap("candidates")
        if not len(host):
            continue
        k = start + host[:, 0].astype(np.int64)
        cx, cy = lb.inverse(host[:, 3], host[:, 4])
        w, h = host[:, 5] / lb.scale, host[:, 6] / lb.scale
        dets.extend(Detection(int(c), int(ki), int(instance_numbers[ki]), float(xi), float(yi), float(p),
                              float(wi), float(hi))
                    for ki, c, p, xi, yi, wi, hi in zip(k, host[:, 1], host[:, 2], cx, cy, w, h))
        clock.lap("boxes")
    return dets


def best_box_per_class(y: torch.Tensor, conf: float) -> torch.Tensor:
    """Each class's most confident box on each image of a detector's eval output.

    ``y``: (B, 4 + nc, A) — per anchor, a box (cx, cy, w, h, letterboxed pixels) and nc class
    scores. Returns (K, 7) rows ``[image, class, score, cx, cy, w, h]`` for the (image, class)
    pairs whose best score is above ``conf``, by image then class. Where a class's best score is
    tied between anchors, the first anchor's box is returned (``torch.max``).
    """
    scores, anchor = y[:, 4:, :].max(dim=2)  # (B, nc)
    boxes = torch.gather(y[:, :4, :], 2, anchor.unsqueeze(1).expand(-1, 4, -1))  # (B, 4, nc)
    image, cls = torch.nonzero(scores > conf, as_tuple=True)
    # float32 rows whatever the model's dtype (half under AMP would round scores and boxes)
    return torch.cat([image[:, None].float(), cls[:, None].float(), scores[image, cls, None].float(),
                      boxes[image, :, cls].float()], dim=1)


def _nms_boxes(y: torch.Tensor, conf: float, iou: float, multi_label: bool, max_det: int) -> np.ndarray:
    """Ultralytics' NMS over a batch, as ``best_box_per_class``'s rows (on the host)."""
    _, _, _, nms = _ultra()
    # NMS on the host: Ultralytics runs it image by image, and on a GPU each image brings its
    # own small kernels and syncs, while the batch's raw output is a few MB to copy once.
    kept = nms(y.float().cpu(), conf_thres=conf, iou_thres=iou, multi_label=multi_label, max_det=max_det)
    rows = [torch.cat([torch.full((len(d), 1), float(j)), d[:, 5:6], d[:, 4:5], (d[:, 0:2] + d[:, 2:4]) / 2,
                       d[:, 2:4] - d[:, 0:2]], dim=1) for j, d in enumerate(kept) if len(d)]
    return torch.cat(rows).numpy() if rows else np.zeros((0, 7), np.float32)


class StageClock:
    """Adds the seconds since the previous lap (or since it was made) to ``timings[name]``,
    synchronising a CUDA device first; does nothing (not even a device sync) when ``timings`` is
    None. The profiling of :func:`detect_series` and :func:`lumbar_ray.scoring.study.detect_study`."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings = timings
        self.cuda = device.type == "cuda"
        self.last = self._now() if timings is not None else 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        now = self._now()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def _lateral_midline(series) -> float:
    x = np.asarray(series.positions, dtype=np.float64)[:, 0]
    return float((x.min() + x.max()) / 2.0)


def select_target_detections(
    detections: Sequence[Detection],
    series_type: str,
    series=None,
    *,
    min_conf: float = 0.0,
    midline_x: float | None = None,
    rule: str = "auto",
) -> dict[int, Detection | None]:
    """Pick one detection per target of ``series_type``: ``{target.index: Detection | None}``.

    A target whose class has no detection above ``min_conf`` (and the NMS ``conf`` of
    :func:`detect_series`) gets None. Rules (``rule="auto"`` picks per series type):

    - ``"max"`` (Axial T2, Sagittal T1): the most confident detection of the target's class
      over all slices.
    - ``"slice"`` (Sagittal T2/STIR, the canal): one slice for all levels — the slice with the
      largest sum over classes of each class's best confidence on it (the mid-sagittal slice
      shows every level); each level takes its best detection on that slice, and a level
      absent there falls back to its most confident detection anywhere.
    - ``"centroid"``: one slice for all levels, the one nearest the confidence-weighted mean
      position (along the slice normal, from ``series``; slice index without it) of every
      class's best detection on every slice; each level takes its detection on that slice,
      or else on the nearest slice that has one. It suits a detector that cannot tell the
      mid-sagittal slice from its neighbours (trained without neighbouring negatives).

      Measured out of fold on 64 synthetic studies (share of canal levels on the labelled
      instance within 5 mm; docs/RESULTS.md): trained without negatives, "max" 52%, "slice" 63%,
      "centroid" 86%; with the two neighbouring slices as negatives (the default), 60 epochs:
      "max" 95.3%, "slice" 95.6%, "centroid" 94.0% — hence "slice" by default.
    - Sagittal T1 with ``series`` given: a single sagittal slice does not show which side it
      is on, so the left/right classes of a level are pooled and the side comes from geometry
      — the left target takes the most confident detection of either side's class at that level
      on a slice left of the midline (patient x >= ``midline_x``, LPS), the right target on a
      slice right of it (<=). ``midline_x`` defaults to the centre of the stack's x range
      (sagittal stacks are centred on the spine; pass e.g. the canal's x from Sagittal T2 when
      known). The returned Detection carries the target's own class id.
    """
    targets = targets_for_series(series_type)
    if rule == "auto":
        rule = "slice" if series_type == SAGITTAL_T2 else "max"
    if rule not in ("max", "slice", "centroid"):
        raise ValueError(f"unknown rule {rule!r}")
    cands = [d for d in detections if d.confidence > min_conf]
    out: dict[int, Detection | None] = {}
    if series_type == SAGITTAL_T1 and series is not None:
        mid = _lateral_midline(series) if midline_x is None else float(midline_x)
        xs = np.asarray(series.positions, dtype=np.float64)[:, 0]
        level_of = {t.detector_class_id: t.level_index for t in targets}
        for t in targets:
            side_ok = (lambda k: xs[k] >= mid) if t.side == "left" else (lambda k: xs[k] <= mid)
            pool = [d for d in cands if level_of.get(d.class_id) == t.level_index and side_ok(d.slice_index)]
            best = max(pool, key=lambda d: d.confidence, default=None)
            out[t.index] = None if best is None else _with_class(best, t.detector_class_id)
        return out
    by_class: dict[int, Detection] = {}
    by_slice: dict[int, dict[int, Detection]] = {}
    for d in cands:
        cur = by_class.get(d.class_id)
        if cur is None or d.confidence > cur.confidence:
            by_class[d.class_id] = d
        on_slice = by_slice.setdefault(d.slice_index, {})
        cur = on_slice.get(d.class_id)
        if cur is None or d.confidence > cur.confidence:
            on_slice[d.class_id] = d
    chosen: dict[int, Detection] = {}
    if rule == "centroid" and by_slice:
        along = _positions_along_normal(series, max(by_slice) + 1)
        weights = [(d.confidence, along[k]) for k, on_slice in by_slice.items() for d in on_slice.values()]
        total = sum(w for w, _ in weights)
        mid = sum(w * a for w, a in weights) / total if total > 0 else float(np.mean([a for _, a in weights]))
        k_mid = int(np.argmin(np.abs(along - mid)))
        for t in targets:
            on = [k for k, on_slice in by_slice.items() if t.detector_class_id in on_slice]
            if on:
                k = min(on, key=lambda k: (abs(along[k] - along[k_mid]), k))
                out[t.index] = by_slice[k][t.detector_class_id]
            else:
                out[t.index] = None
        return out
    if rule == "slice" and by_slice:
        k = max(sorted(by_slice), key=lambda k: sum(d.confidence for d in by_slice[k].values()))
        chosen = by_slice[k]
    for t in targets:
        out[t.index] = chosen.get(t.detector_class_id) or by_class.get(t.detector_class_id)
    return out


def _positions_along_normal(series, n_min: int) -> np.ndarray:
    """Each slice's position (mm) along the stack normal; slice indices when no series is given."""
    if series is None:
        return np.arange(n_min, dtype=np.float64)
    return np.asarray(series.positions, dtype=np.float64) @ _slice_normal(series)


def _with_class(d: Detection, class_id: int) -> Detection:
    if d.class_id == class_id:
        return d
    return Detection(class_id, d.slice_index, d.instance_number, d.x, d.y, d.confidence, d.width, d.height)


# --------------------------------------------------------------------------------------------
# Hit rates on whole series
# --------------------------------------------------------------------------------------------


@dataclass
class HitRates:
    """Share of labelled targets whose selected detection is on the right slice and within a
    distance. Add several with :meth:`merge`."""

    tolerances_mm: tuple[float, ...]
    n_labelled: int = 0
    n_detected: int = 0
    n_right_slice: int = 0
    hits: dict[float, int] = field(default_factory=dict)
    # Detections within t mm of the labelled point in patient space (3-D), whatever the slice.
    hits_3d: dict[float, int] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def rate(self, tol_mm: float) -> float:
        return self.hits.get(float(tol_mm), 0) / self.n_labelled if self.n_labelled else float("nan")

    def rate_3d(self, tol_mm: float) -> float:
        return self.hits_3d.get(float(tol_mm), 0) / self.n_labelled if self.n_labelled else float("nan")

    def as_dict(self) -> dict[str, float]:
        n = self.n_labelled
        out = {
            "n_labelled": n,
            "detected": self.n_detected / n if n else float("nan"),
            "right_slice": self.n_right_slice / n if n else float("nan"),
        }
        for t in self.tolerances_mm:
            out[f"hit_{t:g}mm"] = self.rate(t)
        for t in self.tolerances_mm:
            out[f"hit_{t:g}mm_3d"] = self.rate_3d(t)
        return out

    @classmethod
    def merge(cls, parts: Iterable[HitRates]) -> HitRates:
        parts = list(parts)
        tols = parts[0].tolerances_mm if parts else (5.0, 10.0)
        out = cls(tols, hits={float(t): 0 for t in tols}, hits_3d={float(t): 0 for t in tols})
        for p in parts:
            out.n_labelled += p.n_labelled
            out.n_detected += p.n_detected
            out.n_right_slice += p.n_right_slice
            for t in tols:
                out.hits[float(t)] += p.hits.get(float(t), 0)
                out.hits_3d[float(t)] += p.hits_3d.get(float(t), 0)
            out.records.extend(p.records)
        return out


def _slice_normal(series) -> np.ndarray:
    o = np.asarray(series.orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _slice_spacing(series) -> float:
    sp = getattr(series, "slice_spacing", None)
    if sp is not None and np.isfinite(sp) and sp > 0:
        return float(sp)
    d = np.diff(np.asarray(series.positions, dtype=np.float64) @ _slice_normal(series))
    d = np.abs(d[np.abs(d) > 1e-6])
    if len(d):
        return float(np.median(d))
    return float(getattr(series, "slice_thickness", 1.0) or 1.0)


def detector_hit_rates(
    selected: Mapping[int, Detection | None],
    coords,
    series,
    tolerances_mm: Sequence[float] = (5.0, 10.0),
    *,
    slice_tolerance_mm: float | None = None,
) -> HitRates:
    """Score the selection of one series against its labelled coordinates.

    A labelled target (row of ``coords`` on this series, for a condition read on its type) is a
    hit at tolerance t when its selected detection

    - is on the right slice: the same instance number for sagittal series; for axial series,
      a slice whose position along the slice normal is within one slice spacing of the labelled
      one (neighbouring axial slices show the same level); ``slice_tolerance_mm`` overrides
      both (0 = same instance); and
    - lies within t mm of the labelled (x, y) in the image plane
      (``hypot(dx * col_spacing, dy * row_spacing)``, PixelSpacing = (row, col)).

    Beside it, ``hits_3d`` counts detections within t mm of the labelled point in patient
    space (``dist_3d_mm``: both points through the DICOM geometry, slice position included),
    whichever slice they are on: a detection on the neighbouring slice of a label that lies
    between two slices is a miss above but can be a few millimetres from the labelled point.
    """
    tols = tuple(float(t) for t in tolerances_mm)
    res = HitRates(tols, hits={t: 0 for t in tols}, hits_3d={t: 0 for t in tols})
    series_type = series.series_type
    rows = _coords_on_series(coords, series, series_type)
    if slice_tolerance_mm is None:
        slice_tolerance_mm = _slice_spacing(series) * 1.01 if series_type == AXIAL_T2 else 0.0
    normal = _slice_normal(series)
    along = np.asarray(series.positions, dtype=np.float64) @ normal
    row_mm, col_mm = float(series.pixel_spacing[0]), float(series.pixel_spacing[1])
    for cond, level, inst, x, y in rows[["condition", "level", "instance_number", "x", "y"]].itertuples(index=False):
        t = TARGET_BY_NAME_LEVEL[(cond, level)]
        det = selected.get(t.index)
        rec = {"column": t.column, "instance_number": int(inst), "x": float(x), "y": float(y), "detected": det is not None}
        res.n_labelled += 1
        if det is None:
            res.records.append(rec)
            continue
        res.n_detected += 1
        try:
            k = int(series.index_of_instance(int(inst)))
        except (KeyError, ValueError, IndexError):
            k = None  # the labelled instance is not in this series: a miss either way
        if slice_tolerance_mm <= 0:
            right = int(det.instance_number) == int(inst)
        else:
            right = k is not None and abs(along[det.slice_index] - along[k]) <= slice_tolerance_mm
        dist = math.hypot((det.x - float(x)) * col_mm, (det.y - float(y)) * row_mm)
        dist_3d = (float(np.linalg.norm(series.pixel_to_patient(det.slice_index, det.x, det.y)
                                        - series.pixel_to_patient(k, float(x), float(y))))
                   if k is not None else math.inf)
        rec.update(det_instance_number=det.instance_number, det_x=det.x, det_y=det.y, confidence=det.confidence,
                   right_slice=right, dist_mm=dist, dist_3d_mm=dist_3d)
        res.n_right_slice += right
        for tol in tols:
            res.hits[tol] += bool(right and dist <= tol)
            res.hits_3d[tol] += bool(dist_3d <= tol)
        res.records.append(rec)
    return res


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------


def _open(path, mode: str):
    path = os.fspath(path)
    if "://" in path:
        import fsspec

        return fsspec.open(path, mode).open()
    if "w" in mode:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, mode)


def _json_safe(obj):
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, int) else k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def save_detector(model: nn.Module, path, **extra: Any) -> None:
    """Write ``{format, state_dict, yaml, nc, names, imgsz, series_type, box_mm, extra}`` with
    ``torch.save`` (tensors + plain Python values only: loads with ``weights_only=True``).
    ``path``: local path or fsspec URL."""
    bare = unwrap_model(model)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()},
        "yaml": _json_safe(bare.yaml),
        "nc": int(bare.model[-1].nc),
        "names": {int(k): str(v) for k, v in bare.names.items()},
        "imgsz": int(getattr(bare, "imgsz", DEFAULT_IMGSZ)),
        "series_type": getattr(bare, "series_type", None),
        "box_mm": float(getattr(bare, "box_mm", float("nan"))),
        "extra": _json_safe(extra),
    }
    with _open(path, "wb") as f:
        torch.save(ckpt, f)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Scoring-only speed-ups, in place: each BatchNorm folded into its convolution
    (Ultralytics' ``fuse``) and the weights stored channels-last. Outputs stay equal up to float
    rounding (tested); on this project's CPU, YOLOv8n at 128 px ran ~20-25 % faster at batch 32
    and at batch 1 (``make bench`` measures it end to end). Not for a model that will be trained
    again: the BatchNorm layers are gone."""
    bare = unwrap_model(model)
    bare.eval()
    bare.fuse(verbose=False)
    bare.to(memory_format=torch.channels_last)
    return model


def load_detector(path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a detector saved by :func:`save_detector` (eval mode, on ``device``)."""
    DetectionModel, get_cfg, _, _ = _ultra()
    with _open(path, "rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a lumbar-ray detector checkpoint (format={ckpt.get('format')!r})")
    model = DetectionModel(copy.deepcopy(ckpt["yaml"]), ch=3, nc=int(ckpt["nc"]), verbose=False)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.names = {int(k): v for k, v in ckpt["names"].items()}
    model.args = get_cfg()
    model.series_type = ckpt["series_type"]
    model.imgsz = int(ckpt["imgsz"])
    model.box_mm = float(ckpt["box_mm"])
    model.checkpoint_extra = ckpt.get("extra", {})
    return model.to(torch.device(device)).eval()
