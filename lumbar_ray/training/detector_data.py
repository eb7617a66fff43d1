"""The detectors' training images: labelled slices (and unlabelled negatives) cut from studies, and
a dataset that letterboxes and jitters them with one millimetre-sized box per labelled target.

A training image is one labelled instance (slice) of a series with one fixed-size box per target
labelled on it, centred on the labelled (x, y). Box sizes are in millimetres
(:data:`lumbar_ray.models.detector.DEFAULT_BOX_MM`) and become pixels through the series'
PixelSpacing. Optionally a few unlabelled slices far from the labelled ones join as images without
boxes (``negatives``), so that confidence over a whole series peaks on the right slice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lumbar_ray.dicom.read import read_study
from lumbar_ray.models.detector import DEFAULT_BOX_MM, DEFAULT_IMGSZ
from lumbar_ray.models.detector_preprocess import Letterbox, letterbox_image, normalize_volume
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, TARGET_BY_NAME_LEVEL, Target, targets_for_series

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NEGATIVE_GAP",
    "DetectorAugment",
    "DetectorDataset",
    "DetectorSample",
    "coords_on_series",
    "collate_detector",
    "load_detector_samples",
    "samples_from_series",
]

# Training negatives start this many slices from a labelled one: sagittal neighbours are the wrong
# instance (the canal and each foramen have one labelled slice), while an axial neighbour still
# shows the labelled level (detector_hit_rates accepts it), so axial negatives start two away.
DEFAULT_NEGATIVE_GAP: dict[str, int] = {SAGITTAL_T1: 1, SAGITTAL_T2: 1, AXIAL_T2: 2}


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
class DetectorAugment:
    """Training-time jitter of a detector image: small random scale and translation,
    gamma/contrast/brightness and noise. No left-right flips (a flipped sagittal image swaps
    anterior and posterior; a flipped axial image swaps the patient's sides) and no mosaic (it can
    crop away the sacrum that counting levels relies on)."""

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


def coords_on_series(coords, series, series_type: str):
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
    rows = coords_on_series(coords, series, series_type)
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


def load_detector_samples(
    root, split: str, study_ids: Iterable[int], coords, series_type: str, *, negatives: int = 0,
    negative_gap: int | None = None,
) -> list[DetectorSample]:
    """Read each study once (via :func:`lumbar_ray.dicom.read.read_study`) and keep, in memory,
    only the normalised labelled slices of ``series_type`` (uint8), plus ``negatives``
    unlabelled slices per series (see :func:`samples_from_series`)."""
    wanted = {t.condition.name for t in targets_for_series(series_type)}
    coords = coords[coords["condition"].isin(wanted)]
    study_ids = [int(s) for s in study_ids]
    coords = coords[coords["study_id"].astype(np.int64).isin(study_ids)]
    samples: list[DetectorSample] = []
    for sid in study_ids:
        rows = coords[coords["study_id"].astype(np.int64) == sid]
        if rows.empty:
            continue
        study = read_study(root, sid, split)
        for series_id, srows in rows.groupby("series_id"):
            # a folder may yield several series (stacks of other sizes): the one holding the labels
            series = study.find_series(series_id, int(srows["instance_number"].iloc[0]))
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
        augment: bool | DetectorAugment = False,
        samples: Sequence[DetectorSample] | None = None,
        negatives: int = 0,
    ):
        targets_for_series(series_type)
        self.series_type = series_type
        self.imgsz = int(imgsz)
        self.box_mm = float(box_mm if box_mm is not None else DEFAULT_BOX_MM[series_type])
        self.augment = DetectorAugment() if augment is True else (augment or None)
        if samples is None:
            if root is None or coords is None:
                raise ValueError("give root, coords (and study_ids) or samples")
            if study_ids is None:
                study_ids = sorted(coords["study_id"].astype(np.int64).unique())
            samples = load_detector_samples(root, split, study_ids, coords, series_type, negatives=negatives)
        # a list, or a sequence read lazily (training.shards.ShardedSamples), kept as it is
        self.samples = samples if hasattr(samples, "__getitem__") and hasattr(samples, "__len__") else list(samples)

    @classmethod
    def from_samples(cls, samples: Sequence[DetectorSample], series_type: str, **kw) -> DetectorDataset:
        return cls(series_type=series_type, samples=samples, **kw)

    def with_augment(self, augment: bool | DetectorAugment) -> DetectorDataset:
        """Same cached samples, other augmentation (e.g. a val view of a train set)."""
        return DetectorDataset(
            series_type=self.series_type, imgsz=self.imgsz, box_mm=self.box_mm, augment=augment, samples=self.samples
        )

    def __len__(self) -> int:
        return len(self.samples)

    def item_blocks(self) -> np.ndarray:
        """Each item's block (shard chunk) for :class:`lumbar_ray.training.shard_data.ShardBlockSampler`;
        one block when the samples are in memory."""
        blocks = getattr(self.samples, "blocks", None)
        return np.zeros(len(self.samples), dtype=np.int64) if blocks is None else np.asarray(blocks)

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
