"""SQL over the scoring outputs: DuckDB views ``predictions``, ``errors``, ``studies`` (the
worklist) and ``series`` (the series catalog) over the part files (one view per table of
:data:`~lumbar_ray.outputs.schema.SCHEMAS`)."""

from __future__ import annotations

import logging
import os

import pandas as pd

from lumbar_ray import storage
from lumbar_ray.outputs.schema import SCHEMAS
from lumbar_ray.outputs.store import part_dataset

log = logging.getLogger(__name__)

__all__ = ["connect", "query"]


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(out: str | os.PathLike):
    """A DuckDB connection with views ``predictions``, ``errors``, ``studies`` and ``series`` over
    the part files under ``out`` as they are now (files written later need a new connection).
    Local parts are read with DuckDB's ``read_parquet``; remote ones (s3://, ...) through pyarrow datasets over the
    fsspec file system (no httpfs needed). With no parts yet the views are empty but typed.
    Session time zone: UTC."""
    import duckdb  # heavy: duckdb; only queries need it, the writers and the CLI start without it

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # pragma: no cover - wheels without ICU
        log.debug("DuckDB has no ICU extension; timestamps are shown in UTC anyway")
    local = not storage.is_url(os.fspath(out))
    for kind, schema in SCHEMAS.items():
        dataset = part_dataset(out, kind)
        if dataset is None:
            con.register(f"_{kind}_empty", schema.empty_table())
            con.execute(f"CREATE VIEW {kind} AS SELECT * FROM _{kind}_empty")
        elif local:
            # By name: parts written before a column existed (errors.retryable) lack it.
            files = ", ".join(_sql_string(p) for p in dataset.files)
            con.execute(f"CREATE VIEW _{kind}_parts AS SELECT * FROM read_parquet([{files}], union_by_name = true)")
            have = {row[0] for row in con.execute(f"DESCRIBE _{kind}_parts").fetchall()}
            fill = "" if kind != "errors" else (" REPLACE (coalesce(retryable, false) AS retryable)" if "retryable" in have
                                                 else ", false AS retryable")
            con.execute(f"CREATE VIEW {kind} AS SELECT *{fill} FROM _{kind}_parts")
        else:
            con.register(f"_{kind}_dataset", dataset)
            con.execute(f"CREATE VIEW {kind} AS SELECT * FROM _{kind}_dataset")
    return con


def query(out: str | os.PathLike, sql: str) -> pd.DataFrame:
    """Run ``sql`` against the views ``predictions``, ``errors``, ``studies`` and ``series`` (see :func:`connect`)."""
    con = connect(out)
    try:
        return con.execute(sql).df()
    finally:
        con.close()
