"""The YOLOv8 detector of step 1: one per series type, built from scratch, with its loss and checkpoint format.

Classes are the targets read on the series type (:func:`lumbar_ray.targets.targets_for_series`):
Sagittal T1 -> 10 foraminal (side x level), Sagittal T2/STIR -> 5 canal levels, Axial T2 -> 10
subarticular (side x level). Training uses Ultralytics' ``DetectionModel`` and ``v8DetectionLoss``
in a plain PyTorch loop (:mod:`lumbar_ray.training.detector_fit`), not Ultralytics' trainer, so
the same loop runs under Ray Train with DDP: the loss is built with :func:`make_loss_fn` on the
*unwrapped* model (``v8DetectionLoss`` reads the Detect head).

Ultralytics is imported lazily, after :func:`lumbar_ray.models.ultralytics_env.configure` (offline,
own config dir). Nothing happens at import of this module.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, detector_class_names, targets_for_series

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_BOX_MM",
    "DEFAULT_IMGSZ",
    "DEFAULT_MODEL_YAML",
    "DetectionLoss",
    "build_detector",
    "detector_from_checkpoint",
    "floor_assigned_scores",
    "import_ultralytics",
    "load_detector",
    "make_loss_fn",
    "prepare_detector_for_inference",
    "save_detector",
    "unwrap_model",
]

DEFAULT_MODEL_YAML = "yolov8n.yaml"
DEFAULT_IMGSZ = 256
# Side of the square training box per series type, in millimetres (about one disc level high).
DEFAULT_BOX_MM: dict[str, float] = {SAGITTAL_T1: 20.0, SAGITTAL_T2: 20.0, AXIAL_T2: 20.0}
CHECKPOINT_FORMAT = "lumbar-ray-detector/1"
# Ultralytics' task-aligned assigner gives each positive anchor the classification target
# score^0.5 x CIoU^6, normalised per target by its best anchor's CIoU. When every candidate box of
# every target has CIoU 0 (boxes regressed to nothing after an unstable step), every target is 0:
# the box and DFL losses, weighted by those targets, vanish and the classification loss only
# pushes scores down: a fixed point. Seen as a CV fold that detects nothing while its loss falls to
# ~0.03 (the demo's Sagittal T1 fold 1; box and DFL loss exactly 0 with 159 anchors assigned). A
# small floor on the assigned positives' targets keeps the box gradient, so training climbs out;
# where the alignment is above it (every healthy positive) nothing changes.
ASSIGNED_SCORE_FLOOR = 0.01


def import_ultralytics():
    """Configure Ultralytics offline (idempotent), then import what we use:
    ``(DetectionModel, get_cfg, v8DetectionLoss, non_max_suppression)``."""
    from lumbar_ray.models import ultralytics_env

    ultralytics_env.configure()
    # heavy and configured first: ultralytics reads its settings (network, config dir) on import
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
    eval-mode model detects nothing. 0.1 (PyTorch's default) plus
    :func:`lumbar_ray.training.detector_fit.recalibrate_batchnorm` at the end of training fixes that.

    ``nc = len(targets_for_series(series_type))``, ``names = detector_class_names(series_type)``;
    ``model.args`` holds Ultralytics' default hyperparameters (loss gains box 7.5, cls 0.5,
    dfl 1.5) as ``v8DetectionLoss`` needs. Our metadata rides on plain attributes:
    ``series_type``, ``imgsz``, ``box_mm``.
    """
    DetectionModel, get_cfg, _, _ = import_ultralytics()
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
        _, get_cfg, _, _ = import_ultralytics()
        self.model = unwrap_model(model)
        if getattr(self.model, "args", None) is None:
            self.model.args = get_cfg()
        self._loss = None
        self._device = None

    @property
    def criterion(self):
        device = next(self.model.parameters()).device
        if self._loss is None or self._device != device:
            _, _, v8DetectionLoss, _ = import_ultralytics()
            self._loss, self._device = v8DetectionLoss(self.model), device
            floor_assigned_scores(self._loss.assigner)
            self.loss_names = tuple(self._loss.loss_names)
        return self._loss

    def __call__(self, preds, batch):
        return self.criterion(preds, batch)


def floor_assigned_scores(assigner, floor: float = ASSIGNED_SCORE_FLOOR):
    """Make Ultralytics' ``TaskAlignedAssigner`` give every assigned positive at least ``floor``
    as its class's target score (see :data:`ASSIGNED_SCORE_FLOOR`); returns the assigner. Wraps
    the instance's ``_forward``, which ``forward`` calls (also image by image after a CUDA OOM)."""
    inner = assigner._forward

    def _forward(*args, **kwargs):
        labels, bboxes, scores, fg_mask, gt_idx = inner(*args, **kwargs)
        floored = torch.nn.functional.one_hot(labels.long(), scores.shape[-1]).to(scores.dtype)
        floored = floored * fg_mask[..., None].to(scores.dtype) * floor
        return labels, bboxes, torch.maximum(scores, floored), fg_mask, gt_idx

    assigner._forward = _forward
    return assigner


def make_loss_fn(model: nn.Module) -> DetectionLoss:
    """The detection loss for ``model`` (DDP-wrapped or not): built on the unwrapped model, so it
    reads the Detect head (strides, nc) and ``model.args`` (gains box 7.5, cls 0.5, dfl 1.5).
    Safe to make before or after moving/wrapping the model."""
    return DetectionLoss(model)


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------


def _open(path, mode: str):
    path = os.fspath(path)
    if "://" in path:
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


def prepare_detector_for_inference(model: nn.Module) -> nn.Module:
    """Scoring-only speed-ups, in place: each BatchNorm folded into its convolution
    (Ultralytics' ``fuse``) and the weights stored channels-last — fewer kernels per forward
    pass, outputs equal up to float rounding (tested; ``make bench`` measures the gain). Not for
    a model that will be trained again: the BatchNorm layers are gone."""
    bare = unwrap_model(model)
    bare.eval()
    bare.fuse(verbose=False)
    bare.to(memory_format=torch.channels_last)
    return model


def load_detector(path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a detector saved by :func:`save_detector` (eval mode, on ``device``)."""
    with _open(path, "rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    return detector_from_checkpoint(ckpt, device, name=str(path))


def detector_from_checkpoint(ckpt: Mapping[str, Any], device: torch.device | str = "cpu",
                             name: str = "checkpoint") -> nn.Module:
    """The detector of a checkpoint dict as :func:`save_detector` writes it (eval mode, on
    ``device``); :func:`lumbar_ray.models.compat.check_detector_checkpoint` checks one first."""
    DetectionModel, get_cfg, _, _ = import_ultralytics()
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{name}: not a lumbar-ray detector checkpoint (format={ckpt.get('format')!r})")
    model = DetectionModel(copy.deepcopy(ckpt["yaml"]), ch=3, nc=int(ckpt["nc"]), verbose=False)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.names = {int(k): v for k, v in ckpt["names"].items()}
    model.args = get_cfg()
    model.series_type = ckpt["series_type"]
    model.imgsz = int(ckpt["imgsz"])
    model.box_mm = float(ckpt["box_mm"])
    model.checkpoint_extra = ckpt.get("extra", {})
    return model.to(torch.device(device)).eval()
