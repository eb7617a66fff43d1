"""Slice geometry of synthetic series: :class:`SliceStack` and the random sampling of realistic
sagittal and axial acquisitions around a :class:`PatientModel`.

Slices use the conventions of ``docs/CONVENTIONS.md``: sagittal row cosine is (≈0, 1, 0)
(towards posterior), column cosine (0, 0, -1); axial row (1, 0, 0), column (0, 1, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lumbar_ray.synth.anatomy import FIRST_LABELLED_DISC, PatientModel
from lumbar_ray.targets import LEVELS, TARGETS

__all__ = [
    "SliceStack",
    "SeriesGeometry",
    "sample_series_geometry",
    "labels_in_view",
    "sample_labelled_geometry",
    "disc_axis",
    "rotation",
    "moved",
    "sample_axial_slabs",
    "sample_axial_part",
]


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


# ---------------------------------------------------------------------------------------- realistic protocols
@dataclass
class SeriesGeometry:
    """One written series made of one or more :class:`SliceStack` parts (e.g. per-level axial
    slabs, each with its own orientation). Slices are in part order; each slice keeps its own
    plane, so labels and pixel<->patient mapping are per slice."""

    parts: list[SliceStack]

    @property
    def n(self) -> int:
        return sum(p.n for p in self.parts)

    @property
    def positions(self) -> np.ndarray:
        return np.concatenate([p.positions for p in self.parts])

    @property
    def orientations(self) -> np.ndarray:
        """(n, 6) ImageOrientationPatient of each slice."""
        return np.concatenate([np.tile(np.concatenate([p.row_cosine, p.col_cosine]), (p.n, 1)) for p in self.parts])

    @property
    def normals(self) -> np.ndarray:
        o = self.orientations
        return np.cross(o[:, :3], o[:, 3:])

    @property
    def instance_numbers(self) -> np.ndarray:
        return np.concatenate([p.instance_numbers for p in self.parts]).astype(int)

    @property
    def spacing(self) -> float:
        """Slice spacing within a part (median over neighbours, each along its own normal)."""
        gaps = [abs(float((p.positions[k + 1] - p.positions[k]) @ p.normal)) for p in self.parts for k in range(p.n - 1)]
        return float(np.median(gaps)) if gaps else float(self.parts[0].slice_thickness)

    def slice_plane(self, k: int) -> tuple[SliceStack, int]:
        """(part, index in the part) of slice ``k``."""
        for part in self.parts:
            if k < part.n:
                return part, k
            k -= part.n
        raise IndexError(k)

    def project(self, P) -> tuple[int, float, float, float]:
        """Slice whose own plane is nearest to patient point P, and P's pixel (x, y) on it:
        (k, x, y, signed distance mm)."""
        P = np.asarray(P, dtype=float)
        dist = np.einsum("ij,ij->i", P[None, :] - self.positions, self.normals)
        k = int(np.argmin(np.abs(dist)))
        part, i = self.slice_plane(k)
        rel = P - part.positions[i]
        rs, cs = part.pixel_spacing
        return k, float(rel @ part.row_cosine / cs), float(rel @ part.col_cosine / rs), float(dist[k])

    def without(self, k: int) -> "SeriesGeometry":
        """The series less slice ``k`` (instance numbers kept: a gap, as in real archives)."""
        part, i = self.slice_plane(k)
        keep = np.arange(part.n) != i
        cut = SliceStack(part.positions[keep], part.row_cosine, part.col_cosine, part.rows, part.cols, part.pixel_spacing,
                         part.slice_thickness, part.instance_numbers[keep])
        return SeriesGeometry([cut if p is part else p for p in self.parts if p is not part or cut.n])


def disc_axis(model: PatientModel, level_index: int) -> np.ndarray:
    """Unit normal of a labelled disc's mid-plane, pointing superior (the spine's tangent there;
    L5/S1 halfway between L5's axis and the sacrum's, which the lumbosacral angle tilts)."""
    j = FIRST_LABELLED_DISC + level_index
    phi = float(model.phi(model.s_level[j]))
    if j == len(model.s_level) - 1:
        phi += model.kink / 2
    # the arc runs caudally along (0, sin phi, -cos phi) (see PatientModel.arc_to_patient)
    return np.array([0.0, -math.sin(phi), math.cos(phi)])


def rotation(about_x: float = 0.0, about_y: float = 0.0, about_z: float = 0.0) -> np.ndarray:
    """3x3 rotation (radians) about the patient x (left), y (posterior) then z (superior) axes."""
    cx, sx, cy, sy, cz, sz = (f(a) for a in (about_x, about_y, about_z) for f in (math.cos, math.sin))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def moved(stack: SliceStack, R: np.ndarray, shift=(0.0, 0.0, 0.0)) -> SliceStack:
    """The stack turned by ``R`` about its centre, then shifted (mm): an oblique plan, or the
    patient having moved between two acquisitions."""
    half = np.array([(stack.cols - 1) * stack.pixel_spacing[1], (stack.rows - 1) * stack.pixel_spacing[0]]) / 2
    centres = stack.positions + half[0] * stack.row_cosine + half[1] * stack.col_cosine
    c = centres.mean(0)
    new_centres = c + (centres - c) @ R.T + np.asarray(shift, dtype=float)
    row_c, col_c = R @ stack.row_cosine, R @ stack.col_cosine
    ipp = new_centres - half[0] * row_c - half[1] * col_c
    return SliceStack(ipp, row_c, col_c, stack.rows, stack.cols, stack.pixel_spacing, stack.slice_thickness,
                      stack.instance_numbers.copy())


# slices per slab (one disc level), and the planning error of each slab's tilt (degrees)
SLAB_SLICES = {"full": (3, 6), "small": (3, 4)}
SLAB_TILT_ERROR_DEG = 2.0


def _spinal_point(model: PatientModel, level_index: int) -> np.ndarray:
    t = next(t for t in TARGETS if t.family == "spinal" and t.level_index == level_index)
    return model.label_point(t)


def sample_axial_slabs(model: PatientModel, size: str, rng: np.random.Generator, levels) -> list[SliceStack]:
    """One slab of parallel slices per disc level in ``levels`` (indices into LEVELS), each
    centred on the canal at that disc and parallel to the disc (its axis plus a planning error of
    up to :data:`SLAB_TILT_ERROR_DEG`); slices superior first. Matrix, spacing and FOV offset are
    the series' own. Instance numbers are left 0 (the caller numbers the whole series)."""
    p = _SIZES["axial"][size]
    m, px = _matrix_and_pixel(rng, p)
    spacing = float(rng.uniform(*p["spacing"]))
    thick = float(rng.uniform(3.0, 4.0))
    dx, dy = float(rng.normal(0.0, 5.0)), float(rng.uniform(-15.0, 5.0))  # FOV centre from the canal
    half = (m - 1) / 2 * px
    parts = []
    for j in levels:
        err = np.radians(rng.uniform(-SLAB_TILT_ERROR_DEG, SLAB_TILT_ERROR_DEG, 2))
        normal = rotation(about_x=err[0], about_y=err[1] / 2) @ disc_axis(model, j)
        row_c = np.array([1.0, 0.0, 0.0]) - normal[0] * normal
        row_c /= np.linalg.norm(row_c)
        col_c = np.cross(normal, row_c)  # so that row x col = normal (superior)
        k = int(rng.integers(SLAB_SLICES[size][0], SLAB_SLICES[size][1] + 1))
        P = _spinal_point(model, j) + rng.uniform(-1.0, 1.0) * normal
        centre = P + (model.x0 + dx - P[0]) * row_c + dy * col_c
        offsets = ((k - 1) / 2 - np.arange(k)) * spacing
        ipp = centre[None, :] + offsets[:, None] * normal[None, :] - half * row_c - half * col_c
        parts.append(SliceStack(ipp, row_c, col_c, m, m, (px, px), thick, np.zeros(k, dtype=int)))
    return parts


def sample_axial_part(model: PatientModel, size: str, rng: np.random.Generator, levels) -> SliceStack:
    """A plain (untilted) contiguous axial stack over the disc levels ``levels`` only, with a
    share of today's slice count in proportion; slices superior first, instance numbers 0."""
    p = dict(_SIZES["axial"][size])
    frac = len(levels) / len(LEVELS)
    p["n"] = (max(4, round(p["n"][0] * frac)), max(5, round(p["n"][1] * frac)))
    m, px = _matrix_and_pixel(rng, p)
    zl = np.array([_spinal_point(model, j)[2] for j in levels])
    zs, thick = _axial_heights_contiguous(zl, p, rng)
    canal = model.arc_to_patient(0.0, model.canal_centre_b(4), 0.0)
    half = (m - 1) / 2 * px
    cx, cy = model.x0 + rng.normal(0.0, 5.0), canal[1] + rng.uniform(-15.0, 5.0)
    ipp = np.stack([np.full(len(zs), cx - half), np.full(len(zs), cy - half), np.sort(zs)[::-1]], axis=1)
    return SliceStack(ipp, np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), m, m, (px, px), thick,
                      np.zeros(len(zs), dtype=int))
