"""Synthetic RSNA 2024 studies: real DICOM series of a lumbar phantom, in the Kaggle layout.

``synthesize(out, n_studies, seed)`` writes::

    {out}/{split}_images/{study_id}/{series_id}/{instance_number}.dcm
    {out}/{split}_series_descriptions.csv
    {out}/train.csv, {out}/train_label_coordinates.csv        (split == "train" only)

Every study has a Sagittal T1, a Sagittal T2/STIR and an Axial T2 series rendered from one
:class:`~lumbar_ray.synth.anatomy.PatientModel`. With ``acquisitions="realistic"`` (the default)
they are acquired like real archives (:mod:`lumbar_ray.synth.protocols`: per-level angled axial
slabs, axial coverage split over two series, a repeated sagittal series, missing slices, oblique
sagittal planes); ``"simple"`` gives exactly one plain stack per type (the original generator's
pixels and geometry; only the sentinel patient elements of :mod:`lumbar_ray.synth.phi` are new). A study and its simple twin (same seed) share patient, ids and labels. Its 25
severities are the label vector of a real study sampled from the RSNA 2024 ``train.csv``
(:mod:`lumbar_ray.synth.labels`), missing labels included: they stay empty in the synthetic
``train.csv`` and get no coordinate row, while the anatomy there shows a random severity.
Coordinates point at the labelled structure on the instance through it, like the real
``train_label_coordinates.csv``.

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
from lumbar_ray.synth.geometry import SeriesGeometry, SliceStack, sample_labelled_geometry
from lumbar_ray.synth.phi import patient_tags
from lumbar_ray.synth.labels import sample_label_vectors, severity_ids_of
from lumbar_ray.synth.protocols import ACQUISITIONS, AcquisitionPlan, acquire, draw_plan, locate_labels, series_numbers
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES, TARGETS

log = logging.getLogger(__name__)

__all__ = [
    "SynthConfig",
    "SynthSummary",
    "synthesize",
    "draw_ids",
    "draw_extra_ids",
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
    acquisitions: str = "realistic"  # or "simple": one plain stack per series type

    def __post_init__(self):
        if self.acquisitions not in ACQUISITIONS:
            raise ValueError(f"acquisitions must be one of {ACQUISITIONS}, got {self.acquisitions!r}")
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


def draw_extra_ids(seed: int, n_studies: int, taken: list[int] | list[list[int]], per_study: int = 2) -> list[list[int]]:
    """Series ids for the extra series of realistic studies (a second axial series, a repeat):
    ``per_study`` per study from their own stream, so :func:`draw_ids` (and simple mode) is
    unchanged; distinct from every id in ``taken`` (nested lists are flattened)."""
    seen = {int(v) for t in taken for v in (t if isinstance(t, list) else [t])}
    out = []
    for i in range(n_studies):
        rng = np.random.default_rng([int(seed), 0xE17A, i])
        ids: list[int] = []
        while len(ids) < per_study:
            v = int(rng.integers(1_000_000, 4_294_967_295))
            if v not in seen:
                seen.add(v)
                ids.append(v)
        out.append(ids)
    return out


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
    if cfg["acquisitions"] == "realistic":
        return _write_realistic_study(task, model, sev, rng)
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
    n_images = 0
    for k, st in enumerate(SERIES_TYPES):
        stack = stacks[st]
        n_images += _write_dicom_series(cfg, study_id, series_of[st], st, int(order[k]) + 1, volumes[st], stack.orientation,
                                        stack.positions, stack.pixel_spacing, stack.slice_thickness, stack.instance_numbers)
    return n_images


def _write_dicom_series(cfg: dict, study_id: int, series_id: int, description: str, number: int, volume, orientation,
                        positions, pixel_spacing, slice_thickness: float, instance_numbers) -> int:
    """Write one series (every series of both modes goes through here); returns its image count.
    ``orientation``: 6 cosines, or (n, 6), one per slice."""
    fs, root = filesystem_and_root(cfg["root"])
    paths = write_mr_series(
        f"{root}/{cfg['split']}_images/{study_id}/{series_id}",
        volume,
        study_uid=uid_for("study", cfg["seed"], study_id),
        series_uid=uid_for("series", cfg["seed"], study_id, series_id),
        study_id=study_id,
        series_description=description,
        series_number=number,
        image_orientation=orientation,
        positions=positions,
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_thickness,
        instance_numbers=instance_numbers,
        patient=patient_tags(study_id),  # sentinel PHI: tests prove no output or log repeats it
        fs=fs,
    )
    return len(paths)


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


def _write_realistic_study(task: dict, model: PatientModel, sev: np.ndarray, rng: np.random.Generator) -> dict:
    """One study acquired like a real archive (:mod:`lumbar_ray.synth.protocols`)."""
    cfg, study_id = task["cfg"], task["study_id"]
    plan = task.get("plan") or draw_plan(cfg["seed"], task["index"])
    series = acquire(model, plan, cfg["size"], rng)
    base = dict(zip(SERIES_TYPES, task["series_ids"]))
    extra = iter(task["extra_series_ids"])
    ids = [base[s.series_type] if s.role in ("sagittal_t1", "sagittal_t2", "axial") else next(extra) for s in series]
    numbers = series_numbers(series, rng)
    n_images = 0
    for s, series_id, number in zip(series, ids, numbers):
        g: SeriesGeometry = s.geometry
        n_images += _write_dicom_series(cfg, study_id, series_id, s.series_type, number, s.volume, g.orientations, g.positions,
                                        g.parts[0].pixel_spacing, g.parts[0].slice_thickness, g.instance_numbers)
    series_rows = [{"study_id": study_id, "series_id": i, "series_description": s.series_type} for s, i in zip(series, ids)]
    coords = []
    located = locate_labels(model, series)
    if len(located) != len(TARGETS):  # acquire() always gives every type a labelled series
        raise RuntimeError(f"study {study_id}: {len(located)} of {len(TARGETS)} targets located")
    for loc in located:
        t = TARGETS[loc.target_index]
        if sev[t.index] < 0:
            continue  # missing label: no coordinate, like the real file
        g = series[loc.series].geometry
        coords.append({"study_id": study_id, "series_id": ids[loc.series], "instance_number": int(g.instance_numbers[loc.slice]),
                       "condition": t.condition.name, "level": t.level, "x": float(loc.x), "y": float(loc.y)})
    return {"series": series_rows, "coords": coords, "n_images": n_images}


# ---------------------------------------------------------------------------------------- data set
def _write_csv(fs, path: str, df: pd.DataFrame) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue().encode())


def synthesize(out, n_studies: int, seed: int, split: str = "train", size: str = "full", labels_csv: str | None = None,
               workers: int = 1, acquisitions: str = "realistic",
               plans: list[AcquisitionPlan | None] | None = None) -> SynthSummary:
    """Write ``n_studies`` synthetic studies under ``out`` (local path or fsspec URL).

    Deterministic for ``seed``: the same arguments give byte-identical files (``workers`` does
    not change the output). ``acquisitions``: "realistic" (real-archive patterns, see
    :mod:`lumbar_ray.synth.protocols`) or "simple" (one plain stack per series type).
    ``plans``: per study, an :class:`AcquisitionPlan` in place of the drawn one (None: drawn);
    for tests that need a given pattern. Returns a :class:`SynthSummary`.
    """
    SynthConfig(n_studies=n_studies, seed=seed, split=split, size=size, labels_csv=labels_csv,
                acquisitions=acquisitions)  # validates
    if plans is not None and (acquisitions != "realistic" or len(plans) != n_studies):
        raise ValueError("plans needs acquisitions='realistic' and one entry (or None) per study")
    t0 = time.perf_counter()
    fs, root = filesystem_and_root(out)
    fs.makedirs(f"{root}/{split}_images", exist_ok=True)
    labels = sample_label_vectors(n_studies, seed, labels_csv)
    study_ids, series_ids = draw_ids(seed, n_studies)
    extra_ids = draw_extra_ids(seed, n_studies, [study_ids, *series_ids]) if acquisitions == "realistic" else [[]] * n_studies
    base = {"seed": int(seed), "split": split, "size": size, "root": os.fspath(out), "acquisitions": acquisitions}
    tasks = [
        {"cfg": base, "index": i, "study_id": study_ids[i], "series_ids": series_ids[i], "extra_series_ids": extra_ids[i],
         "severity_ids": severity_ids_of(labels.iloc[i]).tolist(), "plan": plans[i] if plans is not None else None}
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
