"""How well a detector finds the labelled targets on whole series: per target, whether the
selected detection is on the labelled slice and how far from the labelled point."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lumbar_ray.models.detector_inference import Detection
from lumbar_ray.models.target_selection import slice_normal
from lumbar_ray.targets import AXIAL_T2, TARGET_BY_NAME_LEVEL
from lumbar_ray.training.detector_data import coords_on_series

__all__ = ["SELECTION_METRIC", "HitRates", "collapse_reason", "collapsed", "detector_hit_rates", "selection_value"]

# The rate a detector's best epoch is chosen by (HitRates.as_dict key): the share of labelled
# targets whose chosen detection lies within 5 mm of the labelled point in patient space,
# whichever slice it is on (slice choice and in-plane position in one figure).
SELECTION_METRIC = "hit_5mm_3d"


def collapsed(rates: Mapping[str, float]) -> bool:
    """The one definition of a collapsed detector: on studies with labelled targets
    (``n_labelled`` > 0), not one of its chosen detections lies within 5 mm (3-D) of its
    target — it finds nothing usable (a detected share of 0 is the extreme case). ``rates``:
    :meth:`HitRates.as_dict`'s keys. Without labelled targets nothing can be told: not collapsed."""
    n = rates.get("n_labelled", 0) or 0
    hit = rates.get(SELECTION_METRIC, float("nan"))
    return n > 0 and not (hit is not None and math.isfinite(hit) and hit > 0)


def collapse_reason(rates: Mapping[str, float], where: str) -> str:
    """Why :func:`collapsed` holds, in words, for the history and the model card."""
    detected = rates.get("detected", float("nan"))
    return (f"on {where}: none of {int(rates.get('n_labelled', 0))} labelled targets found within 5 mm (3-D); "
            f"{detected:.0%} had a detection at all")


def selection_value(rates: Mapping[str, float]) -> float:
    """The value a validation round is ranked by (higher is better), NaN when the round is no
    candidate: nothing labelled to measure, or a collapsed detector (never a best epoch)."""
    if collapsed(rates) or not (rates.get("n_labelled", 0) or 0) > 0:
        return float("nan")
    return float(rates[SELECTION_METRIC])


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


def _slice_spacing(series) -> float:
    sp = getattr(series, "slice_spacing", None)
    if sp is not None and np.isfinite(sp) and sp > 0:
        return float(sp)
    d = np.diff(np.asarray(series.positions, dtype=np.float64) @ slice_normal(series))
    d = np.abs(d[np.abs(d) > 1e-6])
    if len(d):
        return float(np.median(d))
    return float(getattr(series, "slice_thickness", 1.0) or 1.0)


def _distance_to_plane(series, slice_index: int, point) -> float:
    """Distance (mm) of a patient point from the plane of one slice, through that slice's own
    orientation: on a series of tilted per-level slabs, positions projected on one normal would
    be off by up to ~25 mm."""
    o = (series.slice_orientation(slice_index) if hasattr(series, "slice_orientation")
         else np.asarray(series.orientation, dtype=np.float64))
    normal = np.cross(o[:3], o[3:])
    normal = normal / (np.linalg.norm(normal) or 1.0)
    return abs(float((np.asarray(point, dtype=np.float64) - np.asarray(series.positions[slice_index])) @ normal))


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
      a slice whose own plane lies within one slice spacing of the labelled point (neighbouring
      axial slices show the same level; each slice's own orientation, for tilted slabs); ``slice_tolerance_mm`` overrides
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
    rows = coords_on_series(coords, series, series_type)
    if slice_tolerance_mm is None:
        slice_tolerance_mm = _slice_spacing(series) * 1.01 if series_type == AXIAL_T2 else 0.0
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
            right = k is not None and _distance_to_plane(
                series, det.slice_index, series.pixel_to_patient(k, float(x), float(y))) <= slice_tolerance_mm
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
