"""Contact sheet of a study in the Kaggle layout: its labelled instances with the labelled points
drawn and annotated (one PNG; works on real data too)."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pydicom

from lumbar_ray.metrics.labels import COORDINATE_COLUMNS
from lumbar_ray.synth.writer import filesystem_and_root
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, TARGETS

__all__ = ["write_contact_sheet"]

_SEV_COLOURS = {"Normal/Mild": "#39d353", "Moderate": "#ffb000", "Severe": "#ff3030"}
_SHORT = {"Normal/Mild": "N/M", "Moderate": "Mod", "Severe": "Sev"}
# Series in panel order, with the most instances shown of each.
_PANEL_SERIES = ((SAGITTAL_T2, 2), (SAGITTAL_T1, 3), (AXIAL_T2, 5))


def write_contact_sheet(root, study_id, out_png, split: str = "train", *, dpi: int = 100) -> str:
    """One PNG of a study: labelled instances of the three series with the labelled points drawn
    and annotated (level, side, severity). Works on any Kaggle-layout root (real data too)."""
    fs, r = filesystem_and_root(root)
    study_id = int(study_id)
    series, coords, severities = _study_tables(fs, r, split, study_id)
    panels = []  # (title, image, [(x, y, label, colour, dx)])
    for st, n_max in _PANEL_SERIES:
        rows = series[series.series_description == st]
        if rows.empty:
            continue
        # several series of a type (a repeat, split axial coverage): show the one most labels point at
        series_id = int(max(rows.series_id, key=lambda sid: int((coords.series_id == sid).sum())))
        images = _read_series(fs, f"{r}/{split}_images/{study_id}/{series_id}")
        if not images:
            continue
        cs = coords[coords.series_id == series_id]
        for inst in _instances_to_show(images, cs, st, n_max):
            panels.append((f"{st}  #{inst}", images[inst], _marks(cs[cs.instance_number == inst], st, severities)))
    png = _draw_sheet(panels, f"study {study_id} ({split})", dpi)
    out_png = os.fspath(out_png)
    ofs, opath = filesystem_and_root(out_png)
    parent = opath.rsplit("/", 1)[0]
    if parent:
        ofs.makedirs(parent, exist_ok=True)
    with ofs.open(opath, "wb") as f:
        f.write(png)
    return out_png


def _study_tables(fs, r: str, split: str, study_id: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """The study's series descriptions, its label coordinates and its severity per target column
    (both empty unless the split is train and has labels)."""
    with fs.open(f"{r}/{split}_series_descriptions.csv", "rb") as f:
        sd = pd.read_csv(f)
    sd = sd[sd.study_id == study_id]
    if sd.empty:
        raise KeyError(f"study {study_id} not in {split}_series_descriptions.csv")
    coords = pd.DataFrame(columns=list(COORDINATE_COLUMNS))
    sev: dict[str, str] = {}
    if split == "train" and fs.exists(f"{r}/train_label_coordinates.csv"):
        with fs.open(f"{r}/train_label_coordinates.csv", "rb") as f:
            c = pd.read_csv(f)
        coords = c[c.study_id == study_id]
        with fs.open(f"{r}/train.csv", "rb") as f:
            tr = pd.read_csv(f)
        row = tr[tr.study_id == study_id]
        if len(row):
            sev = {k: v for k, v in row.iloc[0].items() if isinstance(v, str)}
    return sd, coords, sev


def _read_series(fs, folder: str) -> dict[int, np.ndarray]:
    out = {}
    for path in sorted(fs.ls(folder, detail=False)):
        if not str(path).endswith(".dcm"):
            continue
        with fs.open(path, "rb") as f:
            ds = pydicom.dcmread(f)
        out[int(ds.InstanceNumber)] = ds.pixel_array
    return out


def _instances_to_show(images: dict[int, np.ndarray], cs: pd.DataFrame, series_type: str, n_max: int) -> list[int]:
    """The labelled instances (axial: one per level), topped up with the middle and quarter
    instances, at most ``n_max``."""
    wanted = list(dict.fromkeys(int(i) for i in cs.instance_number))
    if series_type == AXIAL_T2 and len(wanted) > n_max:  # one slice per level
        wanted = list(dict.fromkeys(int(cs[cs.level == lv].instance_number.iloc[0]) for lv in sorted(set(cs.level))))
    insts = sorted(images)
    mid = insts[len(insts) // 2]
    for extra in (mid, insts[len(insts) // 4], insts[(3 * len(insts)) // 4]):
        if len(wanted) >= n_max:
            break
        if extra not in wanted:
            wanted.append(extra)
    return wanted[:n_max]


def _marks(points: pd.DataFrame, series_type: str, severities: dict[str, str]) -> list[tuple]:
    """(x, y, label, colour, label offset) of each labelled point on one instance."""
    marks = []
    for _, p in points.iterrows():
        t = next(t for t in TARGETS if t.condition.name == p.condition and t.level == p.level)
        s = severities.get(t.column, "?")
        side = {"left": "L ", "right": "R "}.get(t.side or "", "")
        # axial: the patient's right is on the image left, so its label goes left
        dx = -6 if (series_type == AXIAL_T2 and t.side == "right") else 6
        marks.append((p.x, p.y, f"{side}{p.level} {_SHORT.get(s, s)}", _SEV_COLOURS.get(s, "#40a0ff"), dx))
    return marks


def _draw_sheet(panels: list[tuple], title: str, dpi: int) -> bytes:
    """The panels in rows of five on black, as PNG bytes."""
    import matplotlib  # heavy; only the contact sheet draws

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    ncol = 5
    nrow = max(1, -(-len(panels) // ncol))
    fig = Figure(figsize=(4.0 * ncol, 4.3 * nrow), dpi=dpi)
    fig.patch.set_facecolor("black")
    for i, (panel_title, img, marks) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        lo, hi = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1), interpolation="bilinear")
        ax.set_title(panel_title, color="white", fontsize=9)
        ax.set_axis_off()
        for x, y, label, colour, dx in marks:
            ax.plot([x], [y], marker="+", color=colour, markersize=9, mew=1.6)
            ax.annotate(label, (x, y), xytext=(dx, -4), textcoords="offset points", color=colour, fontsize=6.5,
                        ha="left" if dx > 0 else "right", bbox=dict(facecolor="black", alpha=0.45, pad=0.6, edgecolor="none"))
    fig.suptitle(f"{title}  green Normal/Mild · orange Moderate · red Severe", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    return buf.getvalue()
