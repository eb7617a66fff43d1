"""The crops DeepScoreNet grades (32x32 around a point of a volume), cut alike for scoring and training.

* :func:`extract_crop` / :func:`extract_crops` — crops in pixels or in millimetres, single-slice
  ("repeat") or 2.5D ("adjacent", neighbours kept within a slice's slab), scaled by
  :func:`normalize_crop`.
* :func:`extract_neighbour_crops` — the crops one slice either side (within the slab), the
  slice-localisation noise the grader trains with.
* :func:`mirror_axis` — the crop axis along which a flip is a patient left-right mirror.

Volumes follow docs/CONVENTIONS.md: numpy ``(n_slices, rows, cols)``, points as
(slice index, x = column, y = row), PixelSpacing = (row_spacing, col_spacing) in mm.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES

CROP_SIZE = 32


def slab_bounds(n_slices: int, k: int, slab_ids: np.ndarray | Sequence[int] | None = None) -> tuple[int, int]:
    """First and last slice index of slice k's slab (``slab_ids`` from
    :meth:`lumbar_ray.dicom.series.Series.slab_ids`: consecutive runs); the whole volume without."""
    if not 0 <= k < n_slices:
        raise IndexError(f"slice index {k} outside a volume of {n_slices} slices")
    if slab_ids is None:
        return 0, n_slices - 1
    ids = np.asarray(slab_ids)
    if ids.shape != (n_slices,):
        raise ValueError(f"slab_ids must have one entry per slice ({n_slices}), got shape {ids.shape}")
    same = np.flatnonzero(ids == ids[k])
    return int(same.min()), int(same.max())


def neighbour_slices(n_slices: int, k: int, slab_ids: np.ndarray | Sequence[int] | None = None) -> tuple[int, int]:
    """Slices (k - 1, k + 1) within k's slab; k itself where the slab ends."""
    lo, hi = slab_bounds(n_slices, k, slab_ids)
    return max(k - 1, lo), min(k + 1, hi)


def _slice_indices(n_slices: int, k: int, channels: str, n_channels: int, slab_ids=None) -> np.ndarray:
    lo, hi = slab_bounds(n_slices, k, slab_ids)
    if channels == "repeat":
        return np.full(n_channels, k)
    if channels == "adjacent":
        # k - C//2 ... k + C//2 (k-1, k, k+1 for 3 channels), edge slices of k's slab repeated at
        # the ends: a slice of another (tilted) slab is not the neighbouring anatomy at (x, y).
        return np.clip(k + np.arange(n_channels) - n_channels // 2, lo, hi)
    raise ValueError(f"channels must be 'repeat' or 'adjacent', got {channels!r}")


def normalize_crop(
    crop: np.ndarray, valid: np.ndarray | None = None, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Robust per-crop scaling to [0, 1]: the low/high percentiles of the valid pixels (all
    channels together, so relative intensities of adjacent slices survive) map to 0/1, values
    beyond are clipped. Invalid pixels (outside the image) become 0; a flat crop becomes 0."""
    crop = np.asarray(crop, dtype=np.float32)
    if valid is None:
        valid = np.isfinite(crop)
    out = np.zeros(crop.shape, dtype=np.float32)
    values = crop[valid]
    if values.size == 0:
        return out
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        return out
    scaled = np.clip((crop - lo) / (hi - lo), 0.0, 1.0)
    out[valid] = scaled[valid]
    return out


def _sample_plane(
    plane: np.ndarray, rows: np.ndarray, cols: np.ndarray, sigma: tuple[float, float]
) -> np.ndarray:
    """Bilinear samples of ``plane`` on the grid rows x cols; NaN outside the image.

    When the grid is coarser than the pixels (``sigma`` > 0) a Gaussian pre-filter on a local
    window avoids aliasing (sigma = (step - 1) / 2, as scikit-image's anti-aliasing)."""
    n_rows, n_cols = plane.shape
    r0, c0 = 0, 0
    window = plane
    if max(sigma) > 0:
        margin = [int(math.ceil(4 * s)) + 1 for s in sigma]
        r0 = max(int(math.floor(rows.min())) - margin[0], 0)
        r1 = min(int(math.ceil(rows.max())) + margin[0] + 1, n_rows)
        c0 = max(int(math.floor(cols.min())) - margin[1], 0)
        c1 = min(int(math.ceil(cols.max())) + margin[1] + 1, n_cols)
        if r1 <= r0 or c1 <= c0:
            return np.full((rows.size, cols.size), np.nan, dtype=np.float32)
        window = ndimage.gaussian_filter(plane[r0:r1, c0:c1].astype(np.float32), sigma, mode="nearest")
    rr, cc = np.meshgrid(rows - r0, cols - c0, indexing="ij")
    # mode='constant': points outside [0, n-1] get cval, no interpolation across the edge.
    return ndimage.map_coordinates(
        window.astype(np.float32, copy=False), [rr, cc], order=1, mode="constant", cval=np.nan
    ).astype(np.float32)


def extract_crop(
    volume: np.ndarray,
    slice_index: int,
    x: float,
    y: float,
    size_px: int = CROP_SIZE,
    channels: str = "repeat",
    mm: float | tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    n_channels: int = 3,
    percentiles: tuple[float, float] = (1.0, 99.0),
    slab_ids: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """A ``(n_channels, size_px, size_px)`` float32 crop centred on (x = column, y = row).

    * Pixel mode (``mm=None``): the centre is rounded to the nearest pixel and the crop copies
      pixels ``[round(y) - size_px//2, round(y) + size_px - size_px//2)`` (rows; columns alike),
      so the point sits at index ``size_px // 2``.
    * Millimetre mode (``mm`` = side in mm, or (rows_mm, cols_mm)): a crop of that physical size
      resampled bilinearly to size_px x size_px, with ``pixel_spacing`` = (row_spacing,
      col_spacing); output pixel i is at offset ``(i - size_px//2) * mm / size_px`` from the
      (sub-pixel) centre. ``mm = size_px * spacing`` reproduces pixel mode at integer centres.
    * ``channels='repeat'``: slice k in every channel; ``'adjacent'``: slices k-1, k, k+1 (2.5D,
      in the volume's sorted slice order; the first/last slice is repeated at the ends). With
      ``slab_ids`` (:meth:`lumbar_ray.dicom.series.Series.slab_ids`) the neighbours stay in slice
      k's slab, its first/last slice repeated.

    Pixels outside the image are padding: excluded from the percentile scaling and set to 0
    (see :func:`normalize_crop`). A 2-D ``volume`` is one slice.
    """
    volume = np.asarray(volume)
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim != 3:
        raise ValueError(f"volume must be (slices, rows, cols), got shape {volume.shape}")
    k = int(round(float(slice_index)))
    slices = _slice_indices(volume.shape[0], k, channels, n_channels, slab_ids)
    offsets = np.arange(size_px, dtype=np.float64) - size_px // 2
    if mm is None:
        rows = math.floor(float(y) + 0.5) + offsets
        cols = math.floor(float(x) + 0.5) + offsets
        sigma = (0.0, 0.0)
    else:
        if pixel_spacing is None:
            raise ValueError("mm mode needs pixel_spacing=(row_spacing, col_spacing)")
        mm_r, mm_c = (float(mm), float(mm)) if np.isscalar(mm) else (float(mm[0]), float(mm[1]))
        step_r = mm_r / size_px / float(pixel_spacing[0])
        step_c = mm_c / size_px / float(pixel_spacing[1])
        rows = float(y) + offsets * step_r
        cols = float(x) + offsets * step_c
        sigma = (max(0.0, (step_r - 1) / 2), max(0.0, (step_c - 1) / 2))
    planes: dict[int, np.ndarray] = {}
    crop = np.empty((n_channels, size_px, size_px), dtype=np.float32)
    for c, s in enumerate(slices):
        s = int(s)
        if s not in planes:
            planes[s] = _sample_plane(volume[s], rows, cols, sigma)
        crop[c] = planes[s]
    valid = np.isfinite(crop)
    return normalize_crop(crop, valid, percentiles)


def extract_crops(
    volume: np.ndarray,
    points: np.ndarray | Sequence[Sequence[float]],
    size_px: int = CROP_SIZE,
    channels: str = "repeat",
    mm: float | tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    n_channels: int = 3,
    percentiles: tuple[float, float] = (1.0, 99.0),
    slab_ids: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Crops for many points of one volume: ``points`` is (N, 3) of (slice_index, x, y);
    returns (N, n_channels, size_px, size_px) float32. ``slab_ids`` as in :func:`extract_crop`."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.empty((len(pts), n_channels, size_px, size_px), dtype=np.float32)
    for i, (k, x, y) in enumerate(pts):
        out[i] = extract_crop(
            volume, int(round(k)), x, y, size_px=size_px, channels=channels, mm=mm,
            pixel_spacing=pixel_spacing, n_channels=n_channels, percentiles=percentiles, slab_ids=slab_ids,
        )
    return out


def extract_neighbour_crops(
    volume: np.ndarray,
    points: np.ndarray | Sequence[Sequence[float]],
    slab_ids: np.ndarray | Sequence[int] | None = None,
    **crop_args,
) -> np.ndarray:
    """(N, 2, C, size_px, size_px): for each point (k, x, y) the crops at the same (x, y) on
    slices k - 1 and k + 1 of k's slab (:func:`neighbour_slices`; where the slab ends, the crop
    of k itself), cut as :func:`extract_crops` with ``crop_args``. The grader trains on them as
    slice-localisation noise: a detector's point sits on a neighbouring slice now and then."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    n = np.asarray(volume).shape[0] if np.asarray(volume).ndim == 3 else 1
    shifted = []
    for side in (0, 1):
        moved = pts.copy()
        moved[:, 0] = [neighbour_slices(n, int(round(k)), slab_ids)[side] for k in pts[:, 0]]
        shifted.append(extract_crops(volume, moved, slab_ids=slab_ids, **crop_args))
    return np.stack(shifted, axis=1)


def mirror_axis(series_type: str | None, channels: str = "repeat") -> int | None:
    """The crop axis along which a flip is a patient left-right mirror, or None.

    Only the patient left-right mirror is used: the body is close to left-right symmetric, so a
    mirrored crop is still plausible anatomy with the same severity. Flips along other
    directions are not valid anatomy and are never used:

    * Axial T2 (subarticular): columns run towards patient Left, so a horizontal flip (axis 2)
      is the mirror. It turns a left recess into what a right one looks like; the label (the
      grade of the structure in the crop) is unchanged, which is right because one scorer
      grades both sides and is not told the side. A vertical flip would swap anterior and
      posterior (not valid), and so would reversing "adjacent" axial channels (superior and
      inferior).
    * Sagittal T1/T2 (foraminal, spinal): a horizontal flip swaps anterior/posterior and a
      vertical one superior/inferior (both invalid). The patient left-right axis is the slice
      axis, so with ``channels='adjacent'`` reversing the channel order (axis 0) is the mirror;
      with 'repeat' there is nothing to mirror.
    * ``None`` (unknown series): no flip.
    """
    if series_type is None:
        return None
    if series_type not in SERIES_TYPES:
        raise KeyError(f"unknown series type {series_type!r}; expected one of {SERIES_TYPES}")
    if series_type == AXIAL_T2:
        return 2
    if series_type in (SAGITTAL_T1, SAGITTAL_T2) and channels == "adjacent":
        return 0
    return None
