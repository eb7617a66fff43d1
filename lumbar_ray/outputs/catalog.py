"""The series catalog: what was read of each series of a study, as rows of :data:`SERIES_SCHEMA`.

Built in the read stage, where the decoded :class:`~lumbar_ray.dicom.series.Study` is at hand,
as a few plain dicts per study (small: they travel with the study through the pipeline). Each
series read gives one row: the chosen series of its type (``role`` "chosen"), every other
series read beside it ("other"), and each series folder from which nothing could be read
("unread": every file skipped, or a folder the descriptions CSV lists that is not there). The
files a study's reading skipped are counted on their series folder's row, with their reasons.

No patient identity leaves here: only study and series ids (folder names), geometry, how the
type was decided (``type_source``, :mod:`lumbar_ray.dicom.series_types`) and skip reasons; no
DICOM header text (descriptions, names, dates, UIDs) is copied.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from lumbar_ray.dicom.series import id_sort_key
from lumbar_ray.outputs.schema import FLAG_SEPARATOR

__all__ = ["series_rows", "series_folder_of", "skipped_summary"]

# A skipped-file record of something directly in the study folder, not in a series folder.
_STUDY_LEVEL = "UnexpectedFile"


def series_folder_of(path: str, study_id: str, error_type: str) -> str | None:
    """The series folder a skipped-file record belongs to: the folder above a file
    (``.../STUDY/SERIES/N.dcm``), or the folder itself for a folder record (``.../STUDY/SERIES``:
    a folder with nothing usable, or one the CSV lists that is missing); None for a stray file
    in the study folder or a path outside it."""
    parts = str(path).rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == study_id:
        return None if error_type == _STUDY_LEVEL else parts[-1]
    if len(parts) >= 3 and parts[-3] == study_id:
        return parts[-2]
    return None


def skipped_summary(records: Iterable[Any]) -> str:
    """``"Type: reason (n files)"`` per distinct (error type, reason), ";"-joined, most first.
    Reasons name what was wrong, not the file (the count says how many)."""
    counts = Counter((str(r.error_type), str(r.reason).replace(FLAG_SEPARATOR, ",")) for r in records)
    return FLAG_SEPARATOR.join(f"{kind}: {reason} ({n} file{'s' if n != 1 else ''})"
                               for (kind, reason), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series_row(series, role: str) -> dict:
    n, rows, columns = (int(d) for d in series.volume.shape)
    return {
        "study_id": str(series.study_id), "series_id": str(series.series_id), "role": role,
        "series_type": series.series_type, "type_source": series.type_source, "plane": series.plane,
        "n_slices": n, "n_stacks": int(np.unique(series.slab_ids()).size) if n else 0,
        "rows": rows, "columns": columns,
        "row_spacing": _finite(series.pixel_spacing[0]), "column_spacing": _finite(series.pixel_spacing[1]),
        "slice_spacing": _finite(series.slice_spacing), "slice_thickness": _finite(series.slice_thickness),
    }


def series_rows(study) -> list[dict]:
    """The catalog rows of one read study (see the module doc), series in the order read:
    chosen ones in series-type order, then the others, then the unread folders by id."""
    study_id = str(study.study_id)
    rows = [_series_row(s, "chosen") for s in study.series.values()]
    rows += [_series_row(s, "other") for s in study.other_series]
    # Decoding records a file both on its series and on the study: count it once.
    records = {(str(r.path), str(r.reason)): r for s in study.all_series() for r in s.skipped}
    records.update({(str(r.path), str(r.reason)): r for r in study.skipped})
    by_folder: dict[str, list] = {}
    for record in records.values():
        folder = series_folder_of(record.path, study_id, record.error_type)
        if folder is not None:
            by_folder.setdefault(folder, []).append(record)
    first_row = {}
    for row in rows:
        first_row.setdefault(row["series_id"], row)
        row.update(n_skipped=0, skipped_reasons="")
    for folder in sorted(set(by_folder) - set(first_row), key=id_sort_key):
        row = {"study_id": study_id, "series_id": folder, "role": "unread", "n_slices": 0, "n_stacks": 0}
        rows.append(row)
        first_row[folder] = row
    for folder, found in by_folder.items():
        first_row[folder].update(n_skipped=len(found), skipped_reasons=skipped_summary(found))
    return rows
