"""One detection per target of a series, chosen among its detectors' boxes over all slices (rules
per series type; Sagittal T1's side from the slice's position)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lumbar_ray.models.detector_inference import Detection
from lumbar_ray.models.level_order import select_in_level_order
from lumbar_ray.targets import SAGITTAL_T1, SAGITTAL_T2, Target, targets_for_series

__all__ = ["select_target_detections", "slice_normal"]


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
    :func:`lumbar_ray.models.detector_inference.detect_series`) gets None. Rules (``rule="auto"``
    picks per series type):

    - ``"max"`` (Axial T2, Sagittal T1): the most confident detection of the target's class
      over all slices.
    - ``"ordered"`` (Sagittal T2/STIR, the canal, when ``series`` is given): one box per level,
      the levels in order from head to feet, evenly spaced and on neighbouring slices; a box the
      detector labelled one level off takes the level its place says, and a level with no
      usable box is placed between its neighbours (:mod:`lumbar_ray.models.level_order`). It
      replaced "slice" as the canal's default: on oblique realistic studies the single slice
      with the most confident boxes often had them one level off.
    - ``"slice"`` (the canal without ``series``): one slice for all levels — the slice with the
      largest sum over classes of each class's best confidence on it (the mid-sagittal slice
      shows every level); each level takes its best detection on that slice, and a level
      absent there falls back to its most confident detection anywhere.
    - ``"centroid"``: one slice for all levels, the one nearest the confidence-weighted mean
      position (along the slice normal, from ``series``; slice index without it) of every
      class's best detection on every slice; each level takes its detection on that slice,
      or else on the nearest slice that has one. It suits a detector that cannot tell the
      mid-sagittal slice from its neighbours (trained without neighbouring negatives).

      Out of fold (docs/RESULTS.md), "centroid" is far ahead for a canal detector trained
      without negatives; trained with the neighbouring slices as negatives (the default) the
      three rules score within two points of each other, "slice" highest — hence "slice" by
      default, before "ordered".
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
        rule = ("ordered" if series is not None else "slice") if series_type == SAGITTAL_T2 else "max"
    if rule not in ("max", "slice", "centroid", "ordered"):
        raise ValueError(f"unknown rule {rule!r}")
    cands = [d for d in detections if d.confidence > min_conf]
    if series_type == SAGITTAL_T1 and series is not None:
        return _select_by_side(cands, targets, series, midline_x)
    by_class, by_slice = _best_by_class_and_slice(cands)
    if rule == "centroid" and by_slice:
        return _select_nearest_centroid(targets, by_slice, series)
    if rule == "ordered":
        if series is None:
            raise ValueError('rule "ordered" needs the series (its slices\' geometry)')
        return select_in_level_order(targets, by_slice, series)
    chosen: dict[int, Detection] = {}
    if rule == "slice" and by_slice:
        k = max(sorted(by_slice), key=lambda k: sum(d.confidence for d in by_slice[k].values()))
        chosen = by_slice[k]
    return {t.index: chosen.get(t.detector_class_id) or by_class.get(t.detector_class_id) for t in targets}


def _select_by_side(
    cands: Sequence[Detection], targets: Sequence[Target], series, midline_x: float | None
) -> dict[int, Detection | None]:
    """Sagittal T1: per level, the left target takes the best detection of either side's class on
    a slice left of the midline, the right target on a slice right of it (the "side" rule above)."""
    mid = _lateral_midline(series) if midline_x is None else float(midline_x)
    xs = np.asarray(series.positions, dtype=np.float64)[:, 0]
    level_of = {t.detector_class_id: t.level_index for t in targets}
    out: dict[int, Detection | None] = {}
    for t in targets:
        side_ok = (lambda k: xs[k] >= mid) if t.side == "left" else (lambda k: xs[k] <= mid)
        pool = [d for d in cands if level_of.get(d.class_id) == t.level_index and side_ok(d.slice_index)]
        best = max(pool, key=lambda d: d.confidence, default=None)
        out[t.index] = None if best is None else best.with_class(t.detector_class_id)
    return out


def _best_by_class_and_slice(
    cands: Sequence[Detection],
) -> tuple[dict[int, Detection], dict[int, dict[int, Detection]]]:
    """Each class's most confident detection over all slices (``{class_id: Detection}``) and on
    each slice (``{slice_index: {class_id: Detection}}``)."""
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
    return by_class, by_slice


def _select_nearest_centroid(
    targets: Sequence[Target], by_slice: dict[int, dict[int, Detection]], series
) -> dict[int, Detection | None]:
    """The "centroid" rule: the slice nearest the confidence-weighted mean position of every
    per-slice best detection; each target takes its detection on the nearest slice that has one."""
    along = _positions_along_normal(series, max(by_slice) + 1)
    weights = [(d.confidence, along[k]) for k, on_slice in by_slice.items() for d in on_slice.values()]
    total = sum(w for w, _ in weights)
    mid = sum(w * a for w, a in weights) / total if total > 0 else float(np.mean([a for _, a in weights]))
    k_mid = int(np.argmin(np.abs(along - mid)))
    out: dict[int, Detection | None] = {}
    for t in targets:
        on = [k for k, on_slice in by_slice.items() if t.detector_class_id in on_slice]
        if on:
            k = min(on, key=lambda k: (abs(along[k] - along[k_mid]), k))
            out[t.index] = by_slice[k][t.detector_class_id]
        else:
            out[t.index] = None
    return out


def slice_normal(series) -> np.ndarray:
    """Unit normal of a series' slices (row cosine x column cosine, from ``series.orientation``)."""
    o = np.asarray(series.orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / (np.linalg.norm(n) or 1.0)


def _lateral_midline(series) -> float:
    x = np.asarray(series.positions, dtype=np.float64)[:, 0]
    return float((x.min() + x.max()) / 2.0)


def _positions_along_normal(series, n_min: int) -> np.ndarray:
    """Each slice's position (mm) along the stack normal; slice indices when no series is given."""
    if series is None:
        return np.arange(n_min, dtype=np.float64)
    return np.asarray(series.positions, dtype=np.float64) @ slice_normal(series)
