"""Synthetic RSNA 2024 studies: real DICOM series of a lumbar phantom, in the Kaggle layout.

``synthesize(out, n_studies, seed)`` writes::

    {out}/{split}_images/{study_id}/{series_id}/{instance_number}.dcm
    {out}/{split}_series_descriptions.csv
    {out}/train.csv, {out}/train_label_coordinates.csv        (split == "train" only)

Every study has a Sagittal T1, a Sagittal T2/STIR and an Axial T2 series rendered from one
:class:`~lumbar_ray.synth.phantom.PatientModel`. Its 25 severities are the label vector of a real
study sampled from the RSNA 2024 ``train.csv`` (the embedded copy by default), missing labels
included: they stay empty in the synthetic ``train.csv`` and get no coordinate row, while the
anatomy there shows a random severity. Coordinates point at the labelled structure on the
instance through it, like the real ``train_label_coordinates.csv``.

Output is deterministic for a seed (same bytes): UIDs derive from the seed and ids, no dates.
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from multiprocessing import get_context

import numpy as np
import pandas as pd

from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.synth.phantom import PatientModel, SliceStack, render_series, sample_series_geometry
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES, SEVERITIES, SEVERITY_TO_ID, TARGET_COLUMNS, TARGETS

log = logging.getLogger(__name__)

__all__ = [
    "SynthConfig",
    "SynthSummary",
    "synthesize",
    "sample_label_vectors",
    "load_label_table",
    "write_contact_sheet",
    "study_ids_of",
    "list_study_ids",
    "LABELS_RESOURCE",
    "COORDINATE_COLUMNS",
    "SERIES_COLUMNS",
]

LABELS_RESOURCE = "rsna2024_train_labels.csv.gz"  # in lumbar_ray/data (package data)
COORDINATE_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
SERIES_COLUMNS = ("study_id", "series_id", "series_description")
SIZES = ("full", "small")


@dataclass
class SynthConfig:
    n_studies: int
    seed: int
    split: str = "train"
    size: str = "full"  # or "small" (tests, demos)
    labels_csv: str | None = None  # default: the embedded copy of the real train.csv

    def __post_init__(self):
        if self.n_studies < 0:
            raise ValueError("n_studies must be >= 0")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if not self.split or "/" in self.split:
            raise ValueError(f"bad split {self.split!r}")


@dataclass
class SynthSummary:
    root: str
    split: str
    size: str
    seed: int
    n_studies: int
    n_series: int
    n_images: int
    n_coordinates: int
    study_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- labels
def load_label_table(labels_csv: str | None = None) -> pd.DataFrame:
    """The real RSNA 2024 ``train.csv`` (study_id + 25 severity columns, NaN where missing)."""
    if labels_csv is None:
        with resources.files("lumbar_ray").joinpath("data", LABELS_RESOURCE).open("rb") as f:
            df = pd.read_csv(f, compression="gzip")
    else:
        import fsspec

        with fsspec.open(labels_csv, "rb", compression="infer") as f:
            df = pd.read_csv(f)
    missing = [c for c in ("study_id", *TARGET_COLUMNS) if c not in df.columns]
    if missing:
        raise ValueError(f"labels table lacks columns {missing}")
    df = df[["study_id", *TARGET_COLUMNS]].copy()
    bad = set(pd.unique(df[list(TARGET_COLUMNS)].stack().dropna())) - set(SEVERITIES)
    if bad:
        raise ValueError(f"unknown severity values {sorted(bad)}")
    return df


def sample_label_vectors(n: int, seed: int, labels_csv: str | None = None) -> pd.DataFrame:
    """``n`` severity vectors of real studies (rows of ``train.csv``), each real study used once
    per pass through the table. Prefix-stable: the first k of ``n`` are the vectors for ``n=k``.
    Columns: ``source_study_id`` + the 25 target columns (strings, NaN = missing)."""
    table = load_label_table(labels_csv)
    rows: list[int] = []
    p = 0
    while len(rows) < n:
        rows.extend(np.random.default_rng([int(seed), 0x1ABE1, p]).permutation(len(table)).tolist())
        p += 1
    out = table.iloc[rows[:n]].reset_index(drop=True).rename(columns={"study_id": "source_study_id"})
    return out


def _severity_ids(row: pd.Series) -> np.ndarray:
    return np.array([SEVERITY_TO_ID[row[c]] if isinstance(row[c], str) else -1 for c in TARGET_COLUMNS], dtype=int)


def _draw_ids(seed: int, n_studies: int) -> tuple[list[int], list[list[int]]]:
    """Distinct study ids and 3 series ids per study, ints like the real ones (< 2**32).
    Study i's ids come from its own stream, so they do not depend on ``n_studies``."""
    seen: set[int] = set()
    study_ids, series_ids = [], []
    for i in range(n_studies):
        rng = np.random.default_rng([int(seed), 0x1D5, i])
        ids = []
        while len(ids) < 4:
            v = int(rng.integers(1_000_000, 4_294_967_295))
            if v not in seen:
                seen.add(v)
                ids.append(v)
        study_ids.append(ids[0])
        series_ids.append(ids[1:])
    return study_ids, series_ids


# ---------------------------------------------------------------------------------------- writer
def _fs_and_root(out, fs=None):
    import fsspec

    if fs is not None:
        return fs, str(out).rstrip("/")
    path = os.fspath(out)
    fs, root = fsspec.core.url_to_fs(path)
    return fs, root.rstrip("/") or "/"


def _geometry_ok(model: PatientModel, stack: SliceStack, series_type: str, margin: float = 8.0) -> bool:
    rs, cs = stack.pixel_spacing
    for t in TARGETS:
        if t.series_type != series_type:
            continue
        _, x, y, dist = stack.project(model.label_point(t))
        if not (margin / cs <= x <= stack.cols - 1 - margin / cs and margin / rs <= y <= stack.rows - 1 - margin / rs):
            return False
        spacing = float(np.median(np.abs(np.diff(stack.positions @ stack.normal)))) if stack.n > 1 else 4.0
        if abs(dist) > max(spacing, 4.0):
            return False
    return True


def _sample_geometry(model, kind, series_type, size, rng, like=None) -> SliceStack:
    for _ in range(20):
        stack = sample_series_geometry(model, kind, size, rng, like=like)
        if _geometry_ok(model, stack, series_type):
            return stack
        like = None
    return stack  # pragma: no cover - extremely unlikely; labels still project onto it


def _make_study(task: dict) -> dict:
    """Render and write one study. Returns its series rows, coordinate rows and image count."""
    try:  # the renderer's matrix products are small: extra BLAS threads only oversubscribe
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return _make_study_inner(task)
    with threadpool_limits(limits=1, user_api="blas"):
        return _make_study_inner(task)


def _make_study_inner(task: dict) -> dict:
    cfg = task["cfg"]
    study_id = task["study_id"]
    series_ids = task["series_ids"]
    sev = np.asarray(task["severity_ids"], dtype=int)
    rng = np.random.default_rng([int(cfg["seed"]), 0x57D, int(task["index"])])
    size = cfg["size"]
    fs, root = _fs_and_root(cfg["root"])

    model = PatientModel.sample(rng, sev)
    sag_t1 = _sample_geometry(model, "sagittal", SAGITTAL_T1, size, rng)
    shared = rng.random() < 0.5
    sag_t2 = _sample_geometry(model, "sagittal", SAGITTAL_T2, size, rng, like=sag_t1 if shared else None)
    axial = _sample_geometry(model, "axial", AXIAL_T2, size, rng)
    t2_contrast = "STIR" if model.stir else "T2"
    if shared and sag_t2.positions.shape == sag_t1.positions.shape and np.allclose(sag_t2.positions, sag_t1.positions):
        both = render_series(model, sag_t1, ["T1", t2_contrast], rng, size)
        vols = {SAGITTAL_T1: both[0], SAGITTAL_T2: both[1]}
    else:
        vols = {
            SAGITTAL_T1: render_series(model, sag_t1, ["T1"], rng, size)[0],
            SAGITTAL_T2: render_series(model, sag_t2, [t2_contrast], rng, size)[0],
        }
    vols[AXIAL_T2] = render_series(model, axial, ["T2"], rng, size)[0]
    stacks = {SAGITTAL_T1: sag_t1, SAGITTAL_T2: sag_t2, AXIAL_T2: axial}

    order = rng.permutation(3)  # series numbers in a random acquisition order
    study_uid = uid_for("study", cfg["seed"], study_id)
    series_rows, n_images = [], 0
    series_of = {}
    for k, st in enumerate(SERIES_TYPES):
        series_id = series_ids[k]
        series_of[st] = series_id
        stack = stacks[st]
        paths = write_mr_series(
            f"{root}/{cfg['split']}_images/{study_id}/{series_id}",
            vols[st],
            study_uid=study_uid,
            series_uid=uid_for("series", cfg["seed"], study_id, series_id),
            study_id=study_id,
            series_description=st,
            series_number=int(order[k]) + 1,
            image_orientation=stack.orientation,
            positions=stack.positions,
            pixel_spacing=stack.pixel_spacing,
            slice_thickness=stack.slice_thickness,
            instance_numbers=stack.instance_numbers,
            fs=fs,
        )
        n_images += len(paths)
        series_rows.append({"study_id": study_id, "series_id": series_id, "series_description": st})

    coord_rows = []
    for t in TARGETS:
        if sev[t.index] < 0:
            continue  # missing label: no coordinate, like the real file
        stack = stacks[t.series_type]
        k, x, y, _ = stack.project(model.label_point(t))
        coord_rows.append(
            {
                "study_id": study_id,
                "series_id": series_of[t.series_type],
                "instance_number": int(stack.instance_numbers[k]),
                "condition": t.condition.name,
                "level": t.level,
                "x": float(x),
                "y": float(y),
            }
        )
    return {"series": series_rows, "coords": coord_rows, "n_images": n_images}


def _write_csv(fs, path: str, df: pd.DataFrame) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue().encode())


def synthesize(out, n_studies: int, seed: int, split: str = "train", size: str = "full", labels_csv: str | None = None,
               workers: int = 1) -> SynthSummary:
    """Write ``n_studies`` synthetic studies under ``out`` (local path or fsspec URL).

    Deterministic for ``seed``: the same arguments give byte-identical files (``workers`` does
    not change the output). Returns a :class:`SynthSummary`.
    """
    cfg = SynthConfig(n_studies=n_studies, seed=seed, split=split, size=size, labels_csv=labels_csv)
    t0 = time.perf_counter()
    fs, root = _fs_and_root(out)
    fs.makedirs(f"{root}/{split}_images", exist_ok=True)
    labels = sample_label_vectors(n_studies, seed, labels_csv)
    study_ids, series_ids = _draw_ids(seed, n_studies)
    base = {"seed": int(seed), "split": split, "size": size, "root": os.fspath(out)}
    tasks = [
        {"cfg": base, "index": i, "study_id": study_ids[i], "series_ids": series_ids[i],
         "severity_ids": _severity_ids(labels.iloc[i]).tolist()}
        for i in range(n_studies)
    ]
    if workers > 1 and n_studies > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
            results = list(ex.map(_make_study, tasks, chunksize=1))
    else:
        results = [_make_study(t) for t in tasks]

    series = pd.DataFrame([r for res in results for r in res["series"]], columns=list(SERIES_COLUMNS))
    series = series.sort_values(["study_id", "series_id"], kind="stable").reset_index(drop=True)
    _write_csv(fs, f"{root}/{split}_series_descriptions.csv", series)
    n_coords = 0
    if split == "train":
        train = labels.drop(columns=["source_study_id"]).copy()
        train.insert(0, "study_id", study_ids)
        train = train.sort_values("study_id", kind="stable").reset_index(drop=True)
        _write_csv(fs, f"{root}/train.csv", train)
        coords = pd.DataFrame([r for res in results for r in res["coords"]], columns=list(COORDINATE_COLUMNS))
        if len(coords):
            coords = coords.sort_values(["study_id", "condition"], kind="stable").reset_index(drop=True)
        _write_csv(fs, f"{root}/train_label_coordinates.csv", coords)
        n_coords = len(coords)
    summary = SynthSummary(
        root=os.fspath(out),
        split=split,
        size=size,
        seed=int(seed),
        n_studies=n_studies,
        n_series=len(series),
        n_images=sum(r["n_images"] for r in results),
        n_coordinates=n_coords,
        study_ids=sorted(study_ids),
        seconds=time.perf_counter() - t0,
    )
    log.info("synthesized %d %s studies (%s) in %.1f s at %s", n_studies, split, size, summary.seconds, out)
    return summary


def study_ids_of(summary: SynthSummary) -> list[int]:
    """The study ids a :func:`synthesize` call wrote (sorted)."""
    return sorted(int(s) for s in summary.study_ids)


def list_study_ids(root, split: str = "train") -> list[int]:
    """Sorted study ids listed in ``{root}/{split}_series_descriptions.csv``."""
    fs, r = _fs_and_root(root)
    with fs.open(f"{r}/{split}_series_descriptions.csv", "rb") as f:
        sd = pd.read_csv(f)
    return sorted(int(v) for v in sd.study_id.unique())


# ---------------------------------------------------------------------------------------- contact sheet
_SEV_COLOURS = {"Normal/Mild": "#39d353", "Moderate": "#ffb000", "Severe": "#ff3030"}
_SHORT = {"Normal/Mild": "N/M", "Moderate": "Mod", "Severe": "Sev"}


def _read_series(fs, folder: str) -> dict[int, np.ndarray]:
    import pydicom

    out = {}
    for path in sorted(fs.ls(folder, detail=False)):
        if not str(path).endswith(".dcm"):
            continue
        with fs.open(path, "rb") as f:
            ds = pydicom.dcmread(f)
        out[int(ds.InstanceNumber)] = ds.pixel_array
    return out


def write_contact_sheet(root, study_id, out_png, split: str = "train", *, dpi: int = 100) -> str:
    """One PNG of a study: labelled instances of the three series with the labelled points drawn
    and annotated (level, side, severity). Works on any Kaggle-layout root (real data too)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fs, r = _fs_and_root(root)
    study_id = int(study_id)
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

    panels = []  # (title, image, [(x, y, label, colour)])
    for st, n_max in ((SAGITTAL_T2, 2), (SAGITTAL_T1, 3), (AXIAL_T2, 5)):
        rows = sd[sd.series_description == st]
        if rows.empty:
            continue
        series_id = int(rows.iloc[0].series_id)
        images = _read_series(fs, f"{r}/{split}_images/{study_id}/{series_id}")
        if not images:
            continue
        cs = coords[coords.series_id == series_id]
        wanted = list(dict.fromkeys(int(i) for i in cs.instance_number))
        if st == AXIAL_T2 and len(wanted) > n_max:  # one slice per level
            wanted = list(dict.fromkeys(int(cs[cs.level == lv].instance_number.iloc[0]) for lv in sorted(set(cs.level))))
        insts = sorted(images)
        mid = insts[len(insts) // 2]
        for extra in (mid, insts[len(insts) // 4], insts[(3 * len(insts)) // 4]):
            if len(wanted) >= n_max:
                break
            if extra not in wanted:
                wanted.append(extra)
        for inst in wanted[:n_max]:
            marks = []
            for _, p in cs[cs.instance_number == inst].iterrows():
                t = next(t for t in TARGETS if t.condition.name == p.condition and t.level == p.level)
                s = sev.get(t.column, "?")
                side = {"left": "L ", "right": "R "}.get(t.side or "", "")
                # axial: the patient's right is on the image left, so its label goes left
                dx = -6 if (st == AXIAL_T2 and t.side == "right") else 6
                marks.append((p.x, p.y, f"{side}{p.level} {_SHORT.get(s, s)}", _SEV_COLOURS.get(s, "#40a0ff"), dx))
            panels.append((f"{st}  #{inst}", images[inst], marks))

    ncol = 5
    nrow = max(1, -(-len(panels) // ncol))
    fig = Figure(figsize=(4.0 * ncol, 4.3 * nrow), dpi=dpi)
    fig.patch.set_facecolor("black")
    for i, (title, img, marks) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        lo, hi = np.percentile(img, [0.5, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1), interpolation="bilinear")
        ax.set_title(title, color="white", fontsize=9)
        ax.set_axis_off()
        for x, y, label, colour, dx in marks:
            ax.plot([x], [y], marker="+", color=colour, markersize=9, mew=1.6)
            ax.annotate(label, (x, y), xytext=(dx, -4), textcoords="offset points", color=colour, fontsize=6.5,
                        ha="left" if dx > 0 else "right", bbox=dict(facecolor="black", alpha=0.45, pad=0.6, edgecolor="none"))
    fig.suptitle(f"study {study_id} ({split})  green Normal/Mild · orange Moderate · red Severe", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out_png = os.fspath(out_png)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    ofs, opath = _fs_and_root(out_png)
    parent = opath.rsplit("/", 1)[0]
    if parent:
        ofs.makedirs(parent, exist_ok=True)
    with ofs.open(opath, "wb") as f:
        f.write(buf.getvalue())
    return out_png
