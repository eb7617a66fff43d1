"""Per-study overlays for radiologists: where each target was found and how it was graded.

:func:`write_study_report` draws one PNG per series of the study (Sagittal T1, Sagittal T2/STIR,
Axial T2): one panel per chosen instance (slice) with a marker at each detected target's (x, y)
and a label such as ``L4/L5 Severe 0.81`` (``L4/L5 L Severe 0.81`` for left/right conditions),
coloured by the predicted grade (green Normal/Mild, orange Moderate, red Severe); a side note
lists every target read on that series with its probabilities, the undetected ones under
"no detection: prior used", and the study's flags.

Matplotlib's Agg canvas through the object-oriented API only (no pyplot state), so it is safe in
worker processes. Slices come from :func:`lumbar_ray.dicom.read.read_study`; files are written
through :mod:`lumbar_ray.storage` (local folders or URLs).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from lumbar_ray import storage
from lumbar_ray.dicom.read import read_study
from lumbar_ray.outputs.store import select_scores
from lumbar_ray.targets import PROBABILITY_COLUMNS, SERIES_TYPES, SEVERITIES, TARGET_BY_COLUMN, series_slug

log = logging.getLogger(__name__)

__all__ = ["GRADE_COLOURS", "write_study_report", "report_path"]

# By severity id (0 Normal/Mild, 1 Moderate, 2 Severe).
GRADE_COLOURS: tuple[str, ...] = ("#2ca02c", "#ff7f0e", "#d62728")
_PROBS = list(PROBABILITY_COLUMNS)
_SIDE = {"left": "L", "right": "R", None: ""}
_MAX_COLS = 3


def report_path(to_dir: str | os.PathLike, study_id: str, series_type: str) -> str:
    """``{to_dir}/{study_id}_{series_slug}.png``."""
    return storage.join(to_dir, f"{study_id}_{series_slug(series_type)}.png")


def _label(row: pd.Series) -> str:
    target = TARGET_BY_COLUMN[row["column"]]
    grade = int(row["grade"])
    side = _SIDE[target.side]
    return f"{target.level}{' ' + side if side else ''} {SEVERITIES[grade]} {row['p_grade']:.2f}"


def _short_name(column: str) -> str:
    target = TARGET_BY_COLUMN[column]
    side = _SIDE[target.side]
    family = {"spinal": "canal", "foraminal": "foramen", "subarticular": "subart."}[target.family]
    return f"{target.level} {side + ' ' if side else ''}{family}"


def _label_offset(row: pd.Series, n_cols: int) -> tuple[float, float, str, str]:
    """Where a label goes relative to its marker (points): towards the image centre
    horizontally, so it stays on the slice; right-side targets above the marker and left-side
    ones below, so a level's left and right labels on one axial slice do not overlap."""
    side = TARGET_BY_COLUMN[row["column"]].side
    dy, va = (-9.0, "top") if side == "left" else (7.0, "bottom")
    if float(row["x"]) > 0.5 * n_cols:
        return -9.0, dy, "right", va
    return 9.0, dy, "left", va


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _series_by_id(study) -> dict[str, Any]:
    every = list(study.series.values()) + list(getattr(study, "other_series", []) or [])
    return {str(s.series_id): s for s in every}


def _panels(rows: pd.DataFrame, default_series, by_id: dict[str, Any]) -> tuple[list, list[str]]:
    """[(series, slice index, instance number, rows drawn there)], notes on targets not drawable."""
    panels: dict[tuple[str, int], list] = {}
    notes: list[str] = []
    for _, row in rows[rows["detected"]].iterrows():
        series = by_id.get(str(row["series_id"]), default_series) if pd.notna(row["series_id"]) else default_series
        if pd.isna(row["instance_number"]) or pd.isna(row["x"]) or pd.isna(row["y"]):
            notes.append(f"{_short_name(row['column'])}: detected without a location")
            continue
        instance = int(row["instance_number"])
        matches = np.flatnonzero(np.asarray(series.instance_numbers) == instance)
        if matches.size == 0:
            notes.append(f"{_short_name(row['column'])}: instance {instance} not in series {series.series_id}")
            continue
        key = (str(series.series_id), instance)
        if key not in panels:
            panels[key] = [series, int(matches[0]), instance, []]
        panels[key][3].append(row)
    ordered = sorted(panels.values(), key=lambda p: (str(p[0].series_id), p[1]))
    return ordered, notes


def _draw_panel(ax, series, k: int, instance: int, hits: list) -> None:
    """One slice in grey with a marker and a grade label at each detected target on it."""
    image = np.asarray(series.volume[k], dtype=np.float32)
    vmin, vmax = _window(image)
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(f"instance {instance}" + ("" if hits else " (no detections)"), fontsize=9)
    ax.set_axis_off()
    for row in hits:
        colour = GRADE_COLOURS[int(row["grade"])]
        ax.plot([row["x"]], [row["y"]], marker="o", markersize=11, markerfacecolor="none",
                markeredgecolor=colour, markeredgewidth=2.0, linestyle="none")
        ax.plot([row["x"]], [row["y"]], marker="+", markersize=6, color=colour, linestyle="none")
        dx, dy, ha, va = _label_offset(row, image.shape[1])
        ax.annotate(_label(row), (row["x"], row["y"]), xytext=(dx, dy), textcoords="offset points",
                    ha=ha, va=va, color="white", fontsize=7.5, fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.2", "facecolor": colour, "alpha": 0.85, "linewidth": 0})


def _side_note(rows: pd.DataFrame, header: list[str], notes: list[str], flags: list[str]) -> list[tuple[str, str]]:
    """The (text, colour) lines beside the slices: header, each target's probabilities and grade,
    the undetected targets (prior used), targets that could not be drawn, and the study's flags."""
    lines: list[tuple[str, str]] = [(h, "black") for h in header]
    lines.append(("", "black"))
    lines.append(("grade  N/M   Mod   Sev", "black"))
    detected = rows[rows["detected"]]
    undetected = rows[~rows["detected"]]
    for _, row in detected.iterrows():
        probs = " ".join(f"{row[p]:.2f}" for p in _PROBS)
        lines.append((f"{_short_name(row['column'])}: {probs}  {SEVERITIES[int(row['grade'])]}",
                      GRADE_COLOURS[int(row["grade"])]))
    if len(undetected):
        lines.append(("", "black"))
        lines.append(("no detection: prior used", "black"))
        for _, row in undetected.iterrows():
            probs = " ".join(f"{row[p]:.2f}" for p in _PROBS)
            lines.append((f"  {_short_name(row['column'])}: {probs}", "dimgray"))
    if notes:
        lines.append(("", "black"))
        lines.append(("not drawn:", "black"))
        lines.extend((f"  {note}", "dimgray") for note in notes)
    if flags:
        lines.append(("", "black"))
        lines.append(("flags:", "black"))
        lines.extend((f"  {flag}", "dimgray") for flag in flags)
    return lines


# Matplotlib is not thread-safe: the HTML report reads several studies at once
# (outputs/parallel.py) but draws one figure at a time (drawing holds the GIL anyway).
_DRAW_LOCK = threading.Lock()


def _draw_series(study_id: str, series_type: str, series, rows: pd.DataFrame, by_id: dict[str, Any],
                 header: list[str], flags: list[str]) -> bytes:
    # heavy: matplotlib; imported only when a report is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels, notes = _panels(rows, series, by_id)
    n = max(len(panels), 1)
    ncols = min(n, _MAX_COLS)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.8 * ncols + 4.2, 3.9 * nrows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows, ncols + 1, width_ratios=[1.0] * ncols + [1.15])
    fig.suptitle(f"study {study_id} - {series_type} (series {series.series_id})", fontsize=11)

    if not panels:  # nothing detected on this series: show its middle slice
        k = len(series.instance_numbers) // 2
        panels = [(series, k, int(np.asarray(series.instance_numbers)[k]), [])]
    for i, (ser, k, instance, hits) in enumerate(panels):
        _draw_panel(fig.add_subplot(grid[i // ncols, i % ncols]), ser, k, instance, hits)

    side = fig.add_subplot(grid[:, ncols])
    side.set_axis_off()
    lines = _side_note(rows, header, notes, flags)
    step = min(0.035, 0.98 / max(len(lines), 1))
    for j, (text, colour) in enumerate(lines):
        side.text(0.0, 1.0 - j * step, text, transform=side.transAxes, va="top", ha="left",
                  family="monospace", fontsize=7.5, color=colour)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def graded_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``rows`` with the probabilities rescaled to sum 1, the grade (their argmax) and
    its probability ``p_grade``: what the overlays draw and the HTML review lists."""
    rows = rows.copy()
    probs = rows[_PROBS].to_numpy(dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    rows[_PROBS] = probs
    rows["grade"] = probs.argmax(axis=1)
    rows["p_grade"] = probs.max(axis=1)
    return rows


def write_study_report(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    data_root: str | os.PathLike,
    study_id: str | int,
    to_dir: str | os.PathLike,
    split: str = "test",
    model_version: str | None = None,
) -> list[str]:
    """Write one PNG per series of ``study_id`` that the reader finds (Sagittal T1, Sagittal
    T2/STIR, Axial T2, in that order) to ``to_dir`` as ``{study_id}_{series_slug}.png``; return
    the paths.

    ``scores``: an output root or a predictions frame/table (as :func:`lumbar_ray.outputs.store.
    select_scores`; several model versions need ``model_version``). Each detected target is drawn
    on its chosen instance (by InstanceNumber; a series_id naming another series of the study is
    honoured), graded by the argmax of its normalised probabilities. A series with no detection
    shows its middle slice. ValueError when the scores hold no row for the study.
    """
    study_id = str(study_id)
    frame = select_scores(scores, model_version)
    rows = frame[frame["study_id"] == study_id]
    if rows.empty:
        raise ValueError(f"no predictions for study {study_id}"
                         + (f" (model version {model_version})" if model_version else ""))
    rows = graded_rows(rows)
    rows["detected"] = rows["detected"].astype(bool) if "detected" in rows else False
    rows["series_type"] = rows["column"].map(lambda c: TARGET_BY_COLUMN[c].series_type)
    flags = sorted({f for text in rows.get("flags", pd.Series(dtype=str)).dropna() for f in str(text).split(";") if f})
    version = model_version or (str(rows["model_version"].iloc[0]) if "model_version" in rows else None)
    header = [f"study {study_id}"]
    if version:
        header.append(f"model {version}")
    if "run_id" in rows:
        header.append(f"run {rows['run_id'].iloc[0]}")

    study = read_study(data_root, study_id, split=split)
    by_id = _series_by_id(study)
    written: list[str] = []
    for series_type in SERIES_TYPES:
        series = study.series.get(series_type)
        if series is None:
            log.info("study %s has no %s series; no overlay drawn", study_id, series_type)
            continue
        with _DRAW_LOCK:
            png = _draw_series(study_id, series_type, series, rows[rows["series_type"] == series_type],
                               by_id, header, flags)
        path = report_path(to_dir, study_id, series_type)
        storage.write_bytes(path, png)
        written.append(path)
    return written
