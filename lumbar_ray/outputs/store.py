"""Scoring outputs: the Parquet predictions and errors tables, resume, Kaggle export, SQL, evaluation.

Layout under an output root (a local folder or any fsspec URL such as ``s3://bucket/prefix``)::

    {out}/predictions/part-{run_id}-{seq:06d}.parquet   one row per study x target (PREDICTIONS_SCHEMA)
    {out}/errors/part-{run_id}-{seq:06d}.parquet        one row per failure (ERRORS_SCHEMA)

(``part-{run_id}-{writer_id}-{seq:06d}.parquet`` when several writers share one run id.)

Each part file is written whole through :func:`lumbar_ray.storage.write_bytes` (temporary file +
``os.replace`` locally, one PUT on object storage), so a killed run leaves complete part files or
none. A writer validates and casts every table to its schema before anything is written: unknown
or missing columns, unknown conditions/levels, inconsistent row ids, bad probabilities, duplicate
targets and (by default) studies without all 25 targets are refused with a clear message.

Resume: :func:`scored_studies` lists the studies a model version has already written (in
predictions or errors); a rerun skips them, so a study never appears twice. Reading tolerates
duplicates anyway (a rerun without resume): :func:`select_scores` keeps the latest run of each study.

Nothing here imports Ray; all I/O goes through :mod:`lumbar_ray.storage`.
"""

from __future__ import annotations

import io
import logging
import os
import re
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lumbar_ray import storage
from lumbar_ray.metrics import rsna as metrics
from lumbar_ray.targets import (
    CONDITIONS,
    LEVELS,
    PROBABILITY_COLUMNS,
    TARGET_BY_COLUMN,
    TARGET_COLUMNS,
    TARGETS,
    level_slug,
)

log = logging.getLogger(__name__)

__all__ = [
    "PREDICTIONS",
    "ERRORS",
    "STAGES",
    "PREDICTIONS_SCHEMA",
    "ERRORS_SCHEMA",
    "KAGGLE_COLUMNS",
    "SchemaError",
    "OutputWriter",
    "to_predictions_table",
    "to_errors_table",
    "part_paths",
    "read_table",
    "read_predictions",
    "read_errors",
    "scored_studies",
    "select_scores",
    "export_kaggle",
    "connect",
    "query",
    "evaluate_scores",
]

PREDICTIONS = "predictions"
ERRORS = "errors"
STAGES: tuple[str, ...] = ("list", "read", "detect", "score", "write")
_PROBS = list(PROBABILITY_COLUMNS)
_UTC_US = pa.timestamp("us", tz="UTC")
KAGGLE_COLUMNS: tuple[str, ...] = ("row_id", *PROBABILITY_COLUMNS)
FLAG_SEPARATOR = ";"

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
    ]
)

_SCHEMAS = {PREDICTIONS: PREDICTIONS_SCHEMA, ERRORS: ERRORS_SCHEMA}
_TIME_COLUMN = {PREDICTIONS: "scored_at", ERRORS: "recorded_at"}
# Columns a table may leave out: the writer fills them (identity, time, derived row id, defaults).
PREDICTIONS_OPTIONAL: tuple[str, ...] = ("row_id", "model_version", "run_id", "scored_at", "flags")
ERRORS_OPTIONAL: tuple[str, ...] = ("series_id", "model_version", "run_id", "recorded_at")

_CONDITION_SLUGS = tuple(c.slug for c in CONDITIONS)
_TARGET_INDEX = {t.column: t.index for t in TARGETS}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXAMPLES = 5


class SchemaError(ValueError):
    """A predictions or errors table does not fit its schema (columns, types or values)."""


# --------------------------------------------------------------------------------------------
# Validation and casting
# --------------------------------------------------------------------------------------------


def _examples(values: Iterable[Any], quote: bool = True) -> str:
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
            raise SchemaError(f"{kind}: duplicate column names {_examples(data.columns[data.columns.duplicated()])}")
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
    schema = _SCHEMAS[kind]
    optional = PREDICTIONS_OPTIONAL if kind == PREDICTIONS else ERRORS_OPTIONAL
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
                raise SchemaError(f"{kind}: column {name!r} holds {_examples(sorted(map(str, values)))}, "
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
    else:
        if "series_id" not in arrays:
            arrays["series_id"] = pa.chunked_array([pa.nulls(n, pa.string())])
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
        raise SchemaError(f"predictions: unknown conditions {_examples(bad)}; expected slugs {list(_CONDITION_SLUGS)}")
    bad = sorted(set(frame["level"]) - set(LEVELS))
    if bad:
        raise SchemaError(f"predictions: unknown levels {_examples(bad)}; expected {list(LEVELS)}")
    expected = frame["study_id"] + "_" + frame["condition"] + "_" + frame["level"].map(level_slug)
    wrong = frame["row_id"] != expected
    if wrong.any():
        pairs = [f"{a} (expected {b})" for a, b in zip(frame["row_id"][wrong], expected[wrong])]
        raise SchemaError(f"predictions: row_id does not match study_id/condition/level: {_examples(pairs, False)}")
    probs = frame[_PROBS].to_numpy(dtype=np.float64)
    bad_rows = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | ~(probs.sum(axis=1) > 0)
    if bad_rows.any():
        raise SchemaError("predictions: probabilities must be finite, >= 0 and not all 0; bad rows "
                          f"{_examples(frame['row_id'][bad_rows])}")
    detected = frame["detected"].to_numpy(dtype=bool)
    located = frame[["series_id", "instance_number", "x", "y", "confidence"]].notna().all(axis=1).to_numpy()
    if (detected & ~located).any():
        raise SchemaError("predictions: detected rows need series_id, instance_number, x, y and confidence; "
                          f"missing on {_examples(frame['row_id'][detected & ~located])}")
    has_conf = frame["confidence"].notna().to_numpy()
    if (~detected & has_conf).any():
        raise SchemaError("predictions: confidence must be null when detected is false; set on "
                          f"{_examples(frame['row_id'][~detected & has_conf])}")
    dup = frame["row_id"].duplicated()
    if dup.any():
        raise SchemaError(f"predictions: duplicate targets {_examples(frame['row_id'][dup].unique())}")
    if require_complete_studies:
        counts = frame.groupby("study_id", sort=True).size()
        short = counts[counts != len(TARGETS)]
        if len(short):
            desc = [f"{s} ({c} rows)" for s, c in short.items()]
            raise SchemaError(f"predictions: each study needs all {len(TARGETS)} targets in one write "
                              f"(a target without detection still gets a prior row); incomplete: {_examples(desc, False)}")


def _check_errors(table: pa.Table) -> None:
    stages = set(table.column("stage").to_pylist())
    bad = sorted(stages - set(STAGES))
    if bad:
        raise SchemaError(f"errors: unknown stages {_examples(bad)}; expected one of {list(STAGES)}")


def _now() -> datetime:
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
                         timestamp=scored_at or _now())
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
    :data:`ERRORS_OPTIONAL` (``series_id`` defaults to null). ``stage`` must be one of
    :data:`STAGES`."""
    table = _build_table(data, ERRORS, model_version=model_version, run_id=run_id,
                         timestamp=recorded_at or _now())
    _check_errors(table)
    return table


def _is_empty(data) -> bool:
    if data is None:
        return True
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        return data.num_rows == 0
    if isinstance(data, pd.DataFrame):
        return len(data) == 0
    raise TypeError(f"expected a pandas DataFrame, a pyarrow Table or None, got {type(data).__name__}")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '.', '_' or '-' (it is part of file names)")
    return value


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class OutputWriter:
    """Append scoring results under ``out`` as Parquet part files, one per non-empty table per
    :meth:`write` call, each written atomically.

    ``run_id`` and ``writer_id`` become part of the file names, so they are restricted to
    letters, digits, ``.``, ``_`` and ``-``. Several writers (e.g. Ray actors) of one run need
    distinct ``writer_id`` values: file names then read ``part-{run_id}-{writer_id}-{seq}``.
    A new writer continues the sequence numbers already on storage for its prefix, so
    reopening a run never overwrites a part file.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        run_id: str,
        model_version: str,
        *,
        writer_id: str | None = None,
        require_complete_studies: bool = True,
    ):
        self.out = os.fspath(out)
        self.run_id = _check_name("run_id", run_id)
        if not isinstance(model_version, str) or not model_version:
            raise ValueError("model_version must be a non-empty string")
        self.model_version = model_version
        self.writer_id = None if writer_id is None else _check_name("writer_id", writer_id)
        self.require_complete_studies = require_complete_studies
        self._prefix = run_id if writer_id is None else f"{run_id}-{writer_id}"
        self._seq = self._next_seq()
        self.paths: list[str] = []
        self.n_predictions = 0
        self.n_errors = 0
        self.closed = False

    def _next_seq(self) -> int:
        pattern = re.compile(rf"part-{re.escape(self._prefix)}-(\d{{6,}})\.parquet")
        last = -1
        for kind in (PREDICTIONS, ERRORS):
            for path in storage.glob(storage.join(self.out, kind, f"part-{self._prefix}-*.parquet")):
                m = pattern.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
                if m:
                    last = max(last, int(m.group(1)))
        return last + 1

    def part_path(self, kind: str, seq: int) -> str:
        return storage.join(self.out, kind, f"part-{self._prefix}-{seq:06d}.parquet")

    def write(
        self,
        predictions: pd.DataFrame | pa.Table | None = None,
        errors: pd.DataFrame | pa.Table | None = None,
    ) -> list[str]:
        """Validate both tables (nothing is written if either is refused), then write the
        predictions part and the errors part of this call. Empty or None tables write nothing.
        Returns the written paths."""
        if self.closed:
            raise RuntimeError("OutputWriter is closed")
        now = _now()
        tables: list[tuple[str, pa.Table]] = []
        # Predictions first: if a run dies between the two files, the predictions (whose flags
        # name partial failures) survive rather than an error list that would make resume skip
        # the study without its predictions.
        if not _is_empty(predictions):
            tables.append((PREDICTIONS, to_predictions_table(
                predictions, model_version=self.model_version, run_id=self.run_id, scored_at=now,
                require_complete_studies=self.require_complete_studies)))
        if not _is_empty(errors):
            tables.append((ERRORS, to_errors_table(
                errors, model_version=self.model_version, run_id=self.run_id, recorded_at=now)))
        if not tables:
            return []
        written = []
        for kind, table in tables:
            path = self.part_path(kind, self._seq)
            storage.write_bytes(path, _parquet_bytes(table))
            written.append(path)
            if kind == PREDICTIONS:
                self.n_predictions += table.num_rows
            else:
                self.n_errors += table.num_rows
            log.debug("wrote %d %s rows to %s", table.num_rows, kind, path)
        self._seq += 1
        self.paths.extend(written)
        return written

    def close(self) -> None:
        """Finish; later writes are refused. (Every part is complete once write returns.)"""
        if not self.closed:
            log.info("run %s (%s): %d prediction rows, %d error rows in %d files under %s",
                     self.run_id, self.model_version, self.n_predictions, self.n_errors, len(self.paths), self.out)
        self.closed = True

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in _SCHEMAS:
        raise KeyError(f"unknown table {kind!r}; expected {PREDICTIONS!r} or {ERRORS!r}")


def part_paths(out: str | os.PathLike, kind: str = PREDICTIONS) -> list[str]:
    """The part files of one table, sorted, spelled like ``out`` (URLs keep their protocol)."""
    _check_kind(kind)
    return storage.glob(storage.join(out, kind, "part-*.parquet"))


def _dataset(out: str | os.PathLike, kind: str):
    """A pyarrow dataset over the part files (None when there are none)."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    fs, root = storage.filesystem_for(out)
    paths = sorted(fs.glob(f"{root.rstrip('/')}/{kind}/part-*.parquet"))
    if not paths:
        return None
    if storage.is_url(os.fspath(out)):
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    else:
        filesystem = pafs.LocalFileSystem()
    return ds.dataset(paths, schema=_SCHEMAS[kind], format="parquet", filesystem=filesystem)


def read_table(
    out: str | os.PathLike,
    kind: str = PREDICTIONS,
    model_version: str | None = None,
    *,
    run_id: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """One table as Arrow, optionally filtered; the empty table of the schema when there is none."""
    import pyarrow.dataset as ds

    _check_kind(kind)
    schema = _SCHEMAS[kind]
    dataset = _dataset(out, kind)
    if dataset is None:
        table = schema.empty_table()
        return table.select(columns) if columns else table
    conditions = []
    if model_version is not None:
        conditions.append(ds.field("model_version") == model_version)
    if run_id is not None:
        conditions.append(ds.field("run_id") == run_id)
    flt = None
    for cond in conditions:
        flt = cond if flt is None else flt & cond
    return dataset.to_table(columns=columns, filter=flt)


def read_predictions(
    out: str | os.PathLike, model_version: str | None = None, *, run_id: str | None = None
) -> pd.DataFrame:
    """All prediction rows (of one model version / run if given), as stored; duplicates from
    reruns are kept (see :func:`select_scores`). Missing folder -> empty frame with the columns."""
    return read_table(out, PREDICTIONS, model_version, run_id=run_id).to_pandas()


def read_errors(
    out: str | os.PathLike, model_version: str | None = None, *, run_id: str | None = None
) -> pd.DataFrame:
    """All error rows (of one model version / run if given); empty frame with the columns if none."""
    return read_table(out, ERRORS, model_version, run_id=run_id).to_pandas()


def scored_studies(out: str | os.PathLike, model_version: str, *, include_errors: bool = True) -> set[str]:
    """Study ids that ``model_version`` already has rows for under ``out`` (predictions, and
    errors unless ``include_errors=False``, e.g. to retry studies that failed). A resumed run
    skips them, so no study is written twice."""
    done: set[str] = set()
    kinds = (PREDICTIONS, ERRORS) if include_errors else (PREDICTIONS,)
    for kind in kinds:
        table = read_table(out, kind, model_version, columns=["study_id"])
        done.update(pc.unique(table.column("study_id")).to_pylist())
    return done


# --------------------------------------------------------------------------------------------
# Selecting one model version's scores
# --------------------------------------------------------------------------------------------


def _study_order(study_ids: Iterable[str]) -> dict[str, int]:
    """Rank of each study id: numeric order when all ids are digits (Kaggle's), else text order."""
    ids = sorted(set(study_ids))
    if all(s.isdigit() for s in ids):
        ids = sorted(ids, key=int)
    return {s: i for i, s in enumerate(ids)}


def _versions_message(versions: list[str]) -> str:
    return ", ".join(repr(v) for v in versions)


def select_scores(
    scores: str | os.PathLike | pd.DataFrame | pa.Table, model_version: str | None = None
) -> pd.DataFrame:
    """The predictions of one model version, one run per study, sorted by study then targets-table
    order, with ``column`` (the train.csv target column) and ``target_index`` added.

    ``scores``: an output root (read with :func:`read_predictions`) or a predictions frame/table
    (needs study_id, the probability columns, and condition + level or row_id).
    Several model versions and no ``model_version`` -> ValueError listing them. Duplicate targets
    of a study (a rerun without resume) keep the study's latest run (by scored_at), with a
    warning; without run_id/scored_at columns duplicates are refused.
    """
    if isinstance(scores, (str, os.PathLike)):
        frame = read_predictions(scores)
        source = os.fspath(scores)
    elif isinstance(scores, pa.Table):
        frame, source = scores.to_pandas(), "the given table"
    elif isinstance(scores, pd.DataFrame):
        frame, source = scores.copy(), "the given frame"
    else:
        raise TypeError(f"scores must be an output root, a DataFrame or a pyarrow Table, not {type(scores).__name__}")
    missing = [c for c in ("study_id", *_PROBS) if c not in frame.columns]
    if missing or not ({"condition", "level"} <= set(frame.columns) or "row_id" in frame.columns):
        raise ValueError(f"scores from {source} need study_id, {_PROBS} and condition + level (or row_id); "
                         f"columns are {list(frame.columns)}")
    if "model_version" in frame.columns:
        versions = sorted(map(str, frame["model_version"].dropna().unique()))
        if model_version is not None:
            if model_version not in versions:
                raise ValueError(f"no predictions of model version {model_version!r} in {source}; "
                                 f"versions present: {_versions_message(versions) or 'none'}")
            frame = frame[frame["model_version"] == model_version]
        elif len(versions) > 1:
            raise ValueError(f"{source} holds predictions of {len(versions)} model versions "
                             f"({_versions_message(versions)}); pass model_version= to choose one")
    elif model_version is not None:
        raise ValueError(f"scores from {source} have no model_version column to select {model_version!r} by")
    frame = frame.copy()
    frame["study_id"] = frame["study_id"].astype(str)
    if {"condition", "level"} <= set(frame.columns):
        frame["column"] = frame["condition"].astype(str) + "_" + frame["level"].astype(str).map(level_slug)
    else:
        prefix_len = frame["study_id"].str.len() + 1
        frame["column"] = [r[n:] for r, n in zip(frame["row_id"].astype(str), prefix_len)]
    unknown = sorted(set(frame["column"]) - set(TARGET_COLUMNS))
    if unknown:
        raise ValueError(f"scores from {source}: unknown targets {_examples(unknown)}")
    frame["target_index"] = frame["column"].map(_TARGET_INDEX).astype(np.int64)
    frame = _one_run_per_study(frame, source)
    order = _study_order(frame["study_id"])
    frame = frame.assign(_study_rank=frame["study_id"].map(order))
    frame = frame.sort_values(["_study_rank", "target_index"], kind="stable").drop(columns="_study_rank")
    return frame.reset_index(drop=True)


def _one_run_per_study(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    dup = frame.duplicated(["study_id", "column"])
    if not dup.any():
        return frame
    if not {"run_id", "scored_at"} <= set(frame.columns):
        raise ValueError(f"scores from {source}: duplicate targets {_examples(frame.loc[dup, 'study_id'].unique())} "
                         "and no run_id/scored_at to choose the latest run by")
    runs = frame.groupby(["study_id", "run_id"], sort=False)["scored_at"].max().reset_index()
    latest = runs.sort_values(["scored_at", "run_id"]).drop_duplicates("study_id", keep="last")
    keep = frame.merge(latest[["study_id", "run_id"]], on=["study_id", "run_id"], how="inner")
    n_dup = int(frame.loc[dup, "study_id"].nunique())
    log.warning("%s: %d studies were scored by several runs of one model version; keeping each study's latest run",
                source, n_dup)
    dup_after = keep.duplicated(["study_id", "column"])
    if dup_after.any():
        raise ValueError(f"scores from {source}: duplicate targets within one run for studies "
                         f"{_examples(keep.loc[dup_after, 'study_id'].unique())}")
    return keep


def _normalised(frame: pd.DataFrame) -> np.ndarray:
    probs = frame[_PROBS].to_numpy(dtype=np.float64)
    sums = probs.sum(axis=1, keepdims=True)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | ~(sums[:, 0] > 0)
    if bad.any():
        rows = (frame["study_id"].astype(str) + "_" + frame["column"])[bad]
        raise ValueError(f"probabilities must be finite, >= 0 and not all 0; bad rows {_examples(rows)}")
    return probs / sums


# --------------------------------------------------------------------------------------------
# Kaggle export
# --------------------------------------------------------------------------------------------


def export_kaggle(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    to_csv: str | os.PathLike,
    model_version: str | None = None,
    *,
    studies: Iterable[str | int] | None = None,
) -> pd.DataFrame:
    """Write the exact Kaggle submission ``row_id,normal_mild,moderate,severe`` to ``to_csv``
    (local path or URL, written atomically) and return it.

    25 rows per study, sorted by study id (numerically for Kaggle's digit ids) then the targets
    table's order; probabilities renormalised to sum 1. ``studies``: the studies that must be
    there (e.g. from ``test_series_descriptions.csv``); only those are written and any missing one
    is an error. Refused (ValueError): several model versions and no ``model_version``; a study
    with fewer than 25 targets (named); no predictions at all.
    """
    frame = select_scores(scores, model_version)
    if studies is not None:
        wanted = [str(s) for s in studies]
        absent = sorted(set(wanted) - set(frame["study_id"]), key=lambda s: (len(s), s))
        if absent:
            raise ValueError(f"no predictions for {len(absent)} requested studies: {_examples(absent)}")
        frame = frame[frame["study_id"].isin(set(wanted))]
    if frame.empty:
        raise ValueError("no predictions to export")
    counts = frame.groupby("study_id", sort=False).size()
    short = counts[counts < len(TARGETS)]
    if len(short):
        first = short.index[0]
        lacking = [c for c in TARGET_COLUMNS if c not in set(frame.loc[frame["study_id"] == first, "column"])]
        desc = [f"{s} ({c} of {len(TARGETS)} rows)" for s, c in short.items()]
        raise ValueError(f"incomplete studies: {_examples(desc, False)}; study {first} lacks {_examples(lacking)}")
    probs = _normalised(frame)
    row_ids = [TARGET_BY_COLUMN[c].row_id(s) for s, c in zip(frame["study_id"], frame["column"])]
    submission = pd.DataFrame({"row_id": row_ids})
    for i, name in enumerate(_PROBS):
        submission[name] = probs[:, i]
    text = submission.to_csv(index=False, lineterminator="\n")
    storage.write_bytes(to_csv, text.encode("utf-8"))
    log.info("wrote %d rows (%d studies) to %s", len(submission), len(counts), os.fspath(to_csv))
    return submission


# --------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(out: str | os.PathLike):
    """A DuckDB connection with views ``predictions`` and ``errors`` over the part files under
    ``out`` as they are now (files written later need a new connection). Local parts are read
    with DuckDB's ``read_parquet``; remote ones (s3://, ...) through pyarrow datasets over the
    fsspec file system (no httpfs needed). With no parts yet the views are empty but typed.
    Session time zone: UTC."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # pragma: no cover - wheels without ICU
        log.debug("DuckDB has no ICU extension; timestamps are shown in UTC anyway")
    local = not storage.is_url(os.fspath(out))
    for kind, schema in _SCHEMAS.items():
        dataset = _dataset(out, kind)
        if dataset is None:
            con.register(f"_{kind}_empty", schema.empty_table())
            con.execute(f"CREATE VIEW {kind} AS SELECT * FROM _{kind}_empty")
        elif local:
            files = ", ".join(_sql_string(p) for p in dataset.files)
            con.execute(f"CREATE VIEW {kind} AS SELECT * FROM read_parquet([{files}])")
        else:
            con.register(f"_{kind}_dataset", dataset)
            con.execute(f"CREATE VIEW {kind} AS SELECT * FROM _{kind}_dataset")
    return con


def query(out: str | os.PathLike, sql: str) -> pd.DataFrame:
    """Run ``sql`` against the views ``predictions`` and ``errors`` (see :func:`connect`)."""
    con = connect(out)
    try:
        return con.execute(sql).df()
    finally:
        con.close()


# --------------------------------------------------------------------------------------------
# Evaluation against train.csv labels
# --------------------------------------------------------------------------------------------


def _read_wide_labels(labels: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if isinstance(labels, pd.DataFrame):
        return labels, "the given labels"
    text = os.fspath(labels)
    path = text if text.lower().endswith((".csv", ".csv.gz")) else storage.join(text, "train.csv")
    return storage.read_csv(path), path


def evaluate_scores(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    labels_csv_or_root: str | os.PathLike | pd.DataFrame,
    model_version: str | None = None,
) -> tuple[pd.DataFrame, str]:
    """Score predictions against ``train.csv`` labels: the competition metric next to accuracy,
    balanced accuracy and per-class recall, for the model and two baselines.

    ``labels_csv_or_root``: a ``train.csv`` path (``.csv``/``.csv.gz``), a data root holding
    ``train.csv``, or the wide frame itself. Predictions are renormalised as in the Kaggle export
    and joined to the labels on (study, target); scored studies without labels are ignored (and
    counted in the text); missing labels (-1) are left out by the metric as on Kaggle.

    Baselines: ``majority`` and ``prior`` (:func:`lumbar_ray.metrics.rsna.majority_baseline` /
    :func:`~lumbar_ray.metrics.rsna.prior_baseline`) are fitted on the labels of the *evaluated
    studies themselves* — in-sample, so they see the answers and are favoured: a model that beats
    them here beats any honest constant predictor.

    Returns (:func:`lumbar_ray.metrics.rsna.metric_table` frame with model rows named after the model
    version, text = a header plus :func:`~lumbar_ray.metrics.rsna.format_metric_table`).
    """
    frame = select_scores(scores, model_version)
    if frame.empty:
        raise ValueError("no predictions to evaluate")
    version = model_version
    if version is None and "model_version" in frame.columns and frame["model_version"].nunique() == 1:
        version = str(frame["model_version"].iloc[0])
    wide, source = _read_wide_labels(labels_csv_or_root)
    long = metrics.long_labels(wide)
    long["study_id"] = long["study_id"].astype(str)
    probs = _normalised(frame)
    predicted = pd.DataFrame({"study_id": frame["study_id"].to_numpy(), "column": frame["column"].to_numpy()})
    predicted[_PROBS] = probs
    model_frame = predicted.merge(long, on=["study_id", "column"], how="inner")[metrics.PREDICTION_COLUMNS]
    scored = set(frame["study_id"])
    evaluated = set(model_frame["study_id"])
    unlabelled = scored - evaluated
    if not evaluated:
        raise ValueError(f"none of the {len(scored)} scored studies has labels in {source}")
    fit_on = long[long["study_id"].isin(evaluated)]
    rows = model_frame[metrics.LABEL_COLUMNS]
    name = version or "model"
    table = metrics.metric_table({
        name: model_frame,
        "majority": rows.join(metrics.majority_baseline(fit_on)[_PROBS], on="column"),
        "prior": rows.join(metrics.prior_baseline(fit_on)[_PROBS], on="column"),
    })
    n_labelled_rows = int((model_frame["label"] >= 0).sum())
    header = [
        f"model version: {name}",
        f"labels: {source}",
        f"studies: {len(scored)} scored, {len(evaluated)} evaluated, {len(unlabelled)} without labels (ignored)",
        f"rows: {len(model_frame)} joined, {n_labelled_rows} labelled",
        "baselines majority/prior are fitted in-sample on the evaluated studies' labels (favours the baselines)",
        "rsna_log_loss: lower is better; group 'all' is the competition score",
    ]
    text = "\n".join(header) + "\n\n" + metrics.format_metric_table(table)
    return table, text
