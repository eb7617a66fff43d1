"""The canal's disc levels read in order on a sagittal series: one box per level, the levels from
head to feet, evenly spaced, and on neighbouring slices (the "ordered" rule of
:func:`lumbar_ray.models.target_selection.select_target_detections`).

Why: the canal detector has one class per level, and five lumbar discs look alike. On oblique
realistic studies it labelled the discs one level off on the slice with the most confident boxes
(two levels on one disc) while the neighbouring slice had them right; read as they were, the wrong
canal points also misplaced the axial levels. Anatomy settles most of it: the levels lie in order
from head to feet, one disc spacing apart, and the canal is continuous across slices.

How, in two passes of one dynamic programme over the levels (a state: the last level chosen and
its box; a level may be left out):

1. each level among its own class's best box on every slice, the levels at least
   :data:`MIN_LEVEL_GAP_MM` apart per level step and at most :data:`CANAL_DRIFT_MM` (at least one
   slice) apart sideways per level step;
   the disc spacing is then the median distance per level step between the levels chosen;
2. again, now also offering each box as its neighbouring levels' (at :data:`RELABELLED_WEIGHT`
   of its confidence), and each step between chosen levels must span a whole number of disc
   spacings: within :data:`SPACING_TOLERANCE` of one spacing per level step. A box labelled one
   level off then takes the level its place says.

A level still without a box takes (head to feet, each fill a neighbour of the next) its class's
most confident box that fits between its neighbours by the same checks, else a point placed from
its neighbours (halfway between them, or one spacing beyond the two nearest at
an end of the spine; ``Detection.interpolated``, confidence 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lumbar_ray.models.detector_inference import Detection
from lumbar_ray.targets import Target

__all__ = ["CANAL_DRIFT_MM", "MIN_LEVEL_GAP_MM", "RELABELLED_WEIGHT", "SPACING_TOLERANCE", "select_in_level_order"]

# Adjacent lumbar disc centres lie some 25-45 mm apart (about 35 mm in the phantom); two levels
# found closer than this are one disc found twice. Well below the real spacing: a short spine fits.
MIN_LEVEL_GAP_MM = 12.0
# How far sideways the canal's centre may move from one disc to the next, across the slices of a
# sagittal series: an oblique plan of a few degrees over ~35 mm. Converted to slices per level step
# (at least one: 3-5 mm slices, as in RSNA and the phantom, allow one; a 1 mm series five).
CANAL_DRIFT_MM = 5.0
# A box offered as a neighbouring level counts at this share of its confidence (and reports it:
# the detector did not say it was that level): its own label wins whenever its place allows it.
RELABELLED_WEIGHT = 0.5
# Between two chosen levels n steps apart, the distance must lie within n +- this many disc
# spacings: a disc found twice (0 spacings) or a level skipped (2 for 1) is refused, while the
# spread of real spacings (lordosis, a short L5/S1) stays well inside.
SPACING_TOLERANCE = 0.4


@dataclass(frozen=True)
class _Option:
    """A box offered as one level: the detection under that level's class, what it scores."""

    level: int  # position in the head-to-feet order
    detection: Detection
    score: float
    point: tuple[float, float, float]  # patient point (LPS mm); point[2] is the height (+ superior)
    source_class: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.level, self.source_class, self.detection.slice_index)


def select_in_level_order(targets: Sequence[Target], by_slice: dict[int, dict[int, Detection]], series,
                          min_gap_mm: float = MIN_LEVEL_GAP_MM) -> dict[int, Detection | None]:
    """{target index: Detection | None} of the canal's levels (see the module doc); ``by_slice``:
    ``{slice index: {class id: that class's best box on the slice}}``."""
    max_slice_step = _slices_per_level_step(series)
    ordered = sorted(targets, key=lambda t: t.level_index)
    classes = [t.detector_class_id for t in ordered]
    points: dict[tuple[int, int], tuple[float, float, float]] = {}
    for k, on in by_slice.items():
        for c, d in on.items():
            points[(c, k)] = tuple(float(v) for v in series.pixel_to_patient(k, d.x, d.y))

    def options(i: int, neighbours: bool) -> list[_Option]:
        out = []
        for j in ((i - 1, i, i + 1) if neighbours else (i,)):
            if not 0 <= j < len(classes):
                continue
            weight = 1.0 if j == i else RELABELLED_WEIGHT
            for k, on in sorted(by_slice.items()):
                d = on.get(classes[j])
                if d is not None:
                    as_level = d if j == i else dataclasses.replace(d, class_id=classes[i], confidence=weight * d.confidence)
                    out.append(_Option(i, as_level, weight * d.confidence, points[(classes[j], k)], classes[j]))
        return out

    def in_order(upper: _Option, lower: _Option) -> bool:
        steps = lower.level - upper.level
        return (upper.point[2] - lower.point[2] >= steps * min_gap_mm
                and abs(upper.detection.slice_index - lower.detection.slice_index) <= steps * max_slice_step)

    own = [options(i, False) for i in range(len(ordered))]  # pass 1, and the fills below
    first = _best_path(own, in_order)
    spacing = _disc_spacing(first)
    fits = in_order
    chosen = first
    if spacing is not None:
        def evenly_spaced(upper: _Option, lower: _Option) -> bool:
            steps = lower.level - upper.level
            distance = math.dist(upper.point, lower.point)
            return in_order(upper, lower) and abs(distance - steps * spacing) <= SPACING_TOLERANCE * spacing

        fits = evenly_spaced
        chosen = _best_path([options(i, True) for i in range(len(ordered))], evenly_spaced)
    for i in range(len(ordered)):  # head to feet: a box taken here is a neighbour of the next level
        if chosen[i] is None:
            chosen[i] = _between_neighbours(own[i], chosen, i, fits)
    picks: list[Detection | None] = [o.detection if o is not None else None for o in chosen]
    for i in range(len(ordered)):
        if picks[i] is None:
            picks[i] = _placed_by_neighbours(picks, i, classes[i], series)
    return {t.index: picks[i] for i, t in enumerate(ordered)}


def _best_path(options: list[list[_Option]], fits) -> list[_Option | None]:
    """The choice of at most one option per level, consecutive choices ``fits(upper, lower)``,
    with the largest summed score (ties: more levels chosen, then more own labels, then lower
    slices)."""
    states: dict[object, tuple[float, tuple[_Option | None, ...], _Option | None]] = {None: (0.0, (), None)}
    for found in options:
        new: dict[object, tuple[float, tuple[_Option | None, ...], _Option | None]] = {}
        for key, (score, picks, last) in states.items():
            _keep_best(new, key, score, picks + (None,), last)  # this level left out
            for option in found:
                if last is None or fits(last, option):
                    _keep_best(new, option.key, score + option.score, picks + (option,), option)
        states = new
    return list(max(states.values(), key=lambda s: (s[0], _tie_break(s[1])))[1])


def _keep_best(states: dict, key, score: float, picks: tuple, last) -> None:
    current = states.get(key)
    if current is None or score > current[0] or (score == current[0] and _tie_break(picks) > _tie_break(current[1])):
        states[key] = (score, picks, last)


def _tie_break(picks: tuple) -> tuple:
    """More levels chosen, then own labels, then lower slices (deterministic whatever the order)."""
    chosen = [o for o in picks if o is not None]
    return (len(chosen), sum(o.source_class == o.detection.class_id for o in chosen),
            tuple(-(o.detection.slice_index if o is not None else -1) for o in picks))


def _disc_spacing(chosen: list[_Option | None]) -> float | None:
    """Median distance per level step between consecutive chosen levels (None with fewer than two)."""
    found = [o for o in chosen if o is not None]
    steps = [math.dist(a.point, b.point) / (b.level - a.level) for a, b in zip(found, found[1:])]
    return float(np.median(steps)) if steps else None


def _slices_per_level_step(series) -> int:
    """Slices the canal may move sideways per level step: :data:`CANAL_DRIFT_MM` in the series'
    slice spacing, at least one."""
    spacing = float(getattr(series, "slice_spacing", 0.0) or 0.0)
    return max(1, int(CANAL_DRIFT_MM // spacing)) if math.isfinite(spacing) and spacing > 0 else 1


def _between_neighbours(own: list[_Option], chosen: list[_Option | None], i: int, fits) -> _Option | None:
    """The most confident own-class box of level ``i`` that ``fits`` below its chosen neighbour
    above and above its chosen neighbour below."""
    above = next((o for o in reversed(chosen[:i]) if o is not None), None)
    below = next((o for o in chosen[i + 1:] if o is not None), None)
    between = [o for o in own if (above is None or fits(above, o)) and (below is None or fits(o, below))]
    return max(between, key=lambda o: o.score) if between else None


def _placed_by_neighbours(chosen: list[Detection | None], i: int, class_id: int, series) -> Detection | None:
    """Level ``i`` placed from its found neighbours (pixels and slice of the same series): halfway
    between the levels above and below it, or one disc spacing beyond the two nearest found
    levels at either end of the spine; None when that lands off the image. Lumbar discs are about
    evenly spaced, so this lands near the disc, where the prior alone says nothing of the study."""
    found = [(j, d) for j, d in enumerate(chosen) if d is not None and not d.interpolated]
    above = [(j, d) for j, d in found if j < i]
    below = [(j, d) for j, d in found if j > i]
    if above and below:
        (ja, a), (jb, b) = above[-1], below[0]
    elif len(below) >= 2:
        (ja, a), (jb, b) = below[0], below[1]
    elif len(above) >= 2:
        (ja, a), (jb, b) = above[-2], above[-1]
    else:
        return None
    w = (i - ja) / (jb - ja)  # 0.5 halfway between two neighbours; -1 or 2 one spacing beyond a pair

    def at(u: float, v: float) -> float:
        return float(u + w * (v - u))

    n, rows, cols = series.volume.shape[:3]
    x, y = at(a.x, b.x), at(a.y, b.y)
    if not (0 <= x < cols and 0 <= y < rows):
        return None  # beyond the image: the spine ends in view above or below
    k = int(np.clip(round(at(a.slice_index, b.slice_index)), 0, n - 1))
    return Detection(class_id, k, int(series.instance_numbers[k]), x, y, 0.0,
                     at(a.width, b.width), at(a.height, b.height), interpolated=True)
