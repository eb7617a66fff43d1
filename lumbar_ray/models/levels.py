"""Disc levels in 3-D: the sagittal detections give each disc level a point in patient space, each
axial slice takes the level whose disc lies nearest its own plane, and the subarticular targets are
chosen per level among that level's slices; the same geometry checks that the levels lie in order
and that left/right findings lie on their side of the canal.

Why: real Axial T2 series are often per-level slabs tilted to their discs, or split over two
series, and an axial slice does not show which disc it cuts — the sagittal series do. The top
RSNA 2024 solutions located levels on the sagittal series and read the axial slices through them.
Points are LPS millimetres (docs/CONVENTIONS.md): +x is the patient's left, +z superior.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lumbar_ray.models.detector_inference import Detection
from lumbar_ray.targets import TARGETS, Target

__all__ = [
    "AXIAL_LEVEL_TOLERANCE_MM",
    "LocatedDetection",
    "level_points",
    "assign_slices_to_levels",
    "select_axial_by_level",
    "select_axial_whole_series",
    "keep_most_confident",
    "geometry_flags",
]

# An axial slice belongs to the level whose disc point lies within this distance of its plane.
# Discs are ~30-40 mm apart and a per-level slab spans ~+-8 mm around its disc; 10 mm keeps a
# slab's slices and leaves out the mid-vertebral slices of a contiguous stack, with room for the
# few millimetres by which a sagittal detection misses the disc centre.
AXIAL_LEVEL_TOLERANCE_MM = 10.0


@dataclass(frozen=True)
class LocatedDetection:
    """A detection with the series it was found in (several series of a type may be read)."""

    series: object  # lumbar_ray.dicom.series.Series
    detection: Detection

    def point(self) -> np.ndarray:
        """The detection's position in patient space (LPS mm), in its slice's own plane."""
        d = self.detection
        return np.asarray(self.series.pixel_to_patient(d.slice_index, d.x, d.y), dtype=np.float64)


def level_points(chosen: Mapping[int, LocatedDetection | None]) -> dict[int, np.ndarray]:
    """{level index: patient point of its disc} from the chosen sagittal detections (keyed by
    target index): the spinal canal's detection at the level, else the mean of the level's
    foraminal detections (left and right)."""
    spinal: dict[int, np.ndarray] = {}
    foraminal: dict[int, list[np.ndarray]] = {}
    for index, located in chosen.items():
        if located is None:
            continue
        target = TARGETS[index]
        if target.family == "spinal":
            spinal[target.level_index] = located.point()
        elif target.family == "foraminal":
            foraminal.setdefault(target.level_index, []).append(located.point())
    points = {level: np.mean(found, axis=0) for level, found in foraminal.items()}
    points.update(spinal)
    return dict(sorted(points.items()))


def assign_slices_to_levels(series, points: Mapping[int, np.ndarray],
                            tolerance_mm: float = AXIAL_LEVEL_TOLERANCE_MM) -> np.ndarray:
    """(n_slices,) level index of each slice of ``series``: the level whose disc point lies
    nearest the slice's own plane, or -1 when none lies within ``tolerance_mm``."""
    assigned = np.full(series.n_slices, -1, dtype=np.int64)
    if not points:
        return assigned
    levels = np.array(sorted(points), dtype=np.int64)
    distances = np.abs(np.stack([series.distances_to_planes(points[level]) for level in levels], axis=1))
    nearest = np.argmin(distances, axis=1)
    within = distances[np.arange(series.n_slices), nearest] <= tolerance_mm
    assigned[within] = levels[nearest[within]]
    return assigned


def select_axial_by_level(
    detections: Sequence[tuple[object, Sequence[Detection], np.ndarray]],
    targets: Sequence[Target],
    min_conf: float = 0.0,
) -> dict[int, LocatedDetection | None]:
    """One detection per target, chosen per level: ``detections`` holds, per axial series,
    ``(series, its detections, the level of each of its slices)``; each target takes the most
    confident detection of its side (the detector's level classes pooled: the slice's level
    comes from geometry) on a slice of its level, in any of the series. None when its level's
    slices hold no detection of its side (or no slice lies at its level)."""
    side_of = {t.detector_class_id: t.side for t in targets}
    best: dict[int, LocatedDetection | None] = {t.index: None for t in targets}
    for series, found, levels in detections:
        for d in found:
            if d.confidence <= min_conf or not 0 <= d.slice_index < len(levels) or levels[d.slice_index] < 0:
                continue
            for t in targets:
                if t.level_index != levels[d.slice_index] or side_of.get(d.class_id) != t.side:
                    continue
                keep_most_confident(best, t.index, series, d.with_class(t.detector_class_id))
    return best


def select_axial_whole_series(detections: Sequence[tuple[object, Sequence[Detection]]],
                              targets: Sequence[Target]) -> dict[int, LocatedDetection | None]:
    """The fallback without levels in 3-D: each target takes its own class's most confident
    detection over every slice of every series (``detections``: ``(series, its detections)``)."""
    best: dict[int, LocatedDetection | None] = {t.index: None for t in targets}
    index_of_class = {t.detector_class_id: t.index for t in targets}
    for series, found in detections:
        for d in found:
            index = index_of_class.get(d.class_id)
            if index is None:
                continue
            keep_most_confident(best, index, series, d)
    return best


def keep_most_confident(best: dict[int, LocatedDetection | None], index: int, series, detection: Detection) -> None:
    """Put ``detection`` (found in ``series``) at ``best[index]`` unless a detection at least as
    confident is there already."""
    current = best.get(index)
    if current is None or detection.confidence > current.detection.confidence:
        best[index] = LocatedDetection(series, detection)


def geometry_flags(chosen: Mapping[int, LocatedDetection | None]) -> list[str]:
    """Flags for chosen detections that break anatomy: per family and side, levels out of
    order from head to feet (``levels_out_of_order:FAMILY[:SIDE]``); a left or right finding on
    the wrong side of the canal at its level (``wrong_side:COLUMN``). And a level placed between
    its neighbours rather than found (``level_interpolated:COLUMN``)."""
    points = {index: located.point() for index, located in chosen.items() if located is not None}
    flags: list[str] = [f"level_interpolated:{TARGETS[index].column}" for index, located in sorted(chosen.items())
                        if located is not None and located.detection.interpolated]
    groups: dict[tuple[str, str | None], list[tuple[int, float]]] = {}
    for index, point in points.items():
        t = TARGETS[index]
        groups.setdefault((t.family, t.side), []).append((t.level_index, float(point[2])))
    for (family, side), found in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        heights = [z for _, z in sorted(found)]
        if any(lower >= upper for upper, lower in zip(heights, heights[1:])):  # +z is superior
            flags.append(f"levels_out_of_order:{family}" + (f":{side}" if side else ""))
    canal_x = {TARGETS[i].level_index: p[0] for i, p in points.items() if TARGETS[i].family == "spinal"}
    if canal_x:
        for index, point in sorted(points.items()):
            t = TARGETS[index]
            x_mid = canal_x.get(t.level_index, float(np.median(list(canal_x.values()))))
            if (t.side == "left" and point[0] < x_mid) or (t.side == "right" and point[0] > x_mid):
                flags.append(f"wrong_side:{t.column}")
    return flags
