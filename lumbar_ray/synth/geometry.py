"""Slice geometry of synthetic series: :class:`SliceStack` and the random sampling of realistic
sagittal and axial acquisitions around a :class:`PatientModel`.

Slices use the conventions of ``docs/CONVENTIONS.md``: sagittal row cosine is (≈0, 1, 0)
(towards posterior), column cosine (0, 0, -1); axial row (1, 0, 0), column (0, 1, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lumbar_ray.synth.anatomy import PatientModel
from lumbar_ray.targets import LEVELS, TARGETS

__all__ = ["SliceStack", "sample_series_geometry", "labels_in_view", "sample_labelled_geometry"]


@dataclass
class SliceStack:
    """The geometry of one series (DICOM terms). Slice k of the arrays is at ``positions[k]``."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient
    row_cosine: np.ndarray  # (3,)
    col_cosine: np.ndarray  # (3,)
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing, col spacing)
    slice_thickness: float
    instance_numbers: np.ndarray  # (n,)

    @property
    def n(self) -> int:
        return len(self.positions)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def orientation(self) -> list[float]:
        return [float(v) for v in np.concatenate([self.row_cosine, self.col_cosine])]

    def pixel_to_patient(self, k: int, x: float, y: float) -> np.ndarray:
        rs, cs = self.pixel_spacing
        return self.positions[k] + x * cs * self.row_cosine + y * rs * self.col_cosine

    def project(self, P) -> tuple[int, float, float, float]:
        """Nearest slice to patient point P and P's pixel (x, y) on it: (k, x, y, distance mm)."""
        P = np.asarray(P, dtype=float)
        dist = (P - self.positions) @ self.normal
        k = int(np.argmin(np.abs(dist)))
        rel = P - self.positions[k]
        rs, cs = self.pixel_spacing
        return k, float(rel @ self.row_cosine / cs), float(rel @ self.col_cosine / rs), float(dist[k])


_SIZES = {
    # series kind -> size -> parameter ranges
    "sagittal": {
        "full": dict(n=(15, 20), spacing=(3.5, 4.5), matrix=(320, 352, 384, 416, 448), pixel=(0.6, 0.8), fov=(250.0, 300.0)),
        "small": dict(n=(9, 11), spacing=(4.6, 5.4), matrix=(128,), pixel=(1.9, 2.3), fov=(245.0, 295.0)),
    },
    "axial": {
        "full": dict(n=(20, 60), per_level=(4, 6), spacing=(3.0, 4.5), matrix=(256, 288, 320, 352, 384), pixel=(0.5, 0.8), fov=(170.0, 230.0)),
        "small": dict(n=(15, 20), per_level=(3, 4), spacing=(3.5, 4.5), matrix=(128,), pixel=(1.3, 1.75), fov=(170.0, 225.0)),
    },
}


def _matrix_and_pixel(rng, p):
    m = int(rng.choice(p["matrix"]))
    lo = max(p["pixel"][0], p["fov"][0] / m)
    hi = min(p["pixel"][1], p["fov"][1] / m)
    if lo > hi:
        lo = hi = float(np.clip(sum(p["fov"]) / 2 / m, *p["pixel"]))
    return m, float(rng.uniform(lo, hi))


def sample_series_geometry(model: PatientModel, kind: str, size: str, rng: np.random.Generator,
                           like: SliceStack | None = None) -> SliceStack:
    """A realistic acquisition for ``kind`` in {"sagittal", "axial"} at ``size`` {"full", "small"}.

    Sagittal: slices across the midline covering both foramina, FOV from T11/T12 to the sacrum;
    instance 1 is the patient's right in ~64% of series (as in the real data), else the left.
    Axial: either one contiguous stack from above L1/L2 to below L5/S1, or groups of slices through
    each disc; instance 1 is the most superior slice in ~79% of series.
    ``like``: reuse this stack's slice positions (a T1 and T2 sharing geometry).
    """
    p = _SIZES[kind][size]
    if kind == "sagittal":
        if like is not None:
            return SliceStack(like.positions.copy(), like.row_cosine.copy(), like.col_cosine.copy(), like.rows, like.cols,
                              like.pixel_spacing, like.slice_thickness, like.instance_numbers.copy())
        return _sample_sagittal(model, p, rng)
    if kind != "axial":
        raise ValueError(f"unknown series kind {kind!r}")
    return _sample_axial(model, p, rng)


def _sample_sagittal(model: PatientModel, p: dict, rng: np.random.Generator) -> SliceStack:
    n = int(rng.integers(p["n"][0], p["n"][1] + 1))
    spacing = float(rng.uniform(*p["spacing"]))
    m, px = _matrix_and_pixel(rng, p)
    yaw = math.radians(rng.uniform(-2.0, 2.0))
    row_c = np.array([math.sin(yaw), math.cos(yaw), 0.0])
    col_c = np.array([0.0, 0.0, -1.0])
    across = np.array([math.cos(yaw), -math.sin(yaw), 0.0])  # towards patient left
    # FOV centre: a little posterior of the L3/L4 disc centre, vertically between T12 and S2
    s_c = 0.5 * (model.s_mid[1] + model.s_top[7] + 25.0) + rng.uniform(-12.0, 12.0)
    c = model.arc_to_patient(s_c, rng.uniform(10.0, 40.0), 0.0)
    c[0] = model.x0 + rng.normal(0.0, 2.0)
    offsets = (np.arange(n) - (n - 1) / 2) * spacing
    centres = c[None, :] + offsets[:, None] * across[None, :]
    ipp = centres - (m - 1) / 2 * px * row_c - (m - 1) / 2 * px * col_c
    order = np.arange(1, n + 1) if rng.random() < 0.64 else np.arange(n, 0, -1)
    thick = float(spacing - rng.uniform(0.0, 0.5))
    return SliceStack(ipp, row_c, col_c, m, m, (px, px), thick, order)


def _sample_axial(model: PatientModel, p: dict, rng: np.random.Generator) -> SliceStack:
    m, px = _matrix_and_pixel(rng, p)
    row_c = np.array([1.0, 0.0, 0.0])
    col_c = np.array([0.0, 1.0, 0.0])
    lev = [model.label_point(t) for t in TARGETS if t.family == "spinal"]
    zl = np.array([pt[2] for pt in lev])
    if rng.random() < 0.5:
        zs, thick = _axial_heights_per_level(zl, p, rng)
    else:
        zs, thick = _axial_heights_contiguous(zl, p, rng)
    zs = np.sort(zs)[::-1]  # superior first
    n = len(zs)
    canal = model.arc_to_patient(0.0, model.canal_centre_b(4), 0.0)
    cx = model.x0 + rng.normal(0.0, 5.0)
    cy = canal[1] + rng.uniform(-15.0, 5.0)
    half = (m - 1) / 2 * px
    ipp = np.stack([np.full(n, cx - half), np.full(n, cy - half), zs], axis=1)
    order = np.arange(1, n + 1) if rng.random() < 0.79 else np.arange(n, 0, -1)
    return SliceStack(ipp, row_c, col_c, m, m, (px, px), thick, order)


def _axial_heights_per_level(zl: np.ndarray, p: dict, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Slice heights of groups of slices through each disc level (heights ``zl``), and the thickness."""
    zs = []
    for j in range(len(LEVELS)):
        k = int(rng.integers(p["per_level"][0], p["per_level"][1] + 1))
        sp = float(rng.uniform(*p["spacing"]))
        zc = zl[j] + rng.uniform(-1.0, 1.0)
        zs.extend(zc + (np.arange(k) - (k - 1) / 2) * sp)
    zs = np.array(zs)
    thick = float(rng.uniform(3.0, 4.0))
    # keep the count within range (small sizes)
    if len(zs) > p["n"][1]:
        zs = zs[: p["n"][1]]
    return zs, thick


def _axial_heights_contiguous(zl: np.ndarray, p: dict, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Slice heights of one contiguous stack from above the first level to below the last, and the thickness."""
    n = int(rng.integers(p["n"][0], p["n"][1] + 1))
    z_top = zl[0] + rng.uniform(6.0, 14.0)
    z_bot = zl[-1] - rng.uniform(6.0, 14.0)
    zs = np.linspace(z_top, z_bot, n)
    thick = float(min(4.0, abs(zs[0] - zs[1]) * rng.uniform(0.85, 1.0)))
    return zs, thick


def labels_in_view(model: PatientModel, stack: SliceStack, series_type: str, margin: float = 8.0) -> bool:
    """Whether every labelled point of ``series_type`` lies inside the field of view (``margin`` mm
    from its edges) and near a slice."""
    rs, cs = stack.pixel_spacing
    for t in TARGETS:
        if t.series_type != series_type:
            continue
        _, x, y, dist = stack.project(model.label_point(t))
        if not (margin / cs <= x <= stack.cols - 1 - margin / cs and margin / rs <= y <= stack.rows - 1 - margin / rs):
            return False
        spacing = float(np.median(np.abs(np.diff(stack.positions @ stack.normal)))) if stack.n > 1 else 4.0
        if abs(dist) > max(spacing, 4.0):
            return False
    return True


def sample_labelled_geometry(model: PatientModel, kind: str, series_type: str, size: str, rng: np.random.Generator,
                             like: SliceStack | None = None) -> SliceStack:
    """:func:`sample_series_geometry`, drawn again (up to 20 times) until the labelled points of
    ``series_type`` are in view; ``like`` is used for the first try only."""
    for _ in range(20):
        stack = sample_series_geometry(model, kind, size, rng, like=like)
        if labels_in_view(model, stack, series_type):
            return stack
        like = None
    return stack  # pragma: no cover - extremely unlikely; labels still project onto it
