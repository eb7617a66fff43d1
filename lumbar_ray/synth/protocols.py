"""Realistic acquisition protocols: the series a synthetic study is acquired as, like real lumbar
archives (RSNA 2024 included), rather than one plain stack per series type.

Each study's :class:`AcquisitionPlan` is drawn from its own random stream (:func:`draw_plan`,
seeded by ``[seed, 0xAC0, index]``), apart from the patient's, so a realistic study and its
``simple`` twin (same seed and index) show the same patient with the same labels. Patterns and
their shares (module constants):

* :data:`AXIAL_SLABS_SHARE` (50 % of studies): the Axial T2 series is one slab per disc level
  (3–6 slices; 3–4 at size small), each parallel to its disc (the phantom's disc axis plus up to
  ±2° planning error; over 200 phantoms the disc tilts span −16° … +2° at L1/L2 and +10° … +33°
  at L5/S1), all in one series with instance numbers running through and each slice's own
  orientation and position.
* :data:`AXIAL_SPLIT_SHARE` (15 %): axial coverage split over two "Axial T2" series, the upper
  2–3 levels in one and the rest in the other; each part is slabs or a plain stack (even odds).
* otherwise (35 %): one plain axial stack as in ``simple`` mode.
* :data:`REPEATED_SAGITTAL_SHARE` (10 %): Sagittal T1 or T2/STIR (even odds) acquired twice; the
  repeat is turned (≤ 1.5° per axis) and shifted (σ 1.5 mm) as after patient motion and has its own
  noise; both are listed with the same description and the labels point at one of them (even odds).
* :data:`MISSING_SLICE_SHARE` (10 % of series): one interior slice that no label points at is
  missing; instance numbers are not renumbered, leaving a gap.
* :data:`OBLIQUE_SAGITTAL_SHARE` (50 % of studies): both sagittal series are planned obliquely,
  rolled and yawed by up to :data:`OBLIQUE_SAGITTAL_MAX_DEG` each (beyond the ±2° yaw of every
  sagittal series), labelled points kept in view.

Labels point at the nearest slice (distance to each slice's own plane) among the labelled series
of their type (:func:`locate_labels`), and (x, y) are in that slice's geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lumbar_ray.synth.acquisition import render_parts
from lumbar_ray.synth.anatomy import PatientModel
from lumbar_ray.synth.geometry import (
    SeriesGeometry,
    SliceStack,
    labels_in_view,
    moved,
    rotation,
    sample_axial_part,
    sample_axial_slabs,
    sample_labelled_geometry,
    sample_series_geometry,
)
from lumbar_ray.targets import AXIAL_T2, LEVELS, SAGITTAL_T1, SAGITTAL_T2, TARGETS

__all__ = [
    "ACQUISITIONS",
    "AXIAL_SLABS_SHARE",
    "AXIAL_SPLIT_SHARE",
    "REPEATED_SAGITTAL_SHARE",
    "MISSING_SLICE_SHARE",
    "OBLIQUE_SAGITTAL_SHARE",
    "OBLIQUE_SAGITTAL_MAX_DEG",
    "ROLES",
    "AcquisitionPlan",
    "AcquiredSeries",
    "LabelLocation",
    "draw_plan",
    "acquire",
    "locate_labels",
    "series_numbers",
]

ACQUISITIONS = ("realistic", "simple")
AXIAL_SLABS_SHARE = 0.50
AXIAL_SPLIT_SHARE = 0.15
REPEATED_SAGITTAL_SHARE = 0.10
MISSING_SLICE_SHARE = 0.10
OBLIQUE_SAGITTAL_SHARE = 0.50
OBLIQUE_SAGITTAL_MAX_DEG = 4.0
REPEAT_TURN_DEG = 1.5
REPEAT_SHIFT_MM = 1.5
ASCENDING_AXIAL_SHARE = 0.79  # instance 1 is the most superior slice (as in the real data)

# Every series a plan can hold: the first acquisition of each type, a second axial series, a repeat.
ROLES = ("sagittal_t1", "sagittal_t2", "axial", "axial_2", "repeat")
_TYPE_OF_ROLE = {"sagittal_t1": SAGITTAL_T1, "sagittal_t2": SAGITTAL_T2, "axial": AXIAL_T2, "axial_2": AXIAL_T2}
_ROLE_OF_TYPE = {SAGITTAL_T1: "sagittal_t1", SAGITTAL_T2: "sagittal_t2", AXIAL_T2: "axial"}
AXIAL_KINDS = ("stack", "slabs", "split")


@dataclass(frozen=True)
class AcquisitionPlan:
    """How one study is acquired (see the module doc)."""

    axial: str = "stack"  # "stack" | "slabs" | "split"
    split_after: int = 3  # split: levels [:split_after] in the first Axial T2 series
    split_slabs: tuple[bool, bool] = (False, False)  # split: whether each part is slabs
    repeat: str | None = None  # series type acquired twice
    repeat_labelled: bool = False  # labels point at the repeat (else at the first acquisition)
    oblique_deg: tuple[float, float] = (0.0, 0.0)  # (roll, yaw) of both sagittal series
    missing: tuple[tuple[str, float], ...] = ()  # (role, u in [0, 1) choosing the missing slice)

    def __post_init__(self):
        if self.axial not in AXIAL_KINDS:
            raise ValueError(f"axial must be one of {AXIAL_KINDS}, got {self.axial!r}")
        if not 1 <= self.split_after < len(LEVELS):
            raise ValueError(f"split_after must be in 1..{len(LEVELS) - 1}")
        if self.repeat not in (None, SAGITTAL_T1, SAGITTAL_T2):
            raise ValueError(f"only a sagittal series can be repeated, got {self.repeat!r}")
        bad = [r for r, _ in self.missing if r not in ROLES]
        if bad:
            raise ValueError(f"unknown series roles {bad}; expected {ROLES}")


def draw_plan(seed: int, index: int) -> AcquisitionPlan:
    """Study ``index``'s plan, from its own stream (every value is always drawn, in a fixed order,
    so each choice's share is independent of the others)."""
    rng = np.random.default_rng([int(seed), 0xAC0, int(index)])
    u = rng.random()
    axial = "slabs" if u < AXIAL_SLABS_SHARE else "split" if u < AXIAL_SLABS_SHARE + AXIAL_SPLIT_SHARE else "stack"
    split_after = int(rng.integers(2, 4))
    split_slabs = tuple(bool(v) for v in rng.random(2) < 0.5)
    repeat_type = (SAGITTAL_T1, SAGITTAL_T2)[int(rng.integers(2))]
    repeat = repeat_type if rng.random() < REPEATED_SAGITTAL_SHARE else None
    repeat_labelled = bool(rng.random() < 0.5)
    angles = rng.uniform(-OBLIQUE_SAGITTAL_MAX_DEG, OBLIQUE_SAGITTAL_MAX_DEG, 2)
    oblique = tuple(float(a) for a in angles) if rng.random() < OBLIQUE_SAGITTAL_SHARE else (0.0, 0.0)
    hit, where = rng.random(len(ROLES)) < MISSING_SLICE_SHARE, rng.random(len(ROLES))
    missing = tuple((role, float(w)) for role, h, w in zip(ROLES, hit, where) if h)
    return AcquisitionPlan(axial, split_after, split_slabs, repeat, repeat_labelled, oblique, missing)


@dataclass
class AcquiredSeries:
    """One series of a study: its role in the plan, type, geometry and rendered volume."""

    role: str
    series_type: str
    geometry: SeriesGeometry
    labelled: bool  # labels of its type may point at it
    volume: np.ndarray | None = None  # (n, rows, cols) float32 once rendered


@dataclass(frozen=True)
class LabelLocation:
    """Where a target's labelled point is: series (index into the study's list), slice, pixel."""

    target_index: int
    series: int
    slice: int
    x: float
    y: float
    distance: float  # mm from the slice's plane


def acquire(model: PatientModel, plan: AcquisitionPlan, size: str, rng: np.random.Generator) -> list[AcquiredSeries]:
    """Geometry and rendered volumes of every series of ``plan`` (roles in :data:`ROLES` order)."""
    series = _sagittal_series(model, plan, size, rng) + _axial_series(model, plan, size, rng)
    series.sort(key=lambda s: ROLES.index(s.role))
    _drop_missing_slices(model, plan, series)
    _render(model, series, size, rng)
    return series


def locate_labels(model: PatientModel, series: list[AcquiredSeries], series_type: str | None = None) -> list[LabelLocation]:
    """Each target's labelled point on the slice nearest it (by distance to each slice's own
    plane) among the labelled series of its type (targets of types ``series`` lacks are left out;
    ``series_type``: only that type's targets)."""
    out = []
    for t in TARGETS:
        if series_type is not None and t.series_type != series_type:
            continue
        best = None
        for i, s in enumerate(series):
            if s.series_type != t.series_type or not s.labelled:
                continue
            k, x, y, d = s.geometry.project(model.label_point(t))
            if best is None or abs(d) < abs(best.distance):
                best = LabelLocation(t.index, i, k, x, y, d)
        if best is not None:
            out.append(best)
    return out


def series_numbers(series: list[AcquiredSeries], rng: np.random.Generator) -> list[int]:
    """SeriesNumber of each series: the three types in a random order, a second axial series and
    a repeat right after their first acquisition."""
    order = [("sagittal_t1", "sagittal_t2", "axial")[k] for k in rng.permutation(3)]
    for s in series:
        if s.role == "axial_2":
            order.insert(order.index("axial") + 1, "axial_2")
        elif s.role == "repeat":
            order.insert(order.index(_ROLE_OF_TYPE[s.series_type]) + 1, "repeat")
    return [order.index(s.role) + 1 for s in series]


# ---------------------------------------------------------------------------------------- sagittal
def _labelled_sagittal(model: PatientModel, series_type: str, size: str, rng: np.random.Generator, R: np.ndarray,
                       like: SliceStack | None = None) -> SliceStack:
    """An (obliquely planned) sagittal stack with ``series_type``'s labelled points in view;
    ``like`` (already turned) is used for the first try only."""
    for _ in range(20):
        stack = like if like is not None else moved(sample_series_geometry(model, "sagittal", size, rng), R)
        if labels_in_view(model, stack, series_type):
            return stack
        like = None
    return stack  # pragma: no cover - extremely unlikely; labels still project onto it


def _sagittal_series(model: PatientModel, plan: AcquisitionPlan, size: str, rng: np.random.Generator) -> list[AcquiredSeries]:
    roll, yaw = (math.radians(a) for a in plan.oblique_deg)
    R = rotation(about_y=roll, about_z=yaw)
    t1 = _labelled_sagittal(model, SAGITTAL_T1, size, rng, R)
    shared = rng.random() < 0.5  # T1 and T2 planned alike half of the time, as in simple mode
    t2 = _labelled_sagittal(model, SAGITTAL_T2, size, rng, R, like=t1 if shared else None)
    stacks = {SAGITTAL_T1: t1, SAGITTAL_T2: t2}
    out = [AcquiredSeries(_ROLE_OF_TYPE[st], st, SeriesGeometry([stack]), True) for st, stack in stacks.items()]
    if plan.repeat is not None:
        repeat = _repeated(model, stacks[plan.repeat], plan.repeat, plan.repeat_labelled, rng)
        out.append(AcquiredSeries("repeat", plan.repeat, SeriesGeometry([repeat]), plan.repeat_labelled))
        out[0 if plan.repeat == SAGITTAL_T1 else 1].labelled = not plan.repeat_labelled
    return out


def _repeated(model: PatientModel, first: SliceStack, series_type: str, labelled: bool, rng: np.random.Generator) -> SliceStack:
    """The series acquired again after the patient moved a little (its labels kept in view if
    they are to point at it)."""
    for _ in range(20):
        turn = np.radians(rng.uniform(-REPEAT_TURN_DEG, REPEAT_TURN_DEG, 3))
        stack = moved(first, rotation(*turn), rng.normal(0.0, REPEAT_SHIFT_MM, 3))
        if not labelled or labels_in_view(model, stack, series_type):
            return stack
    return moved(first, np.eye(3))  # pragma: no cover - the unmoved copy has them in view


# ---------------------------------------------------------------------------------------- axial
def _numbered(parts: list[SliceStack], rng: np.random.Generator) -> SeriesGeometry:
    """The parts (slices superior first) as one series, instance numbers running through them,
    from the top in :data:`ASCENDING_AXIAL_SHARE` of series, else from the bottom."""
    n = sum(p.n for p in parts)
    numbers = np.arange(1, n + 1) if rng.random() < ASCENDING_AXIAL_SHARE else np.arange(n, 0, -1)
    k = 0
    for p in parts:
        p.instance_numbers = numbers[k : k + p.n].copy()
        k += p.n
    return SeriesGeometry(parts)


def _axial_part(model: PatientModel, size: str, rng: np.random.Generator, levels, slabs: bool) -> SeriesGeometry:
    parts = sample_axial_slabs(model, size, rng, levels) if slabs else [sample_axial_part(model, size, rng, levels)]
    return _numbered(parts, rng)


def _axial_series(model: PatientModel, plan: AcquisitionPlan, size: str, rng: np.random.Generator) -> list[AcquiredSeries]:
    """The Axial T2 series of the plan, drawn again (up to 20 times) until every axial labelled
    point lies within a slice spacing of a slice and inside its field of view."""
    levels = list(range(len(LEVELS)))
    for _ in range(20):
        if plan.axial == "stack":
            stack = sample_labelled_geometry(model, "axial", AXIAL_T2, size, rng)
            return [AcquiredSeries("axial", AXIAL_T2, SeriesGeometry([stack]), True)]
        if plan.axial == "slabs":
            out = [AcquiredSeries("axial", AXIAL_T2, _axial_part(model, size, rng, levels, True), True)]
        else:
            k = plan.split_after
            out = [AcquiredSeries("axial", AXIAL_T2, _axial_part(model, size, rng, levels[:k], plan.split_slabs[0]), True),
                   AcquiredSeries("axial_2", AXIAL_T2, _axial_part(model, size, rng, levels[k:], plan.split_slabs[1]), True)]
        if _labels_in_view(model, out, AXIAL_T2):
            return out
    return out  # pragma: no cover - extremely unlikely; labels still point at the nearest slice


def _labels_in_view(model: PatientModel, series: list[AcquiredSeries], series_type: str, margin: float = 8.0) -> bool:
    for loc in locate_labels(model, series, series_type):
        g = series[loc.series].geometry
        part, _ = g.slice_plane(loc.slice)
        rs, cs = part.pixel_spacing
        inside = margin / cs <= loc.x <= part.cols - 1 - margin / cs and margin / rs <= loc.y <= part.rows - 1 - margin / rs
        if not inside or abs(loc.distance) > g.spacing:
            return False
    return True


# ---------------------------------------------------------------------------------------- gaps and pixels
def _drop_missing_slices(model: PatientModel, plan: AcquisitionPlan, series: list[AcquiredSeries]) -> None:
    """Remove one interior slice that no label (of any target, labelled or not) points at from
    each series the plan names; instance numbers are kept, leaving a gap."""
    pointed = {(loc.series, loc.slice) for loc in locate_labels(model, series)}
    where = dict(plan.missing)
    for i, s in enumerate(series):
        if s.role not in where:
            continue
        inst = s.geometry.instance_numbers
        free = [k for k in range(s.geometry.n) if (i, k) not in pointed and inst.min() < inst[k] < inst.max()]
        if free:  # a series of at most two free edge slices keeps them all
            s.geometry = s.geometry.without(free[int(where[s.role] * len(free))])


def _render(model: PatientModel, series: list[AcquiredSeries], size: str, rng: np.random.Generator) -> None:
    """Render every series; two sagittal series planned alike are rendered in one pass."""
    contrast = {SAGITTAL_T1: "T1", SAGITTAL_T2: "STIR" if model.stir else "T2", AXIAL_T2: "T2"}
    t1, t2 = series[0], series[1]
    if _same_slices(t1.geometry, t2.geometry):
        both = render_parts(model, t1.geometry.parts, [contrast[SAGITTAL_T1], contrast[SAGITTAL_T2]], rng, size)
        t1.volume, t2.volume = both[0], both[1]
    for s in series:
        if s.volume is None:
            s.volume = render_parts(model, s.geometry.parts, [contrast[s.series_type]], rng, size)[0]


def _same_slices(a: SeriesGeometry, b: SeriesGeometry) -> bool:
    return (a.n == b.n and np.array_equal(a.instance_numbers, b.instance_numbers) and np.allclose(a.positions, b.positions)
            and np.allclose(a.orientations, b.orientations))
