"""The in-memory model of what was read: one decoded image, a series in patient geometry (with
pixel <-> patient conversions) and a study's chosen series.

Geometry follows docs/CONVENTIONS.md: LPS millimetres, ``normal = row_cosine x column_cosine``,
slices sorted by ``dot(ImagePositionPatient, normal)`` ascending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from lumbar_ray.dicom.errors import SkippedFile
from lumbar_ray.targets import SERIES_TYPES

__all__ = ["DicomImage", "Series", "Study", "id_sort_key"]


@dataclass
class DicomImage:
    """One decoded image: float32 ``pixels`` (rows, cols) and its header (without PixelData)."""

    path: str
    pixels: np.ndarray
    dataset: Dataset


@dataclass
class Series:
    """A series' slices in patient geometry (LPS, mm), sorted along the normal of its first slice.

    Most series are one stack of parallel slices (``orientations`` is None: every slice has
    ``orientation``). A series of tilted slabs (one per disc level) keeps each slice's own
    orientation in ``orientations`` (n, 6); :meth:`pixel_to_patient` and :meth:`patient_to_pixel`
    use each slice's own plane.
    """

    study_id: str
    series_id: str
    description: str | None  # from the CSV, else DICOM SeriesDescription
    series_type: str | None  # one of targets.SERIES_TYPES, or None
    plane: str  # "sagittal" | "axial" | "coronal"
    volume: np.ndarray  # float32 (n, rows, cols)
    instance_numbers: np.ndarray  # int64 (n,)
    positions: np.ndarray  # float64 (n, 3) ImagePositionPatient
    orientation: np.ndarray  # float64 (6,) row cosine + column cosine
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_thickness: float | None
    slice_spacing: float  # median distance between consecutive slices along the normal, mm
    files: list[str]  # (n,) as read (URLs keep their protocol)
    type_source: str | None = None  # which rule set series_type (see lumbar_ray.dicom.series_types)
    series_instance_uid: str | None = None
    skipped: list[SkippedFile] = field(default_factory=list)
    orientations: np.ndarray | None = None  # float64 (n, 6) when the slices are not all parallel

    @property
    def n_slices(self) -> int:
        return int(self.volume.shape[0])

    @property
    def row_cosine(self) -> np.ndarray:
        return self.orientation[:3]

    @property
    def column_cosine(self) -> np.ndarray:
        return self.orientation[3:]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def is_multi_oriented(self) -> bool:
        """Whether the slices have more than one orientation (tilted slabs)."""
        return self.orientations is not None

    def slice_orientation(self, slice_index: int) -> np.ndarray:
        """Row cosine + column cosine (6,) of one slice."""
        return self.orientation if self.orientations is None else self.orientations[int(slice_index)]

    def slice_normals(self) -> np.ndarray:
        """(n, 3) unit normal of each slice."""
        o = np.broadcast_to(self.orientation, (self.n_slices, 6)) if self.orientations is None else self.orientations
        normals = np.cross(o[:, :3], o[:, 3:])
        return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)

    def distances_to_planes(self, point: Sequence[float]) -> np.ndarray:
        """(n,) signed distance (mm) of a patient point from each slice's plane."""
        p = np.asarray(point, dtype=np.float64).reshape(3)
        return np.einsum("ij,ij->i", p[None, :] - self.positions, self.slice_normals())

    def slab_ids(self, max_angle_deg: float = 2.0, max_gap_factor: float = 1.6) -> np.ndarray:
        """(n,) int slab of each slice, 0, 1, ... in slice order: a slab is a run of consecutive
        slices that share an orientation (normals and row cosines within ``max_angle_deg``) and
        lie within ``max_gap_factor`` x the run's typical gap of each other. A parallel stack is
        one slab; a tilted-slab series has one per slab (used so that 2.5D crops never mix slabs).

        The typical gap is the median gap of the same-orientation run, so one larger gap does
        not move it. A missing slice doubles one gap; it does not split the slab when the
        instance numbers skip by as many slices as the gap spans (archives and the synthesizer
        keep the others' numbers, leaving a hole), while between two parallel slabs they run on.
        """
        n = self.n_slices
        ids = np.zeros(n, dtype=np.int64)
        if n < 2:
            return ids
        o = np.broadcast_to(self.orientation, (n, 6)) if self.orientations is None else self.orientations
        normals = self.slice_normals()
        rows = o[:, :3] / np.maximum(np.linalg.norm(o[:, :3], axis=1, keepdims=True), 1e-12)
        cos_max = float(np.cos(np.radians(max_angle_deg)))
        # signed: a flipped normal or row puts pixel (x, y) on other anatomy, so it is another slab
        same_orientation = ((np.einsum("ij,ij->i", normals[:-1], normals[1:]) >= cos_max)
                            & (np.einsum("ij,ij->i", rows[:-1], rows[1:]) >= cos_max))
        gaps = np.abs(np.einsum("ij,ij->i", self.positions[1:] - self.positions[:-1], normals[:-1]))
        steps = np.abs(np.diff(self.instance_numbers.astype(np.int64)))
        split = ~same_orientation
        start = 0
        for end in [*np.flatnonzero(~same_orientation).tolist(), n - 1]:  # runs of gap indices
            run = np.arange(start, end)  # gaps start..end-1 join slices start..end
            if run.size:
                typical = float(np.median(gaps[run]))
                if typical > 1e-6:
                    ratio = gaps[run] / typical
                    lost_slices = (np.abs(ratio - np.round(ratio)) <= 0.25) & (steps[run] == np.round(ratio))
                    split[run] = (ratio > max_gap_factor) & ~lost_slices
            start = end + 1
        ids[1:] = np.cumsum(split)
        return ids

    @property
    def slice_positions(self) -> np.ndarray:
        """``dot(IPP_k, normal)`` per slice (ascending for parallel slices), mm."""
        return self.positions @ self.normal

    def index_of_instance(self, instance_number: int) -> int:
        """Slice index (into ``volume``) of an InstanceNumber; KeyError when absent."""
        hits = np.flatnonzero(self.instance_numbers == int(instance_number))
        if hits.size == 0:
            raise KeyError(f"series {self.series_id}: no instance {instance_number}")
        return int(hits[0])

    def pixel_to_patient(self, slice_index: int, x: float, y: float) -> np.ndarray:
        """Patient point (LPS mm) of pixel (x = column, y = row) on slice ``slice_index``."""
        row_sp, col_sp = self.pixel_spacing
        o = self.slice_orientation(slice_index)
        return self.positions[int(slice_index)] + float(x) * col_sp * o[:3] + float(y) * row_sp * o[3:]

    def patient_to_pixel(self, point: Sequence[float]) -> tuple[float, float, float]:
        """``(slice_index, x, y)`` (floats) of a patient point; the inverse of
        :meth:`pixel_to_patient`. The slice index interpolates between the slice positions along
        the normal (extrapolated linearly outside); x/y are measured on the nearest slice. For
        tilted slabs the index is the slice whose own plane lies nearest (a whole number)."""
        p = np.asarray(point, dtype=np.float64).reshape(3)
        if self.orientations is not None:
            k_near = int(np.argmin(np.abs(self.distances_to_planes(p))))
            o = self.orientations[k_near]
            rel = p - self.positions[k_near]
            row_sp, col_sp = self.pixel_spacing
            return float(k_near), float(rel @ o[:3]) / col_sp, float(rel @ o[3:]) / row_sp
        proj = self.slice_positions
        d = float(p @ self.normal)
        n = len(proj)
        if n == 1:
            k = (d - proj[0]) / (self.slice_spacing or 1.0)
        elif d <= proj[0]:
            k = (d - proj[0]) / max(proj[1] - proj[0], 1e-9)
        elif d >= proj[-1]:
            k = (n - 1) + (d - proj[-1]) / max(proj[-1] - proj[-2], 1e-9)
        else:
            k = float(np.interp(d, proj, np.arange(n)))
        nearest = int(np.clip(round(k), 0, n - 1))
        rel = p - self.positions[nearest]
        row_sp, col_sp = self.pixel_spacing
        x = float(rel @ self.orientation[:3]) / col_sp
        y = float(rel @ self.orientation[3:]) / row_sp
        return float(k), x, y


@dataclass
class Study:
    """A study's series: one per series type in ``series``, the rest in ``other_series``."""

    study_id: str
    series: dict[str, Series]  # keyed by series type (targets.SERIES_TYPES)
    other_series: list[Series] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def missing_types(self) -> list[str]:
        return [t for t in SERIES_TYPES if t not in self.series]

    def all_series(self) -> list[Series]:
        return [*self.series.values(), *self.other_series]

    def series_of_type(self, series_type: str) -> list[Series]:
        """Every series of a type: the chosen one first, then the others (a repeated sagittal
        series, axial coverage split over two series), in the order they were read."""
        chosen = self.series.get(series_type)
        return ([chosen] if chosen is not None else []) + [s for s in self.other_series if s.series_type == series_type]

    def find_series(self, series_id, instance_number: int | None = None) -> Series | None:
        """The series with this id (a folder may yield several: stacks of other image sizes);
        with ``instance_number``, the one holding that instance, else the first with the id."""
        matches = [s for s in self.all_series() if str(s.series_id) == str(series_id)]
        if instance_number is not None:
            holding = [s for s in matches if (s.instance_numbers == int(instance_number)).any()]
            matches = holding or matches
        return matches[0] if matches else None


def id_sort_key(name: str) -> tuple:
    """Sort key for study and series ids: numeric ids numerically (first), the others by name."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)
