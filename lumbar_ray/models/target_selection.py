"""One detection per target of a series, chosen among its detectors' boxes over all slices (rules
per series type; Sagittal T1's side from the slice's position)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lumbar_ray.models.detector_inference import Detection
from lumbar_ray.targets import SAGITTAL_T1, SAGITTAL_T2, Target, targets_for_series

__all__ = ["MIN_LEVEL_GAP_MM", "select_target_detections", "slice_normal"]

# Adjacent lumbar disc centres lie some 25-45 mm apart along the body axis (about 35 mm in the
# phantom); two levels found closer than this are one disc found twice, or a level found at its
# neighbour's disc. Well below the real spacing, so a short spine still fits.
MIN_LEVEL_GAP_MM = 12.0


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
    - ``"ordered"`` (Sagittal T2/STIR, the canal, when ``series`` is given): one detection per
      level, the levels in order from head to feet. Among every slice's best box of each level's
      class, the choice with the largest summed confidence such that each level lies at least
      :data:`MIN_LEVEL_GAP_MM` (per level step) below the one above it, and at most one slice
      (per level step) to either side of it: the canal is continuous, but in an obliquely planned
      series it runs across slices, so the levels cannot all be read on one slice. A level
      left out of that choice takes its class's most confident box that still lies between its
      neighbours. Why: with one slice for all levels, the detector's level labels on that
      slice are taken as they are, and on oblique realistic studies it labelled the discs one
      level off (two levels on one disc) where the neighbouring slice had them right.
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
        return _select_in_level_order(targets, by_slice, series)
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


def _select_in_level_order(
    targets: Sequence[Target], by_slice: dict[int, dict[int, Detection]], series,
    min_gap_mm: float = MIN_LEVEL_GAP_MM, max_slice_step: int = 1,
) -> dict[int, Detection | None]:
    """The "ordered" rule: a dynamic programme over the levels from head to feet. A state is the
    last level chosen and its detection; a level may be left out (its neighbours must then lie
    twice as far apart, and may be two slices apart). Heights are patient z (LPS: + superior)."""
    ordered = sorted(targets, key=lambda t: t.level_index)
    height: dict[tuple[int, int], float] = {}
    options: list[list[Detection]] = []
    for t in ordered:
        found = [on[t.detector_class_id] for k, on in sorted(by_slice.items()) if t.detector_class_id in on]
        for d in found:
            height[(d.class_id, d.slice_index)] = float(series.pixel_to_patient(d.slice_index, d.x, d.y)[2])
        options.append(found)

    def fits(upper: tuple[int, Detection], lower: tuple[int, Detection]) -> bool:
        (i, a), (j, b) = upper, lower
        steps = j - i
        return (height[(a.class_id, a.slice_index)] - height[(b.class_id, b.slice_index)] >= steps * min_gap_mm
                and abs(a.slice_index - b.slice_index) <= steps * max_slice_step)

    # last chosen (position, detection) or None -> (summed confidence, choice per position so far)
    states: dict[tuple[int, int] | None, tuple[float, tuple[Detection | None, ...], tuple[int, Detection] | None]]
    states = {None: (0.0, (), None)}
    for i, found in enumerate(options):
        new: dict = {}
        for key, (score, picks, last) in states.items():
            _keep_best(new, key, score, picks + (None,), last)  # this level left out
            for d in found:
                if last is None or fits(last, (i, d)):
                    _keep_best(new, (i, d.slice_index), score + d.confidence, picks + (d,), (i, d))
        states = new
    _, picks, _ = max(states.values(), key=lambda s: (s[0], _slices_key(s[1])))
    chosen = list(picks)
    for i, t in enumerate(ordered):
        if chosen[i] is not None:
            continue
        above = next(((j, chosen[j]) for j in range(i - 1, -1, -1) if chosen[j] is not None), None)
        below = next(((j, chosen[j]) for j in range(i + 1, len(ordered)) if chosen[j] is not None), None)
        between = [(i, d) for d in options[i]
                   if (above is None or _below(height, above, (i, d), min_gap_mm))
                   and (below is None or _below(height, (i, d), below, min_gap_mm))]
        if between:
            chosen[i] = max(between, key=lambda item: item[1].confidence)[1]
    return {t.index: chosen[i] for i, t in enumerate(ordered)}


def _keep_best(states: dict, key, score: float, picks: tuple, last) -> None:
    current = states.get(key)
    if current is None or (score, _slices_key(picks)) > (current[0], _slices_key(current[1])):
        states[key] = (score, picks, last)


def _slices_key(picks: tuple) -> tuple:
    """Ties in summed confidence go to the choice with fewer levels left out, then to lower slices
    (deterministic whatever the dict order)."""
    return (sum(d is not None for d in picks), tuple(-(d.slice_index if d is not None else -1) for d in picks))


def _below(height: dict, upper: tuple[int, Detection], lower: tuple[int, Detection], min_gap_mm: float) -> bool:
    (i, a), (j, b) = upper, lower
    return height[(a.class_id, a.slice_index)] - height[(b.class_id, b.slice_index)] >= (j - i) * min_gap_mm


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
