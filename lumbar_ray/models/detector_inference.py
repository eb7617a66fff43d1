"""Whole-series detection: every slice of a series through its detector, boxes back in original
pixels (each class's best box per slice, or Ultralytics' NMS)."""

from __future__ import annotations

import dataclasses

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lumbar_ray.models.detector import DEFAULT_IMGSZ, import_ultralytics, unwrap_model
from lumbar_ray.models.detector_preprocess import preprocess_volume, preprocess_volume_torch

__all__ = ["Detection", "StageClock", "best_box_per_class", "detect_series"]


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
    # placed between (or beyond) its level's neighbours by geometry, not found by the detector
    # (confidence 0): :func:`lumbar_ray.models.target_selection.select_target_detections`
    interpolated: bool = False

    def with_class(self, class_id: int) -> "Detection":
        """This detection under another class id (a target chosen by geometry from a pooled class)."""
        return self if self.class_id == class_id else dataclasses.replace(self, class_id=class_id)


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
      (:func:`best_box_per_class`) — all that
      :func:`lumbar_ray.models.target_selection.select_target_detections` looks at, since
      every rule picks a class's best box on a slice or over slices. Per-class NMS always keeps
      that box, so the selection is the same as with "nms" (tested), without NMS's per-image cost.
    - ``"nms"``: Ultralytics' NMS; ``multi_label`` keeps a box once per class above ``conf``
      (per-class NMS), ``max_det`` caps the boxes of a slice.
    ``preprocess``: "numpy" (NumPy/OpenCV on the CPU, as in training), "torch"
    (:func:`lumbar_ray.models.detector_preprocess.preprocess_volume_torch` on ``device``) or
    "auto" (torch on a CUDA device, else numpy).
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
    _, _, _, nms = import_ultralytics()
    # NMS on the host: Ultralytics runs it image by image, and on a GPU each image brings its
    # own small kernels and syncs, while the batch's raw output is a few MB to copy once.
    # No time limit: Ultralytics stops NMS after 2 s + 50 ms an image and drops the images left,
    # which on a busy machine lost detections (and made the best-box/NMS comparison test flaky).
    kept = nms(y.float().cpu(), conf_thres=conf, iou_thres=iou, multi_label=multi_label, max_det=max_det,
               max_time_img=math.inf)
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
