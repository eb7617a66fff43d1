"""A folder's parsed slices into stacks: split by orientation and image size, localizers left out,
slices sorted by patient geometry, and a stack decoded into a :class:`~lumbar_ray.dicom.series.Series`.

Slices are sorted by the position of their centre along ``normal = row_cosine x column_cosine``
(docs/CONVENTIONS.md), never by file name or InstanceNumber. For slices that share one orientation
that is the order of ``dot(ImagePositionPatient, normal)``; for a series made of tilted slabs (one
slab parallel to each disc, as real Axial T2 series often are) the centre is what keeps the slabs in
order: a slab tilted by 15 degrees moves its top-left corner ~25 mm along the normal.

A series folder may hold several stacks of one plane and image size: per-level slabs, each tilted
to its disc. :func:`merge_slabs` joins them into one stack so that the series is read whole and
every slice keeps its own position and orientation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from lumbar_ray.dicom.errors import AbsurdImageSizeError, DicomReadError, ReadLimits, SkippedFile
from lumbar_ray.dicom.files import ParsedSlice, decode_pixels, header_float
from lumbar_ray.dicom.series import Series

__all__ = [
    "split_stacks",
    "merge_slabs",
    "plane_of",
    "geometry_sort",
    "slice_centre",
    "filter_localizers",
    "skip_stack",
    "build_series",
]

# Slices whose normals are within 2 degrees belong to the same stack.
_PARALLEL_COS = float(np.cos(np.deg2rad(2.0)))


def split_stacks(slices: Iterable[ParsedSlice]) -> list[list[ParsedSlice]]:
    """Group slices by orientation (normals within 2 degrees), image size and pixel spacing;
    largest first."""
    stacks: list[list[ParsedSlice]] = []
    for s in slices:
        for stack in stacks:
            ref = stack[0]
            if ((s.rows, s.cols) == (ref.rows, ref.cols) and np.allclose(s.pixel_spacing, ref.pixel_spacing, atol=1e-3)
                    and abs(float(s.normal @ ref.normal)) >= _PARALLEL_COS):
                stack.append(s)
                break
        else:
            stacks.append([s])
    return sorted(stacks, key=lambda st: (-len(st), st[0].path))


def merge_slabs(stacks: list[list[ParsedSlice]]) -> list[list[ParsedSlice]]:
    """Join the stacks of :func:`split_stacks` that share a plane, an image size and a pixel
    spacing and lie side by side (their slice centres span disjoint ranges along the normal): the
    slabs of one series, each tilted to its disc. Largest first. Stacks of another plane or size
    stay apart (a 3-plane localizer mixed into a folder), and so does a same-size stack that
    overlaps another (an oblique reformat of the same anatomy is not a slab of it)."""
    groups: list[tuple[tuple, list[list[ParsedSlice]]]] = []
    for stack in stacks:  # largest first (split_stacks' order): the largest stack founds a group
        ref = stack[0]
        key = (plane_of(ref.orientation), ref.rows, ref.cols, tuple(round(float(v), 3) for v in ref.pixel_spacing))
        for group_key, members in groups:
            if group_key == key and not any(_overlap(stack, member, members[0][0].normal) for member in members):
                members.append(stack)
                break
        else:
            groups.append((key, [stack]))
    merged = [[s for member in members for s in member] for _, members in groups]
    return sorted(merged, key=lambda st: (-len(st), min(s.path for s in st)))


# Slabs whose centre ranges along the normal overlap by more than this are not slabs of one series.
_SLAB_OVERLAP_MM = 1.0


def _overlap(a: list[ParsedSlice], b: list[ParsedSlice], normal: np.ndarray) -> bool:
    """Whether two stacks' slice centres span overlapping ranges along ``normal``."""
    pa = [float(slice_centre(s) @ normal) for s in a]
    pb = [float(slice_centre(s) @ normal) for s in b]
    return min(max(pa), max(pb)) - max(min(pa), min(pb)) > _SLAB_OVERLAP_MM


def n_orientations(stack: Sequence[ParsedSlice]) -> int:
    """How many distinct orientations (normals within 2 degrees) a stack's slices have."""
    normals: list[np.ndarray] = []
    for s in stack:
        if not any(abs(float(s.normal @ n)) >= _PARALLEL_COS for n in normals):
            normals.append(s.normal)
    return len(normals)


def plane_of(orientation: Sequence[float]) -> str:
    """'sagittal' (normal along x), 'coronal' (along y) or 'axial' (along z)."""
    o = np.asarray(orientation, dtype=np.float64).reshape(6)
    normal = np.abs(np.cross(o[:3], o[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def slice_centre(s: ParsedSlice) -> np.ndarray:
    """Patient position (LPS mm) of the centre of a slice's image."""
    row_sp, col_sp = s.pixel_spacing
    return s.position + (s.cols - 1) / 2 * col_sp * s.orientation[:3] + (s.rows - 1) / 2 * row_sp * s.orientation[3:]


def geometry_sort(stack: list[ParsedSlice]) -> list[ParsedSlice]:
    """The stack's slices in ascending position of their centres along the normal of its first
    slice (ties: InstanceNumber, path)."""
    normal = stack[0].normal
    return sorted(stack, key=lambda s: (float(slice_centre(s) @ normal), s.instance_number, s.path))


def filter_localizers(slices: list[ParsedSlice]) -> tuple[list[ParsedSlice], list[SkippedFile]]:
    """(slices kept, records of the slices whose ImageType says LOCALIZER)."""
    keep = [s for s in slices if not s.is_localizer]
    skipped = [
        SkippedFile(s.path, f"ImageType {'/'.join(s.image_type)} marks a localizer", "Localizer")
        for s in slices
        if s.is_localizer
    ]
    return keep, skipped


def skip_stack(stack: list[ParsedSlice], why: str, kind: str) -> list[SkippedFile]:
    """A record per slice of a stack left out on purpose."""
    return [SkippedFile(s.path, why, kind) for s in stack]


def build_series(
    stack: list[ParsedSlice],
    *,
    study_id: str,
    series_id: str,
    description: str | None,
    series_type: str | None,
    type_source: str | None,
    limits: ReadLimits,
    where: str,
) -> tuple[Series | None, list[SkippedFile]]:
    """Decode a stack into a Series (slices that fail to decode are skipped)."""
    ordered = geometry_sort(stack)
    rows, cols = ordered[0].rows, ordered[0].cols
    nbytes = len(ordered) * rows * cols * 4
    if nbytes > limits.max_series_bytes:
        raise AbsurdImageSizeError(where, f"{len(ordered)} slices of {rows}x{cols} need {nbytes} bytes > {limits.max_series_bytes}")
    images, kept, skipped = _decode_slices(ordered)
    if not kept:
        return None, skipped
    ref = kept[0]
    desc = description if description else ref.description
    series = Series(
        study_id=str(study_id),
        series_id=str(series_id),
        description=desc,
        series_type=series_type,
        plane=plane_of(ref.orientation),
        volume=np.stack(images).astype(np.float32, copy=False),
        instance_numbers=np.array([s.instance_number for s in kept], dtype=np.int64),
        positions=np.stack([s.position for s in kept]).astype(np.float64),
        orientation=ref.orientation.astype(np.float64),
        orientations=(np.stack([s.orientation for s in kept]).astype(np.float64) if n_orientations(kept) > 1 else None),
        pixel_spacing=ref.pixel_spacing,
        slice_thickness=ref.slice_thickness,
        slice_spacing=_slice_spacing(kept),
        files=[s.path for s in kept],
        type_source=type_source,
        series_instance_uid=ref.series_uid,
        skipped=list(skipped),
    )
    return series, skipped


def _decode_slices(ordered: list[ParsedSlice]) -> tuple[list[np.ndarray], list[ParsedSlice], list[SkippedFile]]:
    """(images, the slices they came from, records of the slices that failed to decode)."""
    images: list[np.ndarray] = []
    kept: list[ParsedSlice] = []
    skipped: list[SkippedFile] = []
    for s in ordered:
        try:
            images.append(decode_pixels(s.ds, s.path))
            kept.append(s)
        except DicomReadError as exc:
            skipped.append(SkippedFile(s.path, exc.reason, exc.error_type))
    return images, kept, skipped


def _slice_spacing(kept: list[ParsedSlice]) -> float:
    """Median gap between consecutive slices along the normal; the header's spacing (or
    thickness, or 1 mm) when the slices do not tell (a single slice, or all at one position)."""
    ref = kept[0]
    normal = ref.normal
    proj = np.array([slice_centre(s) @ normal for s in kept])
    gaps = np.abs(np.diff(proj))
    if gaps.size and np.median(gaps) > 0:
        return float(np.median(gaps))
    return float(header_float(ref.ds, "SpacingBetweenSlices", None) or ref.slice_thickness or 1.0)
