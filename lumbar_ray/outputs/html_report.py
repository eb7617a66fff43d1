"""An HTML review of a scoring output: a worklist page and one page per study, for a browser.

:func:`write_html_report` writes, into one folder (local or an fsspec URL):

- ``index.html``: the worklist of :func:`lumbar_ray.outputs.worklist.read_worklist` (highest
  priority first), each study linked to its page; studies the worklist lacks are listed after it
  and studies that failed (the errors table) below, so none is dropped silently;
- ``study_{id}.html`` per scored study: its flags, the 25 findings (grade, the three
  probabilities, where each was found) and its overlays;
- the overlays, drawn by :func:`lumbar_ray.outputs.overlays.write_study_report` under their
  usual names (``{study_id}_{series_slug}.png``). A study whose overlays cannot be drawn (its
  images missing or unreadable) still gets its page, with the reason shown where they would be.

The pages are self-contained so that a report copied off the cluster opens anywhere, offline
and without a web server: inline CSS, system fonts, images referenced by relative file name, no
scripts. Every value taken from the data (study ids, flags, messages) goes through
:func:`html.escape`: ids and flags come from files a user does not control.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from string import Template
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from lumbar_ray import storage
from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.outputs.overlays import GRADE_COLOURS, graded_rows, report_path, write_study_report
from lumbar_ray.outputs.parallel import DEFAULT_STUDY_WORKERS, map_in_order
from lumbar_ray.outputs.schema import FLAG_SEPARATOR
from lumbar_ray.outputs.store import read_errors, select_scores
from lumbar_ray.outputs.worklist import CONDITION_COLUMNS, failed_studies, read_worklist
from lumbar_ray.targets import (
    CONDITIONS,
    PROBABILITY_COLUMNS,
    SERIES_TYPES,
    SEVERITIES,
    TARGET_BY_COLUMN,
)

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_NAME",
    "HtmlReport",
    "StudyPage",
    "render_index",
    "render_study_page",
    "study_page_name",
    "write_html_report",
]

INDEX_NAME = "index.html"
_PROBS = list(PROBABILITY_COLUMNS)
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MISSING = "\u2014"  # an em dash in empty cells

# System fonts only: a remote font would need the network.
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 1rem 1.2rem;
       color: #1a1a1a; background: #fff; font-size: 13px; }
h1 { font-size: 1.5rem; margin: 0.2rem 0 0.4rem; } h2 { font-size: 1.15rem; margin: 1.4rem 0 0.5rem; }
.meta { color: #444; margin: 0.2rem 0; }
table { border-collapse: collapse; margin: 0.4rem 0; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #e8e8e8; } tbody tr:nth-child(even) { background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.g0 { color: $g0; } .g1 { color: $g1; font-weight: 600; } .g2 { color: $g2; font-weight: 700; }
td.warn { background: #fff4d6; }
.note { background: #fff4d6; border: 1px solid #e0b84a; padding: 6px 10px; display: inline-block; }
.flag { display: inline-block; background: #eef; border: 1px solid #99c; border-radius: 3px;
        padding: 0 4px; margin: 1px 2px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
.review { color: #b00; font-weight: 700; } tr.to-review td:first-child { border-left: 4px solid #d62728; }
figure { margin: 0.6rem 0 1.2rem; } figure img { max-width: 100%; border: 1px solid #ccc; }
figcaption { color: #444; } nav { margin-bottom: 0.6rem; } a { color: #0645ad; }
"""
CSS = Template(_CSS).substitute(g0=GRADE_COLOURS[0], g1=GRADE_COLOURS[1], g2=GRADE_COLOURS[2])

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$css</style>
</head>
<body>
$body
</body>
</html>
""")


@dataclass(frozen=True)
class StudyPage:
    """One study's page: where it went, the overlays drawn, or why there are none."""

    study_id: str
    path: str
    overlays: tuple[str, ...]
    overlay_note: str | None = None


@dataclass(frozen=True)
class HtmlReport:
    index: str
    pages: tuple[StudyPage, ...]
    model_version: str | None

    @property
    def without_overlays(self) -> list[StudyPage]:
        return [p for p in self.pages if not p.overlays]


def study_page_name(study_id: str) -> str:
    """``study_{id}.html``; an id with characters unsafe in a file name or URL gets them replaced
    and a short hash of the id appended, so that two such ids cannot share a page."""
    study_id = str(study_id)
    if _SAFE_NAME.fullmatch(study_id):
        return f"study_{study_id}.html"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study_id)[:60]
    return f"study_{safe}-{hashlib.sha1(study_id.encode()).hexdigest()[:10]}.html"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(file_name: str) -> str:
    """A relative link to a file in the report folder, percent-encoded then escaped."""
    return _esc(quote(file_name))


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and lists: not missing
        return False


def _cell_text(value: Any) -> str:
    """A value as table text: floats to 3 decimals, booleans yes/no, lists joined, empty as a dash."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "; ".join(str(v) for v in value) or _MISSING
    if _is_missing(value):
        return _MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    return str(value)


def _split_flags(value: Any) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value if str(v)]
    if _is_missing(value):
        return []
    return [f for f in str(value).split(FLAG_SEPARATOR) if f]


def _flag_badges(flags: Iterable[str]) -> str:
    return " ".join(f'<span class="flag">{_esc(f)}</span>' for f in flags) or _MISSING


def _page(title: str, body: str) -> str:
    return _PAGE.substitute(title=_esc(title), css=CSS, body=body)


# --------------------------------------------------------------------------------------------
# One study
# --------------------------------------------------------------------------------------------


def _findings_table(rows: pd.DataFrame) -> str:
    head = ("<tr><th>#</th><th>Condition</th><th>Level</th><th>Grade</th><th>P normal/mild</th>"
            "<th>P moderate</th><th>P severe</th><th>Detected</th><th>Confidence</th><th>Series</th>"
            "<th>Instance</th><th>x, y (px)</th></tr>")
    body = []
    for _, row in graded_rows(rows).iterrows():
        target = TARGET_BY_COLUMN[row["column"]]
        grade = int(row["grade"])
        detected = bool(row.get("detected", False))
        where = (f"{float(row['x']):.0f}, {float(row['y']):.0f}"
                 if detected and not _is_missing(row.get("x")) and not _is_missing(row.get("y")) else _MISSING)
        instance = row.get("instance_number")
        cells = [
            f"<td class=\"num\">{target.index + 1}</td>",
            f"<td>{_esc(target.condition.name)}</td>",
            f"<td>{_esc(target.level)}</td>",
            f"<td class=\"g{grade}\">{_esc(SEVERITIES[grade])}</td>",
            *(f"<td class=\"num\">{float(row[p]):.3f}</td>" for p in _PROBS),
            f"<td>{'yes' if detected else 'no (prior)'}</td>",
            f"<td class=\"num\">{_esc(_cell_text(row.get('confidence')))}</td>",
            f"<td>{_esc(_cell_text(row.get('series_id')))}</td>",
            f"<td class=\"num\">{_esc(_MISSING if _is_missing(instance) else int(instance))}</td>",
            f"<td class=\"num\">{_esc(where)}</td>",
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="findings"><thead>{head}</thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table>")


def _overlays_section(page: StudyPage) -> str:
    parts = ["<h2>Overlays</h2>"]
    if page.overlay_note:
        parts.append(f'<p class="note" id="overlay-note">Overlays not drawn: {_esc(page.overlay_note)}</p>')
    by_name = {os.path.basename(report_path("", page.study_id, t)): t for t in SERIES_TYPES}
    for path in page.overlays:
        name = os.path.basename(path)
        caption = by_name.get(name, name)
        parts.append(f'<figure><img src="{_href(name)}" alt="{_esc(caption)} overlay" loading="lazy">'
                     f"<figcaption>{_esc(caption)} ({_esc(name)})</figcaption></figure>")
    return "\n".join(parts)


def render_study_page(study_id: str, rows: pd.DataFrame, page: StudyPage,
                      worklist_row: pd.Series | None = None) -> str:
    """The HTML of one study's page. ``rows``: its 25 rows as :func:`select_scores` returns them;
    ``worklist_row``: its worklist row (priority, review flags), when the worklist has one."""
    study_id = str(study_id)
    flags = sorted({f for value in rows.get("flags", pd.Series(dtype=object)) for f in _split_flags(value)})
    meta = []
    for label, column in (("model version", "model_version"), ("run", "run_id"), ("scored at", "scored_at")):
        if column in rows and len(rows):
            meta.append(f"{label} {_esc(_cell_text(rows[column].iloc[0]))}")
    review = ""
    if worklist_row is not None:
        if "priority" in worklist_row:
            meta.append(f"priority {_esc(_cell_text(worklist_row['priority']))}")
        if "any_severe_spinal" in worklist_row:
            meta.append(f"P(any severe spinal) {_esc(_cell_text(worklist_row['any_severe_spinal']))}")
        review_flags = _split_flags(worklist_row.get("flags"))
        flags = sorted(set(flags) | set(review_flags))
        if _truthy(worklist_row.get("review")):
            review = '<p class="review" id="review">Marked for review.</p>'
    body = [
        f'<nav><a href="{_href(INDEX_NAME)}">&larr; worklist</a></nav>',
        f"<h1>Study {_esc(study_id)}</h1>",
        f'<p class="meta">{" &middot; ".join(meta)}</p>' if meta else "",
        review,
        f'<h2>Flags</h2><p id="flags">{_flag_badges(flags)}</p>',
        f"<h2>Findings ({len(rows)})</h2>",
        _findings_table(rows),
        _overlays_section(page),
    ]
    return _page(f"Study {study_id} - lumbar-ray", "\n".join(b for b in body if b))


def _truthy(value: Any) -> bool:
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) > 0
    if _is_missing(value):
        return False
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no")
    return bool(value)


def _draw_overlays(rows: pd.DataFrame, data_root, study_id: str, to_dir, split: str) -> tuple[tuple[str, ...], str | None]:
    """The overlay PNGs of one study, or none and the reason (its images missing or unreadable)."""
    try:
        written = write_study_report(rows, data_root, study_id, to_dir, split=split)
    except (DicomReadError, OSError) as exc:
        log.warning("study %s: overlays not drawn: %s", study_id, exc)
        return (), f"{type(exc).__name__}: {exc}"
    if not written:
        return (), "no Sagittal T1, Sagittal T2/STIR or Axial T2 series found in the study's images"
    return tuple(written), None


# --------------------------------------------------------------------------------------------
# The worklist
# --------------------------------------------------------------------------------------------

# Short column headers for the worst grade per condition: "Canal", "L foramen", "R subarticular".
_FAMILY_WORD = {"spinal": "Canal", "foraminal": "foramen", "subarticular": "subarticular"}
_CONDITIONS = {c.slug: c for c in CONDITIONS}


def _grade_header(column: str) -> str:
    condition = _CONDITIONS[column]
    side = {"left": "L ", "right": "R "}.get(condition.side or "", "")
    return f'<th title="{_esc(condition.name)}">{_esc(side + _FAMILY_WORD[condition.family])}</th>'


def _grade_cell(value: Any) -> str:
    """A worst grade (its name, or its severity id) in its grade's colour."""
    if _is_missing(value):
        return f"<td>{_MISSING}</td>"
    if str(value) in SEVERITIES:
        grade = SEVERITIES.index(str(value))
    elif isinstance(value, (int, np.integer)) and 0 <= int(value) < len(SEVERITIES):
        grade = int(value)
    else:
        return f"<td>{_esc(value)}</td>"
    return f'<td class="g{grade}">{_esc(SEVERITIES[grade])}</td>'


def _study_link(study_id: str, pages: dict[str, StudyPage]) -> str:
    page = pages.get(study_id)
    if page is None:
        return f"{_esc(study_id)} (no predictions)"
    return f'<a href="{_href(os.path.basename(page.path))}">{_esc(study_id)}</a>'


def _overlay_cell(page: StudyPage | None) -> str:
    if page is None:
        return f"<td>{_MISSING}</td>"
    if page.overlays:
        return f'<td class="num">{len(page.overlays)}</td>'
    # the reason in full is on the study's page; here a marker that fits the row
    return f'<td class="warn" title="{_esc(page.overlay_note or "")}">not drawn</td>'


_NUMBER_HEADERS = {"priority": "Priority", "any_severe_spinal": "P(any severe spinal)",
                   "n_severe": "Severe", "n_detected": "Found"}


def _worklist_table(worklist: pd.DataFrame, pages: dict[str, StudyPage]) -> str:
    """The worklist rows in their order; a row to review has its flags shown and a red edge."""
    grades = [c for c in CONDITION_COLUMNS if c in worklist.columns]
    numbers = [c for c in _NUMBER_HEADERS if c in worklist.columns]
    single = ["#", "Study", *(_NUMBER_HEADERS[c] for c in numbers)]
    head = ("<tr>" + "".join(f'<th rowspan="2">{_esc(h)}</th>' for h in single)
            + (f'<th colspan="{len(grades)}">Worst grade</th>' if grades else "")
            + '<th rowspan="2">Review flags</th><th rowspan="2">Overlays</th></tr>\n<tr>'
            + "".join(_grade_header(c) for c in grades) + "</tr>")
    body = []
    for rank, (_, row) in enumerate(worklist.iterrows(), start=1):
        study_id = str(row["study_id"])
        flags = _split_flags(row.get("flags"))
        to_review = _truthy(row.get("review")) or bool(flags)
        cells = [f'<td class="num">{rank}</td>', f"<td>{_study_link(study_id, pages)}</td>",
                 *(f'<td class="num">{_esc(_number_text(c, row[c]))}</td>' for c in numbers),
                 *(_grade_cell(row[c]) for c in grades),
                 f"<td>{_flag_badges(flags) if flags else ('review' if to_review else '')}</td>",
                 _overlay_cell(pages.get(study_id))]
        body.append(("<tr class=\"to-review\">" if to_review else "<tr>") + "".join(cells) + "</tr>")
    return f'<table id="worklist"><thead>{head}</thead>\n<tbody>\n' + "\n".join(body) + "\n</tbody></table>"


def _number_text(column: str, value: Any) -> str:
    if column == "n_detected" and not _is_missing(value):
        return f"{int(value)}/{len(TARGET_BY_COLUMN)}"
    return _cell_text(value)


def _unlisted_section(study_ids: Sequence[str], pages: dict[str, StudyPage]) -> str:
    """Scored studies the worklist does not list (e.g. an output written before it existed)."""
    if not study_ids:
        return ""
    items = "".join(f"<li>{_study_link(s, pages)}</li>" for s in study_ids)
    return (f'<h2>Scored studies not on the worklist ({len(study_ids)})</h2>'
            f'<ul id="unlisted">{items}</ul>')


def _errors_section(errors: pd.DataFrame) -> str:
    """Studies whose scoring failed (``errors`` rows of studies without predictions): the recorded
    stage and reason, so that no study is silently absent from the report."""
    if errors.empty:
        return ""
    rows = []
    for _, err in errors.iterrows():
        rows.append("<tr>" + "".join(f"<td>{_esc(_cell_text(err.get(c)))}</td>"
                                     for c in ("study_id", "series_id", "stage", "error_type", "message")) + "</tr>")
    return (f'<h2>Studies not scored ({errors["study_id"].nunique()})</h2>'
            '<table id="errors"><thead><tr><th>Study</th><th>Series</th><th>Stage</th><th>Error</th>'
            "<th>Message</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>")


def render_index(worklist: pd.DataFrame, pages: Sequence[StudyPage], *, model_version: str | None = None,
                 errors: pd.DataFrame | None = None) -> str:
    """The HTML of ``index.html``: ``worklist`` (its rows in its order, highest priority first),
    the scored studies it lacks, and ``errors``: the error rows of the studies that failed."""
    by_id = {p.study_id: p for p in pages}
    listed = {str(s) for s in worklist["study_id"]} if "study_id" in worklist else set()
    unlisted = [p.study_id for p in pages if p.study_id not in listed]
    n_no_overlays = sum(1 for p in pages if not p.overlays)
    meta = [f"{len(pages)} scored studies"]
    if model_version:
        meta.insert(0, f"model version {_esc(model_version)}")
    if n_no_overlays:
        meta.append(f"{n_no_overlays} without overlays")
    legend = " ".join(f'<span class="g{i}">{_esc(name)}</span>' for i, name in enumerate(SEVERITIES))
    body = [
        "<h1>lumbar-ray worklist</h1>",
        f'<p class="meta">{" &middot; ".join(meta)}. Highest priority first; grades: {legend}.</p>',
        _worklist_table(worklist, by_id),
        _unlisted_section(unlisted, by_id),
        _errors_section(errors if errors is not None else pd.DataFrame()),
    ]
    return _page("lumbar-ray worklist", "\n".join(b for b in body if b))


# --------------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------------


def _version_of(frame: pd.DataFrame, model_version: str | None) -> str | None:
    if model_version is not None or "model_version" not in frame:
        return model_version
    versions = frame["model_version"].dropna().unique()
    return str(versions[0]) if len(versions) == 1 else None


def write_html_report(
    scores: str | os.PathLike,
    data_root: str | os.PathLike,
    to_dir: str | os.PathLike,
    *,
    split: str = "test",
    model_version: str | None = None,
    studies: Sequence[str | int] | None = None,
    workers: int = DEFAULT_STUDY_WORKERS,
) -> HtmlReport:
    """Write ``index.html``, a page per study and the overlays to ``to_dir``; return where they went.

    ``scores``: a scoring output root. ``model_version``: whose rows (needed when the output holds
    several, as for :func:`select_scores`). ``studies``: only these (each must have predictions,
    else ValueError naming those that do not); default every scored study. Overlays are read from
    ``data_root``/``split``; a study whose images cannot be read gets its page with the reason.
    ``workers``: studies read and drawn at once (:func:`~lumbar_ray.outputs.parallel.map_in_order`).
    """
    frame = select_scores(scores, model_version)
    version = _version_of(frame, model_version)
    study_ids = list(dict.fromkeys(frame["study_id"]))
    if studies is not None:
        wanted = list(dict.fromkeys(str(s) for s in studies))
        missing = [s for s in wanted if s not in set(study_ids)]
        if missing:
            raise ValueError(f"no predictions for studies {', '.join(missing)}"
                             + (f" (model version {version})" if version else ""))
        study_ids = wanted
    worklist = read_worklist(scores, model_version=version)
    worklist = worklist.assign(study_id=worklist["study_id"].astype(str))
    if studies is not None:
        worklist = worklist[worklist["study_id"].isin(study_ids)]
    by_study = {sid: rows for sid, rows in frame.groupby("study_id", sort=False)}

    def one(sid: str) -> StudyPage:
        rows = by_study[sid]
        overlays, note = _draw_overlays(rows, data_root, sid, to_dir, split)
        page = StudyPage(sid, storage.join(to_dir, study_page_name(sid)), overlays, note)
        match = worklist[worklist["study_id"] == sid]
        html_text = render_study_page(sid, rows, page, match.iloc[0] if len(match) else None)
        storage.write_bytes(page.path, html_text.encode("utf-8"))
        return page

    # Each page reads its study's images: a few studies at a time hide the storage's latency.
    pages = list(map_in_order(one, study_ids, workers))

    # Errors of a scored study (a skipped file, a failed try that a rerun scored) show in its
    # flags; the index lists the studies that have errors and no predictions, with their reasons.
    errors = read_errors(scores, version)
    failed = set() if studies is not None else set(failed_studies(scores, version))
    errors = errors[errors["study_id"].astype(str).isin(failed)] if failed else errors.iloc[0:0]
    index = storage.join(to_dir, INDEX_NAME)
    storage.write_bytes(index, render_index(worklist, pages, model_version=version, errors=errors).encode("utf-8"))
    log.info("HTML report: %s (%d study pages, %d without overlays)", index, len(pages),
             sum(1 for p in pages if not p.overlays))
    return HtmlReport(index=index, pages=tuple(pages), model_version=version)
