"""Reading DICOM series and studies robustly, from a local folder or any fsspec URL; listing a
split's studies and loading its series-descriptions CSV.

Layout (Kaggle): ``{root}/{split}_images/{study_id}/{series_id}/{instance_number}.dcm`` and
``{root}/{split}_series_descriptions.csv``. Files are read as bytes through fsspec and parsed
with ``pydicom.dcmread(BytesIO)``, so ``s3://bucket/prefix`` works exactly like a local path.

What the reader guarantees
--------------------------
* Every problem is a typed :class:`~lumbar_ray.dicom.errors.DicomReadError` whose message names
  the file and the reason. Inside a series folder, unreadable files (not DICOM, empty, truncated,
  absurd size, a codec that refuses the data, no geometry) are *skipped* and recorded as
  :class:`~lumbar_ray.dicom.errors.SkippedFile`; the series still reads if any slice is left,
  else :class:`~lumbar_ray.dicom.errors.NoUsableSlicesError`.
* Sizes are checked before anything big is allocated (per file: :mod:`lumbar_ray.dicom.files`);
  the float32 volume of a series before it is stacked.
* Slices of a series are sorted by patient geometry (:mod:`lumbar_ray.dicom.stacks`), never by
  file name or InstanceNumber.

How a study's series are chosen (:func:`read_study`)
----------------------------------------------------
1. Each series folder is split into *stacks* of slices sharing orientation (normals within 2
   degrees), image size and pixel spacing; stacks of one plane and image size are then joined
   (:func:`~lumbar_ray.dicom.stacks.merge_slabs`): an Axial T2 series of per-level slabs, each
   tilted to its disc, is read whole, each slice with its own orientation. The largest stack is
   the folder's series; smaller stacks in the same folder (e.g. a 3-plane localizer mixed into
   the folder) are ignored when they have fewer than
   ``min_slices`` slices, else kept as untyped ``other_series``. Slices whose ImageType says
   LOCALIZER and stacks with fewer than ``min_slices`` slices are never chosen; ignored files are
   recorded in ``Study.skipped``.
2. The type of a folder's series: the first rule that decides, in the order
   :mod:`lumbar_ray.dicom.series_types` lists (``Series.type_source`` says which).
3. Per type the stack with the most slices wins (stacks typed from a description beat guessed
   ones; ties go to the higher SeriesNumber, a repeat, then the SeriesInstanceUID, so disk and
   PACS reads agree); the rest go to ``Study.other_series`` (decoded too: labels may point at them, and
   scoring runs every series of a type, :meth:`~lumbar_ray.dicom.series.Study.series_of_type`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from lumbar_ray import storage
from lumbar_ray.dicom.errors import (
    DEFAULT_LIMITS,
    NoUsableSlicesError,
    ReadLimits,
    SeriesNotFoundError,
    SkippedFile,
    StudyNotFoundError,
)
from lumbar_ray.dicom.files import header_int, load_folder_slices
from lumbar_ray.dicom.series import Series, Study, id_sort_key
from lumbar_ray.dicom.series_types import (
    CONFIDENT_SOURCES,
    SeriesCandidate,
    classify,
    classify_alone,
    resolve_pending,
)
from lumbar_ray.dicom.stacks import build_series, filter_localizers, merge_slabs, plane_of, skip_stack, split_stacks
from lumbar_ray.errors import DataLayoutError
from lumbar_ray.targets import SERIES_TYPES

log = logging.getLogger(__name__)

__all__ = ["read_series", "read_study", "list_studies", "load_descriptions"]


# --------------------------------------------------------------------------------------------
# One series


def read_series(
    fs_or_root: AbstractFileSystem | str | os.PathLike,
    series_dir: str | os.PathLike = "",
    *,
    study_id: str | int | None = None,
    series_id: str | int | None = None,
    description: str | None = None,
    series_type: str | None = None,
    limits: ReadLimits | None = None,
    max_pixels: int | None = None,
) -> Series:
    """Read one series folder into a :class:`Series` (slices sorted by geometry).

    ``fs_or_root``: a filesystem (then ``series_dir`` is a path in it) or a local path / URL
    (then ``series_dir`` is relative to it; empty = the folder itself). ``study_id`` and
    ``series_id`` default to the parent folder's and the folder's names. ``series_type``
    defaults to the type the description (given, else DICOM) and geometry imply (or None).

    When the folder mixes orientations the largest stack is read; the others, like files that
    cannot be read and LOCALIZER slices, are listed in ``Series.skipped``.
    Raises SeriesNotFoundError (no such folder / no files) or NoUsableSlicesError.
    """
    limits = (limits or DEFAULT_LIMITS).with_max_pixels(max_pixels)
    fs, folder = _series_folder(fs_or_root, series_dir)
    where = storage.to_url(fs, folder)
    slices, skipped, found = load_folder_slices(fs, folder, limits)
    if not found:
        raise SeriesNotFoundError(where, "series folder does not exist")
    if not slices and not skipped:
        raise SeriesNotFoundError(where, "series folder holds no files")
    slices, localizers = filter_localizers(slices)
    skipped += localizers
    stacks = merge_slabs(split_stacks(slices))
    if not stacks:
        raise NoUsableSlicesError(where, f"no readable image slice ({len(skipped)} files skipped)", skipped)
    for extra in stacks[1:]:
        skipped += skip_stack(
            extra, f"ignored: a {len(extra)}-slice {plane_of(extra[0].orientation)} stack beside the main stack", "ExtraStack"
        )
    names = folder.split("/")
    sid = str(series_id) if series_id is not None else names[-1]
    stid = str(study_id) if study_id is not None else (names[-2] if len(names) > 1 else "")
    cand = SeriesCandidate(sid, stacks[0], description)
    if series_type is None:
        classify_alone(cand)
    else:
        cand.series_type, cand.type_source = series_type, "given"
    series, decode_skips = build_series(
        stacks[0],
        study_id=stid,
        series_id=sid,
        description=description,
        series_type=cand.series_type,
        type_source=cand.type_source,
        limits=limits,
        where=where,
    )
    skipped += decode_skips
    if series is None:
        raise NoUsableSlicesError(where, f"no slice could be decoded ({len(skipped)} files skipped)", skipped)
    series.skipped = skipped
    return series


def _series_folder(
    fs_or_root: AbstractFileSystem | str | os.PathLike, series_dir: str | os.PathLike
) -> tuple[AbstractFileSystem, str]:
    """(filesystem, folder path in it, without a trailing slash) of :func:`read_series`'s arguments."""
    if isinstance(fs_or_root, AbstractFileSystem):
        fs, folder = fs_or_root, os.fspath(series_dir)
    else:
        base = storage.join(fs_or_root, series_dir) if os.fspath(series_dir) else os.fspath(fs_or_root)
        fs, folder = storage.filesystem_for(base)
    return fs, folder.rstrip("/")


# --------------------------------------------------------------------------------------------
# A study


def load_descriptions(root: str | os.PathLike, split: str = "train"):
    """``{split}_series_descriptions.csv`` as a DataFrame of strings, or None when absent.
    Read it once and pass it to :func:`read_study` when reading many studies."""
    path = storage.join(root, f"{split}_series_descriptions.csv")
    if not storage.exists(path):
        return None
    return storage.read_csv(path, dtype=str, keep_default_na=False)


def _descriptions_for(descriptions, study_id: str) -> dict[str, str]:
    if descriptions is None or len(descriptions) == 0:
        return {}
    if not {"study_id", "series_id", "series_description"} <= set(descriptions.columns):
        raise ValueError("descriptions need columns study_id, series_id, series_description")
    rows = descriptions[descriptions["study_id"].astype(str) == study_id]
    out = {}
    for sid, desc in zip(rows["series_id"].astype(str), rows["series_description"]):
        if isinstance(desc, str) and desc.strip():
            out[sid] = desc.strip()
    return out


@dataclass
class _StudyFolder:
    """A study's folder being read: where it is and with which caps."""

    fs: AbstractFileSystem
    path: str  # in fs, no trailing slash
    url: str  # as the caller spelled it
    study_id: str
    limits: ReadLimits

    def series_url(self, series_id: str) -> str:
        return storage.to_url(self.fs, f"{self.path}/{series_id}")


def read_study(
    root: str | os.PathLike,
    study_id: str | int,
    split: str = "train",
    descriptions=None,
    *,
    limits: ReadLimits | None = None,
    max_pixels: int | None = None,
    min_slices: int = 4,
) -> Study:
    """Read a study's series and choose one per series type (see the module doc).

    ``descriptions``: the series-descriptions DataFrame (study_id, series_id,
    series_description); None reads ``{root}/{split}_series_descriptions.csv`` when present.
    ``max_pixels`` overrides ``limits.max_pixels`` (rows x columns x frames per file).
    ``min_slices``: smaller stacks are treated as localizers and never chosen.
    Raises StudyNotFoundError when the study folder does not exist; everything else that cannot
    be used is listed in ``Study.skipped``.
    """
    limits = (limits or DEFAULT_LIMITS).with_max_pixels(max_pixels)
    study_id = str(study_id)
    study_url = storage.join(root, f"{split}_images", study_id)
    fs, study_path = storage.filesystem_for(study_url)
    study = _StudyFolder(fs, study_path.rstrip("/"), study_url, study_id, limits)
    # The study's own listing calls are retried like its file reads: a reset here would otherwise
    # fail the study outright instead of after the bounded retries.
    if not storage.retry_transient(fs.isdir, study.path, what=f"checking {study_url}"):
        raise StudyNotFoundError(study_url, "study folder does not exist")
    if descriptions is None:
        descriptions = load_descriptions(root, split)
    csv = _descriptions_for(descriptions, study_id)
    series_ids, skipped = _list_series_folders(study, csv)
    candidates: list[SeriesCandidate] = []
    extras: list[SeriesCandidate] = []
    for sid in series_ids:
        main, extra, folder_skips = _folder_candidates(study, sid, csv.get(sid), min_slices)
        skipped += folder_skips
        candidates += main
        extras += extra
    for c in candidates:
        classify(c)
    resolve_pending(candidates)
    chosen, others, decode_skips = _decode_by_type(study, candidates)
    skipped += decode_skips
    for c in extras:
        series, extra_skips = _decode_candidate(study, c)
        skipped += extra_skips
        if series is not None:
            others.append(series)
    for t in SERIES_TYPES:
        if t not in chosen:
            log.info("study %s: no %s series", study_id, t)
    return Study(study_id=study_id, series=chosen, other_series=others, skipped=skipped)


def _list_series_folders(study: _StudyFolder, csv: dict[str, str]) -> tuple[list[str], list[SkippedFile]]:
    """(series folder names in id order, records of stray files and of CSV series without a folder)."""
    listing = storage.retry_transient(study.fs.ls, study.path, detail=True, what=f"listing {study.url}")
    entries = [e for e in listing if e["name"].rstrip("/") != study.path]
    series_ids = sorted(
        (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"), key=id_sort_key
    )
    skipped: list[SkippedFile] = [
        SkippedFile(storage.to_url(study.fs, e["name"]), "a file directly in the study folder (not in a series folder)", "UnexpectedFile")
        for e in sorted(entries, key=lambda e: e["name"])
        if e.get("type") != "directory"
    ]
    for sid in sorted(set(csv) - set(series_ids), key=id_sort_key):
        skipped.append(
            SkippedFile(storage.join(study.url, sid), f"listed as {csv[sid]!r} in the descriptions CSV but no folder", "SeriesNotFoundError")
        )
    return series_ids, skipped


def _folder_candidates(
    study: _StudyFolder, series_id: str, csv_description: str | None, min_slices: int
) -> tuple[list[SeriesCandidate], list[SeriesCandidate], list[SkippedFile]]:
    """One series folder's stacks: ([its main stack] or [], its other large stacks, what was skipped)."""
    folder = f"{study.path}/{series_id}"
    slices, file_skips, _ = load_folder_slices(study.fs, folder, study.limits)
    skipped = list(file_skips)
    slices, localizers = filter_localizers(slices)
    skipped += localizers
    stacks = merge_slabs(split_stacks(slices))
    if not stacks and not file_skips and not localizers:
        skipped.append(SkippedFile(storage.to_url(study.fs, folder), "series folder holds no files", "SeriesNotFoundError"))
    main: list[SeriesCandidate] = []
    extras: list[SeriesCandidate] = []
    for i, stack in enumerate(stacks):
        plane = plane_of(stack[0].orientation)
        if len(stack) < min_slices:
            why = (
                f"ignored: a {len(stack)}-slice {plane} stack (fewer than {min_slices} slices: localizer-like)"
                if i == 0
                else f"ignored: a {len(stack)}-slice {plane} stack mixed into the folder (localizer-like)"
            )
            skipped += skip_stack(stack, why, "Localizer")
            continue
        if i == 0:
            main.append(SeriesCandidate(series_id, stack, csv_description))
        else:
            extras.append(SeriesCandidate(series_id, stack, None))
    return main, extras, skipped


def _decode_candidate(study: _StudyFolder, c: SeriesCandidate) -> tuple[Series | None, list[SkippedFile]]:
    return build_series(
        c.stack,
        study_id=study.study_id,
        series_id=c.series_id,
        description=c.csv_description,
        series_type=c.series_type,
        type_source=c.type_source,
        limits=study.limits,
        where=study.series_url(c.series_id),
    )


def _preference(c: SeriesCandidate) -> tuple:
    """Best first among one type's candidates: a confidently typed series, then the longer stack,
    then the later acquisition (the higher SeriesNumber: a sequence is repeated because the first
    run was degraded, by motion most often), then SeriesInstanceUID. The ties are broken by header
    values, never by the folder name, so a study read from disk (numbered folders) and from a PACS
    (folders named by UID) keeps the same series."""
    number = header_int(c.stack[0].ds, "SeriesNumber")
    return (c.type_source not in CONFIDENT_SOURCES, -len(c.stack), number is None, -(number or 0),
            c.stack[0].series_uid or "", id_sort_key(c.series_id))


def _decode_by_type(
    study: _StudyFolder, candidates: list[SeriesCandidate]
) -> tuple[dict[str, Series], list[Series], list[SkippedFile]]:
    """Decode the typed candidates, best first per type: (the chosen series per type, the others,
    what was skipped)."""
    chosen: dict[str, Series] = {}
    others: list[Series] = []
    skipped: list[SkippedFile] = []
    by_type: dict[str | None, list[SeriesCandidate]] = {}
    for c in candidates:
        by_type.setdefault(c.series_type, []).append(c)
    order = [t for t in SERIES_TYPES if t in by_type] + [t for t in by_type if t not in SERIES_TYPES]
    for series_type in order:
        ranked = sorted(by_type[series_type], key=_preference)
        for c in ranked:
            series, decode_skips = _decode_candidate(study, c)
            skipped += decode_skips
            if series is None:
                skipped.append(SkippedFile(study.series_url(c.series_id), "no slice could be decoded", "NoUsableSlicesError"))
                continue
            if series_type in SERIES_TYPES and series_type not in chosen:
                chosen[series_type] = series
            else:
                others.append(series)
    return chosen, others, skipped


# --------------------------------------------------------------------------------------------
# A split


def require_split(root: str | os.PathLike, split: str = "train") -> None:
    """Raise :class:`~lumbar_ray.errors.DataLayoutError` unless ``root`` exists and holds
    ``{split}_images/`` (cheap: jobs call it before starting Ray, so a wrong path fails at once)."""
    if not storage.exists(root):
        raise DataLayoutError(f"data root {root} does not exist")
    if not storage.isdir(storage.join(root, f"{split}_images")):
        raise DataLayoutError(f"{root} has no {split}_images/ folder: expected the Kaggle layout "
                              f"{split}_images/STUDY_ID/SERIES_ID/N.dcm (and {split}_series_descriptions.csv)")


def list_studies(root: str | os.PathLike, split: str = "train") -> list[str]:
    """Study ids of a split: from ``{split}_series_descriptions.csv`` when present, else the
    folders of ``{split}_images/``. Numeric ids sort numerically."""
    descriptions = load_descriptions(root, split)
    if descriptions is not None:
        if "study_id" not in descriptions.columns:
            raise ValueError(f"{split}_series_descriptions.csv has no study_id column")
        ids = {s.strip() for s in descriptions["study_id"].astype(str) if s.strip()}
        return sorted(ids, key=id_sort_key)
    images = storage.join(root, f"{split}_images")
    try:
        names = storage.listdir(images, dirs=True)
    except FileNotFoundError:
        raise StudyNotFoundError(images, f"no {split}_series_descriptions.csv and no {split}_images/ folder") from None
    return sorted(names, key=id_sort_key)
