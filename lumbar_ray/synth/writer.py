"""Synthetic RSNA 2024 studies: real DICOM series of a lumbar phantom, in the Kaggle layout.

``synthesize(out, n_studies, seed)`` writes::

    {out}/{split}_images/{study_id}/{series_id}/{instance_number}.dcm
    {out}/{split}_series_descriptions.csv
    {out}/train.csv, {out}/train_label_coordinates.csv        (split == "train" only)

Every study has a Sagittal T1, a Sagittal T2/STIR and an Axial T2 series rendered from one
:class:`~lumbar_ray.synth.anatomy.PatientModel`. Its 25 severities are the label vector of a real
study sampled from the RSNA 2024 ``train.csv`` (:mod:`lumbar_ray.synth.labels`), missing labels
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
from multiprocessing import get_context

import fsspec
import numpy as np
import pandas as pd

from lumbar_ray.dicom.write import uid_for, write_mr_series
from lumbar_ray.metrics.labels import COORDINATE_COLUMNS
from lumbar_ray.synth.acquisition import render_series
from lumbar_ray.synth.anatomy import PatientModel
from lumbar_ray.synth.geometry import SliceStack, sample_labelled_geometry
from lumbar_ray.synth.labels import sample_label_vectors, severity_ids_of
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES, TARGETS

log = logging.getLogger(__name__)

__all__ = [
    "SynthConfig",
    "SynthSummary",
    "synthesize",
    "draw_ids",
    "study_rng",
    "study_ids_of",
    "list_study_ids",
    "filesystem_and_root",
    "SERIES_COLUMNS",
]

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


def draw_ids(seed: int, n_studies: int) -> tuple[list[int], list[list[int]]]:
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


def filesystem_and_root(out) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, root path without a trailing slash)`` of a local folder or fsspec URL."""
    fs, root = fsspec.core.url_to_fs(os.fspath(out))
    return fs, root.rstrip("/") or "/"


# ---------------------------------------------------------------------------------------- one study
def study_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of study ``index``: its patient, slice geometry, noise and series order."""
    return np.random.default_rng([int(seed), 0x57D, int(index)])


def _make_study(task: dict) -> dict:
    """Render and write one study. Returns its series rows, coordinate rows and image count."""
    try:  # optional: the renderer's matrix products are small, extra BLAS threads only oversubscribe
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return _write_study(task)
    with threadpool_limits(limits=1, user_api="blas"):
        return _write_study(task)


def _write_study(task: dict) -> dict:
    cfg = task["cfg"]
    study_id = task["study_id"]
    sev = np.asarray(task["severity_ids"], dtype=int)
    rng = study_rng(cfg["seed"], task["index"])
    model = PatientModel.sample(rng, sev)
    stacks, volumes = _sample_and_render_series(model, cfg["size"], rng)
    order = rng.permutation(3)  # series numbers in a random acquisition order
    series_of = dict(zip(SERIES_TYPES, task["series_ids"]))
    n_images = _write_series(cfg, study_id, series_of, stacks, volumes, order)
    series_rows = [{"study_id": study_id, "series_id": series_of[st], "series_description": st} for st in SERIES_TYPES]
    return {"series": series_rows, "coords": _coordinate_rows(model, sev, stacks, series_of, study_id), "n_images": n_images}


def _sample_and_render_series(model: PatientModel, size: str, rng: np.random.Generator):
    """Slice geometry and rendered volume of each series type (the two sagittal series share their
    geometry half of the time, and are then rendered in one pass)."""
    sag_t1 = sample_labelled_geometry(model, "sagittal", SAGITTAL_T1, size, rng)
    shared = rng.random() < 0.5
    sag_t2 = sample_labelled_geometry(model, "sagittal", SAGITTAL_T2, size, rng, like=sag_t1 if shared else None)
    axial = sample_labelled_geometry(model, "axial", AXIAL_T2, size, rng)
    t2_contrast = "STIR" if model.stir else "T2"
    if shared and sag_t2.positions.shape == sag_t1.positions.shape and np.allclose(sag_t2.positions, sag_t1.positions):
        both = render_series(model, sag_t1, ["T1", t2_contrast], rng, size)
        volumes = {SAGITTAL_T1: both[0], SAGITTAL_T2: both[1]}
    else:
        volumes = {
            SAGITTAL_T1: render_series(model, sag_t1, ["T1"], rng, size)[0],
            SAGITTAL_T2: render_series(model, sag_t2, [t2_contrast], rng, size)[0],
        }
    volumes[AXIAL_T2] = render_series(model, axial, ["T2"], rng, size)[0]
    return {SAGITTAL_T1: sag_t1, SAGITTAL_T2: sag_t2, AXIAL_T2: axial}, volumes


def _write_series(cfg: dict, study_id: int, series_of: dict, stacks: dict, volumes: dict, order: np.ndarray) -> int:
    """Write the three series as DICOM; returns the number of images written."""
    fs, root = filesystem_and_root(cfg["root"])
    study_uid = uid_for("study", cfg["seed"], study_id)
    n_images = 0
    for k, st in enumerate(SERIES_TYPES):
        series_id = series_of[st]
        stack = stacks[st]
        paths = write_mr_series(
            f"{root}/{cfg['split']}_images/{study_id}/{series_id}",
            volumes[st],
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
    return n_images


def _coordinate_rows(model: PatientModel, sev: np.ndarray, stacks: dict[str, SliceStack], series_of: dict, study_id: int) -> list[dict]:
    """Rows of ``train_label_coordinates.csv``: each labelled point on the instance nearest it."""
    rows = []
    for t in TARGETS:
        if sev[t.index] < 0:
            continue  # missing label: no coordinate, like the real file
        stack = stacks[t.series_type]
        k, x, y, _ = stack.project(model.label_point(t))
        rows.append(
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
    return rows


# ---------------------------------------------------------------------------------------- data set
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
    SynthConfig(n_studies=n_studies, seed=seed, split=split, size=size, labels_csv=labels_csv)  # validates
    t0 = time.perf_counter()
    fs, root = filesystem_and_root(out)
    fs.makedirs(f"{root}/{split}_images", exist_ok=True)
    labels = sample_label_vectors(n_studies, seed, labels_csv)
    study_ids, series_ids = draw_ids(seed, n_studies)
    base = {"seed": int(seed), "split": split, "size": size, "root": os.fspath(out)}
    tasks = [
        {"cfg": base, "index": i, "study_id": study_ids[i], "series_ids": series_ids[i],
         "severity_ids": severity_ids_of(labels.iloc[i]).tolist()}
        for i in range(n_studies)
    ]
    if workers > 1 and n_studies > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
            results = list(ex.map(_make_study, tasks, chunksize=1))
    else:
        results = [_make_study(t) for t in tasks]

    n_series, n_coords = _write_tables(fs, root, split, labels, study_ids, results)
    summary = SynthSummary(
        root=os.fspath(out),
        split=split,
        size=size,
        seed=int(seed),
        n_studies=n_studies,
        n_series=n_series,
        n_images=sum(r["n_images"] for r in results),
        n_coordinates=n_coords,
        study_ids=sorted(study_ids),
        seconds=time.perf_counter() - t0,
    )
    log.info("synthesized %d %s studies (%s) in %.1f s at %s", n_studies, split, size, summary.seconds, out)
    return summary


def _write_tables(fs, root: str, split: str, labels: pd.DataFrame, study_ids: list[int], results: list[dict]) -> tuple[int, int]:
    """The split's series descriptions and, for train, ``train.csv`` and the label coordinates;
    returns (series rows, coordinate rows)."""
    series = pd.DataFrame([r for res in results for r in res["series"]], columns=list(SERIES_COLUMNS))
    series = series.sort_values(["study_id", "series_id"], kind="stable").reset_index(drop=True)
    _write_csv(fs, f"{root}/{split}_series_descriptions.csv", series)
    if split != "train":
        return len(series), 0
    train = labels.drop(columns=["source_study_id"]).copy()
    train.insert(0, "study_id", study_ids)
    train = train.sort_values("study_id", kind="stable").reset_index(drop=True)
    _write_csv(fs, f"{root}/train.csv", train)
    coords = pd.DataFrame([r for res in results for r in res["coords"]], columns=list(COORDINATE_COLUMNS))
    if len(coords):
        coords = coords.sort_values(["study_id", "condition"], kind="stable").reset_index(drop=True)
    _write_csv(fs, f"{root}/train_label_coordinates.csv", coords)
    return len(series), len(coords)


def study_ids_of(summary: SynthSummary) -> list[int]:
    """The study ids a :func:`synthesize` call wrote (sorted)."""
    return sorted(int(s) for s in summary.study_ids)


def list_study_ids(root, split: str = "train") -> list[int]:
    """Sorted study ids listed in ``{root}/{split}_series_descriptions.csv``."""
    fs, r = filesystem_and_root(root)
    with fs.open(f"{r}/{split}_series_descriptions.csv", "rb") as f:
        sd = pd.read_csv(f)
    return sorted(int(v) for v in sd.study_id.unique())
