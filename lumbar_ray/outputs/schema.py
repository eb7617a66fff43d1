"""The schemas of the scoring outputs (predictions, errors, the studies worklist and the series
catalog), and the checks every table passes before a write.

A table is cast to its schema and refused with a clear :class:`SchemaError` for unknown or missing
columns, unknown conditions/levels, inconsistent row ids, bad probabilities, duplicate targets and
(by default) studies without all 25 targets; studies and series rows for values out of their range.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lumbar_ray.targets import (
    CONDITIONS,
    LEVELS,
    PROBABILITY_COLUMNS,
    SERIES_TYPES,
    SEVERITIES,
    SEVERITY_WEIGHTS,
    TARGETS,
    level_slug,
)

__all__ = [
    "PREDICTIONS",
    "ERRORS",
    "STUDIES",
    "SERIES",
    "STAGES",
    "SERIES_ROLES",
    "PREDICTIONS_SCHEMA",
    "ERRORS_SCHEMA",
    "STUDIES_SCHEMA",
    "SERIES_SCHEMA",
    "SCHEMAS",
    "PREDICTIONS_OPTIONAL",
    "ERRORS_OPTIONAL",
    "FLAG_SEPARATOR",
    "NOT_FOUND",
    "SchemaError",
    "to_predictions_table",
    "to_errors_table",
    "to_studies_table",
    "to_series_table",
    "format_examples",
    "utc_now",
]

PREDICTIONS = "predictions"
ERRORS = "errors"
STUDIES = "studies"
SERIES = "series"
STAGES: tuple[str, ...] = ("list", "read", "detect", "score", "write")
_PROBS = list(PROBABILITY_COLUMNS)
_UTC_US = pa.timestamp("us", tz="UTC")
FLAG_SEPARATOR = ";"
# The worklist's worst grade of a condition none of whose levels the detectors found.
NOT_FOUND = "not found"

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("row_id", pa.string(), nullable=False),  # Kaggle: {study_id}_{condition}_{level_slug}
        pa.field("condition", pa.string(), nullable=False),  # condition slug, e.g. spinal_canal_stenosis
        pa.field("level", pa.string(), nullable=False),  # "L1/L2" ...
        *[pa.field(p, pa.float64(), nullable=False) for p in PROBABILITY_COLUMNS],
        pa.field("detected", pa.bool_(), nullable=False),
        pa.field("confidence", pa.float64()),  # null when not detected
        pa.field("series_id", pa.string()),
        pa.field("instance_number", pa.int64()),
        pa.field("x", pa.float64()),  # pixels (column)
        pa.field("y", pa.float64()),  # pixels (row)
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", _UTC_US, nullable=False),
        pa.field("flags", pa.string(), nullable=False),  # "" or ";"-joined reasons
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("series_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # one of STAGES
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("recorded_at", _UTC_US, nullable=False),
        # True: storage failed transiently (after the retries); the study is not counted as
        # scored and the next run of the same command scores it. Part files written before the
        # column existed read it as null, which means false (store.read_table fills it).
        pa.field("retryable", pa.bool_(), nullable=False),
    ]
)

_CONDITION_SLUGS = tuple(c.slug for c in CONDITIONS)

# One row per scored study per run: the worklist (lumbar_ray.outputs.worklist says how each
# column is derived from the study's 25 prediction rows and its error rows).
STUDIES_SCHEMA = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", _UTC_US, nullable=False),
        pa.field("priority", pa.float64(), nullable=False),  # expected metric weight, 1..4
        pa.field("any_severe_spinal", pa.float64(), nullable=False),  # max over levels of P(severe), spinal
        # worst graded class over the levels found, spelled as in targets.SEVERITIES; NOT_FOUND if none
        *[pa.field(slug, pa.string(), nullable=False) for slug in _CONDITION_SLUGS],
        pa.field("n_severe", pa.int64(), nullable=False),  # found targets graded Severe
        pa.field("n_detected", pa.int64(), nullable=False),  # targets the detectors found (of 25)
        pa.field("flags", pa.string(), nullable=False),  # "" or ";"-joined review reasons
        pa.field("review", pa.bool_(), nullable=False),  # a reason to look at it before trusting it
    ]
)

# How a series was used: the study's chosen series of its type, another series read beside it
# (a repeat, a second axial series, an untyped plane), or a folder from which nothing was read.
SERIES_ROLES: tuple[str, ...] = ("chosen", "other", "unread")
# One row per series folder (per stack read from it) per run: the series catalog. No patient
# identity and no free text from the headers: ids, geometry, how the type was decided, skips.
SERIES_SCHEMA = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("series_id", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # one of SERIES_ROLES
        pa.field("series_type", pa.string()),  # one of targets.SERIES_TYPES; null: untyped / unread
        pa.field("type_source", pa.string()),  # the rule that decided it (dicom/series_types.py)
        pa.field("plane", pa.string()),  # sagittal | axial | coronal
        pa.field("n_slices", pa.int64(), nullable=False),
        pa.field("n_stacks", pa.int64(), nullable=False),  # slabs (Series.slab_ids): 1 = one plain stack
        pa.field("rows", pa.int64()),
        pa.field("columns", pa.int64()),
        pa.field("row_spacing", pa.float64()),  # PixelSpacing[0], mm
        pa.field("column_spacing", pa.float64()),  # PixelSpacing[1], mm
        pa.field("slice_spacing", pa.float64()),  # median distance between slices, mm
        pa.field("slice_thickness", pa.float64()),  # SliceThickness, mm
        pa.field("n_skipped", pa.int64(), nullable=False),  # files of the folder not used
        pa.field("skipped_reasons", pa.string(), nullable=False),  # "" or ";"-joined "Type: reason (n files)"
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("recorded_at", _UTC_US, nullable=False),
    ]
)

SCHEMAS = {PREDICTIONS: PREDICTIONS_SCHEMA, ERRORS: ERRORS_SCHEMA, STUDIES: STUDIES_SCHEMA, SERIES: SERIES_SCHEMA}
_TIME_COLUMN = {PREDICTIONS: "scored_at", ERRORS: "recorded_at", STUDIES: "scored_at", SERIES: "recorded_at"}
# Columns a table may leave out: the writer fills them (identity, time, derived row id, defaults;
# a nullable column left out is null).
PREDICTIONS_OPTIONAL: tuple[str, ...] = ("row_id", "model_version", "run_id", "scored_at", "flags")
ERRORS_OPTIONAL: tuple[str, ...] = ("series_id", "model_version", "run_id", "recorded_at", "retryable")
STUDIES_OPTIONAL: tuple[str, ...] = ("model_version", "run_id", "scored_at")
SERIES_OPTIONAL: tuple[str, ...] = (
    "model_version", "run_id", "recorded_at",
    *(f.name for f in SERIES_SCHEMA if f.nullable),
)
_OPTIONAL = {PREDICTIONS: PREDICTIONS_OPTIONAL, ERRORS: ERRORS_OPTIONAL, STUDIES: STUDIES_OPTIONAL,
             SERIES: SERIES_OPTIONAL}
_EXAMPLES = 5


class SchemaError(ValueError):
    """A predictions or errors table does not fit its schema (columns, types or values)."""


def format_examples(values: Iterable[Any], quote: bool = True) -> str:
    """The first few ``values`` for an error message (repr'd unless ``quote=False``) and their count."""
    values = list(values)
    shown = ", ".join((repr(v) if quote else str(v)) for v in values[:_EXAMPLES])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _EXAMPLES else "")


def _columns_of(data: pd.DataFrame | pa.Table, kind: str) -> dict[str, pa.ChunkedArray | pa.Array]:
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return {name: data.column(name) for name in data.column_names}
    if isinstance(data, pd.DataFrame):
        if data.columns.duplicated().any():
            raise SchemaError(f"{kind}: duplicate column names {format_examples(data.columns[data.columns.duplicated()])}")
        out = {}
        for name in data.columns:
            series = data[name]
            if name == "flags" and series.dtype == object:
                series = series.map(lambda v: FLAG_SEPARATOR.join(map(str, v)) if isinstance(v, (list, tuple)) else v)
            try:
                out[str(name)] = pa.array(series, from_pandas=True)
            except (pa.ArrowException, TypeError, ValueError) as exc:
                raise SchemaError(f"{kind}: column {name!r} cannot be converted to Arrow: {exc}") from exc
        return out
    raise TypeError(f"{kind}: expected a pandas DataFrame or a pyarrow Table, got {type(data).__name__}")


def _cast(name: str, values, target: pa.DataType, kind: str) -> pa.ChunkedArray:
    if isinstance(values, pa.Array):
        values = pa.chunked_array([values], type=values.type)
    if name == "flags" and (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        values = pc.binary_join(pc.cast(values, pa.list_(pa.string())), FLAG_SEPARATOR)
    if values.type == target:
        return values
    # Timestamps: naive values are taken as UTC; sub-microsecond digits are truncated.
    safe = not pa.types.is_timestamp(target)
    try:
        return pc.cast(values, target, safe=safe)
    except (pa.ArrowException, ValueError) as exc:
        raise SchemaError(f"{kind}: column {name!r} of type {values.type} cannot be cast to {target}: {exc}") from exc


def _build_table(
    data: pd.DataFrame | pa.Table,
    kind: str,
    *,
    model_version: str,
    run_id: str,
    timestamp: datetime,
) -> pa.Table:
    schema = SCHEMAS[kind]
    optional = _OPTIONAL[kind]
    columns = _columns_of(data, kind)
    missing = [f.name for f in schema if f.name not in columns and f.name not in optional]
    unknown = [c for c in columns if c not in schema.names]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if unknown:
            parts.append(f"unknown columns {unknown}")
        raise SchemaError(
            f"{kind}: {'; '.join(parts)}. Expected {schema.names} "
            f"({list(optional)} may be left out: the writer fills them)"
        )
    n = len(next(iter(columns.values()))) if columns else 0
    arrays: dict[str, pa.ChunkedArray] = {}
    for field in schema:
        if field.name in columns:
            arrays[field.name] = _cast(field.name, columns[field.name], field.type, kind)
    identity = {"model_version": model_version, "run_id": run_id}
    for name, expected in identity.items():
        if name in arrays:
            values = set(arrays[name].to_pylist())
            if values != {expected} and n:
                raise SchemaError(f"{kind}: column {name!r} holds {format_examples(sorted(map(str, values)))}, "
                                  f"but this writer writes {name} {expected!r}")
        arrays[name] = pa.chunked_array([pa.array([expected] * n, pa.string())])
    time_col = _TIME_COLUMN[kind]
    if time_col not in arrays:
        arrays[time_col] = pa.chunked_array([pa.array([timestamp] * n, _UTC_US)])
    if kind == PREDICTIONS:
        if "flags" in arrays:
            arrays["flags"] = pc.fill_null(arrays["flags"], "")
        else:
            arrays["flags"] = pa.chunked_array([pa.array([""] * n, pa.string())])
        if "row_id" not in arrays:
            arrays["row_id"] = _expected_row_ids(arrays["study_id"], arrays["condition"], arrays["level"])
    elif kind == ERRORS:
        if "retryable" in arrays:
            arrays["retryable"] = pc.fill_null(arrays["retryable"], False)
        else:
            arrays["retryable"] = pa.chunked_array([pa.array([False] * n, pa.bool_())])
    for field in schema:
        if field.name not in arrays and field.nullable:
            arrays[field.name] = pa.chunked_array([pa.nulls(n, field.type)])
    for field in schema:
        if not field.nullable and arrays[field.name].null_count:
            raise SchemaError(f"{kind}: column {field.name!r} must not be null "
                              f"({arrays[field.name].null_count} null of {n})")
    return pa.Table.from_arrays([arrays[f.name].combine_chunks() for f in schema], schema=schema)


def _expected_row_ids(study_id, condition, level) -> pa.ChunkedArray:
    levels = pc.replace_substring(pc.utf8_lower(level), "/", "_")
    return pc.binary_join_element_wise(study_id, condition, levels, "_")


def _check_predictions(table: pa.Table, require_complete_studies: bool) -> None:
    if table.num_rows == 0:
        return
    frame = table.select(["study_id", "row_id", "condition", "level", *_PROBS, "detected", "confidence",
                          "series_id", "instance_number", "x", "y"]).to_pandas()
    bad = sorted(set(frame["condition"]) - set(_CONDITION_SLUGS))
    if bad:
        raise SchemaError(f"predictions: unknown conditions {format_examples(bad)}; expected slugs {list(_CONDITION_SLUGS)}")
    bad = sorted(set(frame["level"]) - set(LEVELS))
    if bad:
        raise SchemaError(f"predictions: unknown levels {format_examples(bad)}; expected {list(LEVELS)}")
    expected = frame["study_id"] + "_" + frame["condition"] + "_" + frame["level"].map(level_slug)
    wrong = frame["row_id"] != expected
    if wrong.any():
        pairs = [f"{a} (expected {b})" for a, b in zip(frame["row_id"][wrong], expected[wrong])]
        raise SchemaError(f"predictions: row_id does not match study_id/condition/level: {format_examples(pairs, False)}")
    probs = frame[_PROBS].to_numpy(dtype=np.float64)
    bad_rows = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | ~(probs.sum(axis=1) > 0)
    if bad_rows.any():
        raise SchemaError("predictions: probabilities must be finite, >= 0 and not all 0; bad rows "
                          f"{format_examples(frame['row_id'][bad_rows])}")
    detected = frame["detected"].to_numpy(dtype=bool)
    located = frame[["series_id", "instance_number", "x", "y", "confidence"]].notna().all(axis=1).to_numpy()
    if (detected & ~located).any():
        raise SchemaError("predictions: detected rows need series_id, instance_number, x, y and confidence; "
                          f"missing on {format_examples(frame['row_id'][detected & ~located])}")
    has_conf = frame["confidence"].notna().to_numpy()
    if (~detected & has_conf).any():
        raise SchemaError("predictions: confidence must be null when detected is false; set on "
                          f"{format_examples(frame['row_id'][~detected & has_conf])}")
    dup = frame["row_id"].duplicated()
    if dup.any():
        raise SchemaError(f"predictions: duplicate targets {format_examples(frame['row_id'][dup].unique())}")
    if require_complete_studies:
        counts = frame.groupby("study_id", sort=True).size()
        short = counts[counts != len(TARGETS)]
        if len(short):
            desc = [f"{s} ({c} rows)" for s, c in short.items()]
            raise SchemaError(f"predictions: each study needs all {len(TARGETS)} targets in one write "
                              f"(a target without detection still gets a prior row); incomplete: {format_examples(desc, False)}")


def _check_errors(table: pa.Table) -> None:
    stages = set(table.column("stage").to_pylist())
    bad = sorted(stages - set(STAGES))
    if bad:
        raise SchemaError(f"errors: unknown stages {format_examples(bad)}; expected one of {list(STAGES)}")


def utc_now() -> datetime:
    """The time stamped on rows that bring none (timezone-aware, UTC)."""
    return datetime.now(timezone.utc)


def to_predictions_table(
    data: pd.DataFrame | pa.Table,
    *,
    model_version: str,
    run_id: str,
    scored_at: datetime | None = None,
    require_complete_studies: bool = True,
) -> pa.Table:
    """Validate ``data`` and cast it to :data:`PREDICTIONS_SCHEMA` (what a writer stores).

    Every schema column is required except :data:`PREDICTIONS_OPTIONAL`: ``row_id`` (derived
    from study_id/condition/level), ``model_version``/``run_id`` (filled; if present they must
    equal the given ones), ``scored_at`` (now, UTC; naive datetimes are taken as UTC) and
    ``flags`` ("" ; a list of reasons is joined with ";"). Ints are accepted for string ids.
    Refused (:class:`SchemaError`): unknown/missing columns, values that do not cast, nulls in
    non-nullable columns, unknown condition slugs or levels, a row_id that is not
    ``{study_id}_{condition}_{level_slug}``, non-finite/negative/all-zero probabilities, detected
    rows without a location or confidence, undetected rows with a confidence, duplicate targets,
    and (``require_complete_studies``) studies without exactly the 25 targets.
    """
    table = _build_table(data, PREDICTIONS, model_version=model_version, run_id=run_id,
                         timestamp=scored_at or utc_now())
    _check_predictions(table, require_complete_studies)
    return table


def to_errors_table(
    data: pd.DataFrame | pa.Table,
    *,
    model_version: str,
    run_id: str,
    recorded_at: datetime | None = None,
) -> pa.Table:
    """Validate ``data`` and cast it to :data:`ERRORS_SCHEMA`. Optional columns:
    :data:`ERRORS_OPTIONAL` (``series_id`` defaults to null, ``retryable`` to false). ``stage``
    must be one of :data:`STAGES`."""
    table = _build_table(data, ERRORS, model_version=model_version, run_id=run_id,
                         timestamp=recorded_at or utc_now())
    _check_errors(table)
    return table


def _refuse_rows(kind: str, bad: np.ndarray, ids: pd.Series, why: str) -> None:
    if bad.any():
        raise SchemaError(f"{kind}: {why}; bad rows {format_examples(ids[bad])}")


def _check_studies(table: pa.Table) -> None:
    if table.num_rows == 0:
        return
    frame = table.to_pandas()
    ids = frame["study_id"]
    dup = frame.duplicated(["study_id", "model_version", "run_id"]).to_numpy()
    _refuse_rows(STUDIES, dup, ids, "one row per study and run")
    low, high = min(SEVERITY_WEIGHTS), max(SEVERITY_WEIGHTS)
    priority = frame["priority"].to_numpy(dtype=np.float64)
    _refuse_rows(STUDIES, ~((priority >= low - 1e-9) & (priority <= high + 1e-9)), ids,
                 f"priority (an expected severity weight) must lie in [{low}, {high}]")
    severe = frame["any_severe_spinal"].to_numpy(dtype=np.float64)
    _refuse_rows(STUDIES, ~((severe >= 0) & (severe <= 1 + 1e-9)), ids, "any_severe_spinal must lie in [0, 1]")
    for slug in _CONDITION_SLUGS:
        _refuse_rows(STUDIES, ~frame[slug].isin((*SEVERITIES, NOT_FOUND)).to_numpy(), ids,
                     f"{slug} must be one of {[*SEVERITIES, NOT_FOUND]}")
    for count in ("n_severe", "n_detected"):
        values = frame[count].to_numpy()
        _refuse_rows(STUDIES, (values < 0) | (values > len(TARGETS)), ids, f"{count} must lie in 0..{len(TARGETS)}")


def _check_series(table: pa.Table) -> None:
    if table.num_rows == 0:
        return
    frame = table.to_pandas()
    ids = frame["study_id"] + "/" + frame["series_id"]
    _refuse_rows(SERIES, ~frame["role"].isin(SERIES_ROLES).to_numpy(), ids, f"role must be one of {list(SERIES_ROLES)}")
    typed = frame["series_type"].notna().to_numpy()
    _refuse_rows(SERIES, typed & ~frame["series_type"].isin(SERIES_TYPES).to_numpy(), ids,
                 f"series_type must be null or one of {list(SERIES_TYPES)}")
    for count in ("n_slices", "n_stacks", "n_skipped"):
        _refuse_rows(SERIES, frame[count].to_numpy() < 0, ids, f"{count} must be >= 0")
    unread = (frame["role"] == "unread").to_numpy()
    _refuse_rows(SERIES, unread & (frame["n_slices"].to_numpy() != 0), ids, "an unread series has no slices")
    _refuse_rows(SERIES, ~unread & (frame["n_slices"].to_numpy() < 1), ids, "a series read has slices")


def to_studies_table(
    data: pd.DataFrame | pa.Table, *, model_version: str, run_id: str, scored_at: datetime | None = None
) -> pa.Table:
    """Validate ``data`` (worklist rows, :func:`lumbar_ray.outputs.worklist.study_worklist`) and
    cast it to :data:`STUDIES_SCHEMA`. Optional: :data:`STUDIES_OPTIONAL`. Refused: a study twice
    in one run, priority outside the severity weights' range, any_severe_spinal outside [0, 1],
    a worst grade that is neither a severity name nor NOT_FOUND, counts outside 0..25."""
    table = _build_table(data, STUDIES, model_version=model_version, run_id=run_id,
                         timestamp=scored_at or utc_now())
    _check_studies(table)
    return table


def to_series_table(
    data: pd.DataFrame | pa.Table, *, model_version: str, run_id: str, recorded_at: datetime | None = None
) -> pa.Table:
    """Validate ``data`` (series catalog rows, :func:`lumbar_ray.outputs.catalog.series_rows`)
    and cast it to :data:`SERIES_SCHEMA`; nullable columns may be left out. Refused: an unknown
    role or series type, negative counts, an unread series with slices or a read one without."""
    table = _build_table(data, SERIES, model_version=model_version, run_id=run_id,
                         timestamp=recorded_at or utc_now())
    _check_series(table)
    return table
