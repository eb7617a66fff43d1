"""Writing, reading and resuming the scoring outputs: Parquet part files of predictions, errors,
the studies worklist and the series catalog.

Layout under an output root (a local folder or any fsspec URL such as ``s3://bucket/prefix``)::

    {out}/predictions/part-{run_id}-{seq:06d}.parquet   one row per study x target (PREDICTIONS_SCHEMA)
    {out}/errors/part-{run_id}-{seq:06d}.parquet        one row per failure (ERRORS_SCHEMA)
    {out}/studies/part-{run_id}-{seq:06d}.parquet       one row per scored study (STUDIES_SCHEMA)
    {out}/series/part-{run_id}-{seq:06d}.parquet        one row per series read (SERIES_SCHEMA)

(``part-{run_id}-{writer_id}-{seq:06d}.parquet`` when several writers share one run id.)

Each part file is written whole through :func:`lumbar_ray.storage.write_bytes` (temporary file +
``os.replace`` locally, one PUT on object storage), so a killed run leaves complete part files or
none. A writer validates and casts every table to its schema first
(:mod:`lumbar_ray.outputs.schema`), so nothing invalid is ever written.

Resume: :func:`scored_studies` lists the studies a model version has already written (in
predictions, or in errors that are not ``retryable``); a rerun skips them, so a study never
appears twice, and scores again the studies that only storage failures kept from being scored. Reading tolerates
duplicates anyway (a rerun without resume): :func:`select_scores` keeps the latest run of each study.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lumbar_ray import storage
from lumbar_ray.outputs.schema import (
    ERRORS,
    PREDICTIONS,
    SCHEMAS,
    SERIES,
    STUDIES,
    format_examples,
    to_errors_table,
    to_predictions_table,
    to_series_table,
    to_studies_table,
    utc_now,
)
from lumbar_ray.targets import PROBABILITY_COLUMNS, TARGET_COLUMNS, TARGETS, level_slug

log = logging.getLogger(__name__)

__all__ = [
    "OutputWriter",
    "part_paths",
    "part_dataset",
    "read_table",
    "read_predictions",
    "read_errors",
    "scored_studies",
    "select_scores",
    "in_study_order",
    "normalised_probabilities",
]

_PROBS = list(PROBABILITY_COLUMNS)
_TARGET_INDEX = {t.column: t.index for t in TARGETS}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
        self.n_rows = {kind: 0 for kind in SCHEMAS}
        self.closed = False

    def _next_seq(self) -> int:
        pattern = re.compile(rf"part-{re.escape(self._prefix)}-(\d{{6,}})\.parquet")
        last = -1
        for kind in SCHEMAS:
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
        *,
        studies: pd.DataFrame | pa.Table | None = None,
        series: pd.DataFrame | pa.Table | None = None,
    ) -> list[str]:
        """Validate every table given (nothing is written if one is refused), then write one part
        per table of this call, all with the same sequence number. Empty or None tables write
        nothing. Returns the written paths."""
        if self.closed:
            raise RuntimeError("OutputWriter is closed")
        now = utc_now()
        identity = {"model_version": self.model_version, "run_id": self.run_id}
        tables: list[tuple[str, pa.Table]] = []
        # The series catalog and the worklist first: resume goes by predictions and errors only,
        # so if a run dies between the files, these are written again for the studies it scores
        # again (readers keep each study's latest run), rather than missing for studies it skips.
        if not _is_empty(series):
            tables.append((SERIES, to_series_table(series, **identity, recorded_at=now)))
        if not _is_empty(studies):
            tables.append((STUDIES, to_studies_table(studies, **identity, scored_at=now)))
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
            self.n_rows[kind] += table.num_rows
            if kind == PREDICTIONS:
                self.n_predictions += table.num_rows
            elif kind == ERRORS:
                self.n_errors += table.num_rows
            log.debug("wrote %d %s rows to %s", table.num_rows, kind, path)
        self._seq += 1
        self.paths.extend(written)
        return written

    def close(self) -> None:
        """Finish; later writes are refused. (Every part is complete once write returns.)"""
        if not self.closed:
            log.info("run %s (%s): %s rows in %d files under %s", self.run_id, self.model_version,
                     ", ".join(f"{n} {kind}" for kind, n in self.n_rows.items()), len(self.paths), self.out)
        self.closed = True

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in SCHEMAS:
        raise KeyError(f"unknown table {kind!r}; expected one of {list(SCHEMAS)}")


def part_paths(out: str | os.PathLike, kind: str = PREDICTIONS) -> list[str]:
    """The part files of one table, sorted, spelled like ``out`` (URLs keep their protocol)."""
    _check_kind(kind)
    return storage.glob(storage.join(out, kind, "part-*.parquet"))


def part_dataset(out: str | os.PathLike, kind: str) -> ds.Dataset | None:
    """A pyarrow dataset over the part files (None when there are none)."""
    fs, root = storage.filesystem_for(out)
    paths = sorted(storage.retry_transient(fs.glob, f"{root.rstrip('/')}/{kind}/part-*.parquet",
                                           what=f"listing {storage.join(out, kind)}"))
    if not paths:
        return None
    if storage.is_url(os.fspath(out)):
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    else:
        filesystem = pafs.LocalFileSystem()
    return ds.dataset(paths, schema=SCHEMAS[kind], format="parquet", filesystem=filesystem)


def read_table(
    out: str | os.PathLike,
    kind: str = PREDICTIONS,
    model_version: str | None = None,
    *,
    run_id: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """One table as Arrow, optionally filtered; the empty table of the schema when there is none.
    Errors parts written before ``retryable`` existed read it as false. Transient storage
    failures are retried (StorageUnavailableError past the bound)."""
    _check_kind(kind)
    return storage.retry_transient(_read_table, out, kind, model_version, run_id, columns,
                                   what=f"reading {storage.join(out, kind)}")


def _read_table(out, kind: str, model_version: str | None, run_id: str | None, columns: list[str] | None) -> pa.Table:
    schema = SCHEMAS[kind]
    dataset = part_dataset(out, kind)
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
    table = dataset.to_table(columns=columns, filter=flt)
    if "retryable" in table.column_names:  # null in parts older than the column: false
        index = table.column_names.index("retryable")
        table = table.set_column(index, table.schema.field(index), pc.fill_null(table.column(index), False))
    return table


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
    """Study ids that ``model_version`` already has rows for under ``out``: predictions, and
    errors unless ``include_errors=False`` (e.g. to retry studies that failed). A resumed run
    skips them, so no study is written twice. Retryable error rows (storage failed transiently)
    never count: a study that has only those is scored by the next run."""
    table = read_table(out, PREDICTIONS, model_version, columns=["study_id"])
    done: set[str] = set(pc.unique(table.column("study_id")).to_pylist())
    if include_errors:
        errors = read_table(out, ERRORS, model_version, columns=["study_id", "retryable"])
        permanent = errors.filter(pc.invert(errors.column("retryable")))
        done.update(pc.unique(permanent.column("study_id")).to_pylist())
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
        raise ValueError(f"scores from {source}: unknown targets {format_examples(unknown)}")
    frame["target_index"] = frame["column"].map(_TARGET_INDEX).astype(np.int64)
    return in_study_order(_one_run_per_study(frame, source))


def in_study_order(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (study_id as text, target_index) sorted by study (numerically when every id is
    digits, as Kaggle's are) then targets-table order, with a fresh index."""
    order = _study_order(frame["study_id"])
    frame = frame.assign(_study_rank=frame["study_id"].map(order))
    frame = frame.sort_values(["_study_rank", "target_index"], kind="stable").drop(columns="_study_rank")
    return frame.reset_index(drop=True)


def _one_run_per_study(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    dup = frame.duplicated(["study_id", "column"])
    if not dup.any():
        return frame
    if not {"run_id", "scored_at"} <= set(frame.columns):
        raise ValueError(f"scores from {source}: duplicate targets {format_examples(frame.loc[dup, 'study_id'].unique())} "
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
                         f"{format_examples(keep.loc[dup_after, 'study_id'].unique())}")
    return keep


def normalised_probabilities(frame: pd.DataFrame) -> np.ndarray:
    """The probability columns of a :func:`select_scores` frame, each row rescaled to sum 1
    (ValueError naming the rows that are not finite, >= 0 and not all 0)."""
    probs = frame[_PROBS].to_numpy(dtype=np.float64)
    sums = probs.sum(axis=1, keepdims=True)
    bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | ~(sums[:, 0] > 0)
    if bad.any():
        rows = (frame["study_id"].astype(str) + "_" + frame["column"])[bad]
        raise ValueError(f"probabilities must be finite, >= 0 and not all 0; bad rows {format_examples(rows)}")
    return probs / sums
