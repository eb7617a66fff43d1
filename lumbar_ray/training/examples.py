"""Training examples cut from labelled studies: scorer crops at the labelled points (and at the
slices either side, the slice noise the grader trains with), and the labelled slices with their
points for the detectors; one study at a time (pure), or every study
in parallel Ray tasks, pooled for the trials."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lumbar_ray.config import ScorerConfig, TrainConfig
from lumbar_ray.training.detector_data import DetectorSample, samples_from_series
from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.dicom.read import load_descriptions, read_study
from lumbar_ray.models.crops import CROP_SIZE, extract_crops, extract_neighbour_crops
from lumbar_ray.storage import ray_remote_args_with_storage_env
from lumbar_ray.targets import SERIES_TYPES, TARGETS

log = logging.getLogger(__name__)

POINT_COLUMNS = ["study_id", "series_id", "instance_number", "condition", "level", "column", "target_index", "label", "x", "y"]


@dataclass
class StudyExamples:
    """One study's training examples."""

    study_id: int
    crops: np.ndarray  # (n, C, 32, 32) float32
    points: pd.DataFrame  # POINT_COLUMNS, row i <-> crops[i]
    # labelled slices for the detectors, by series type
    slices: dict[str, list[DetectorSample]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what could not be used, and why
    # (n, 2, C, 32, 32) float32: crops[i]'s point on slices k-1 and k+1 of its slab (a copy of
    # crops[i] where the slab ends), for the grader's slice jitter (training.crop_data).
    # Memory: 2 x C x 32 x 32 float32 = 24 KiB more per labelled point (C = 3) beside its crop's
    # 12 KiB, so the examples triple: ~120 MB more for the ~5,000 points of 200 studies, ~1.2 GB
    # for the RSNA training set's ~49,000. They sit once in the object store; each scorer worker
    # copies its training folds' rows (as it does the crops).
    neighbour_crops: np.ndarray | None = None


def empty_crops(n_channels: int = 3, neighbours: bool = False) -> np.ndarray:
    """No crops: (0, C, 32, 32), or (0, 2, C, 32, 32) for the neighbour crops."""
    return np.zeros((0,) + ((2,) if neighbours else ()) + (n_channels, CROP_SIZE, CROP_SIZE), np.float32)


def study_examples(root: str, study_id: int, points: pd.DataFrame, scorer: ScorerConfig,
                   split: str = "train", descriptions: pd.DataFrame | None = None,
                   with_slices: bool = True, negatives: int = 0, negative_gap: int | None = None) -> StudyExamples:
    """Crops (and detector slices) for one study's labelled points; ``negatives`` and
    ``negative_gap``: unlabelled slices per series for the detectors (see
    :func:`lumbar_ray.training.detector_data.samples_from_series`; gap None: the series type's
    :data:`lumbar_ray.training.detector_data.DEFAULT_NEGATIVE_GAP`).

    A point whose series or instance cannot be read is recorded in ``problems``, never dropped
    silently. 2.5D crops and the neighbour crops stay within the point's slab
    (:meth:`lumbar_ray.dicom.series.Series.slab_ids`).
    """
    problems: list[str] = []
    crops, neighbour_crops, kept = [], [], []
    slices: dict[str, list[DetectorSample]] = {}
    try:
        study = read_study(root, study_id, split=split, descriptions=descriptions)
    except DicomReadError as exc:
        return StudyExamples(int(study_id), empty_crops(), pd.DataFrame(columns=POINT_COLUMNS), {},
                             [f"study {study_id}: {exc}"], empty_crops(neighbours=True))
    for skipped in study.skipped:
        problems.append(f"study {study_id}: skipped {skipped.path}: {skipped.reason}")
    n_channels = 3
    for series_id, group in points.groupby("series_id", sort=True):
        # a folder may yield several series (stacks of other sizes): the one holding the labels
        series = study.find_series(series_id, int(group["instance_number"].iloc[0]))
        if series is None:
            problems.append(f"study {study_id}: labelled series {series_id} not found")
            continue
        rows = []
        for row in group.itertuples(index=False):
            try:
                k = series.index_of_instance(int(row.instance_number))
            except (KeyError, ValueError, IndexError):
                problems.append(f"study {study_id}: series {series_id} has no instance {row.instance_number}")
                continue
            rows.append((k, float(row.x), float(row.y), row))
        if not rows:
            continue
        pts = np.array([(k, x, y) for k, x, y, _ in rows], dtype=np.float64)
        crop_args = dict(channels=scorer.channels, mm=scorer.crop_mm, pixel_spacing=tuple(series.pixel_spacing),
                         n_channels=n_channels)
        slab_ids = series.slab_ids()
        crops.append(extract_crops(series.volume, pts, slab_ids=slab_ids, **crop_args))
        neighbour_crops.append(extract_neighbour_crops(series.volume, pts, slab_ids=slab_ids, **crop_args))
        kept.extend(r for *_, r in rows)
        if with_slices:
            # The coordinates say which series type the points were labelled on.
            series_type = TARGETS[int(group["target_index"].iloc[0])].series_type
            slices.setdefault(series_type, []).extend(
                samples_from_series(series, group, series_type, negatives=negatives, negative_gap=negative_gap))
    frame = pd.DataFrame([{c: getattr(r, c) for c in POINT_COLUMNS} for r in kept], columns=POINT_COLUMNS)
    all_crops = np.concatenate(crops) if crops else empty_crops(n_channels)
    all_neighbours = np.concatenate(neighbour_crops) if neighbour_crops else empty_crops(n_channels, neighbours=True)
    return StudyExamples(int(study_id), all_crops.astype(np.float32), frame, slices, problems,
                         all_neighbours.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Every study's examples, cut once by Ray tasks and shared by every trial through the object store
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingExamples:
    """Every study's training examples, pooled."""

    crops: np.ndarray  # (N, C, 32, 32)
    points: pd.DataFrame  # POINT_COLUMNS, row i <-> crops[i]
    slices: dict  # series type -> list[DetectorSample]
    problems: list[str]
    # (N, 2, C, 32, 32): crops[i] on the slices either side (StudyExamples.neighbour_crops)
    neighbour_crops: np.ndarray | None = None


def _examples_for_studies(root: str, split: str, study_ids: list[int], points: pd.DataFrame, scorer_cfg: dict,
                          with_slices: bool, negatives: int = 0, negative_gap: int | None = None) -> list[StudyExamples]:
    descriptions = load_descriptions(root, split)
    cfg = ScorerConfig(**scorer_cfg)
    return [study_examples(root, sid, points[points["study_id"] == sid], cfg, split=split,
                           descriptions=descriptions, with_slices=with_slices, negatives=negatives,
                           negative_gap=negative_gap) for sid in study_ids]


def prepare_examples(cfg: TrainConfig, points: pd.DataFrame, with_slices: bool) -> TrainingExamples:
    """Cut crops and labelled slices from every study, in parallel Ray tasks."""
    import ray  # heavy: ray; study_examples runs without it

    study_ids = sorted(points["study_id"].unique().tolist())
    n_chunks = max(1, min(len(study_ids), int(ray.cluster_resources().get("CPU", 1)) * 4))
    chunks = [c.tolist() for c in np.array_split(np.array(study_ids), n_chunks) if len(c)]
    task = ray.remote(**ray_remote_args_with_storage_env(num_cpus=1))(_examples_for_studies)
    refs = [task.remote(cfg.data, cfg.split, chunk, points[points["study_id"].isin(chunk)],
                        dataclasses.asdict(cfg.scorer), with_slices, cfg.detector.negatives,
                        cfg.detector.negative_gap) for chunk in chunks]
    per_study = [ex for part in ray.get(refs) for ex in part]
    with_crops = [ex for ex in per_study if len(ex.crops)]
    frames = [ex.points for ex in per_study if len(ex.points)]
    return TrainingExamples(
        crops=np.concatenate([ex.crops for ex in with_crops]) if with_crops else empty_crops(),
        points=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        slices={st: [s for ex in per_study for s in ex.slices.get(st, [])] for st in SERIES_TYPES},
        problems=[p for ex in per_study for p in ex.problems],
        neighbour_crops=(np.concatenate([ex.neighbour_crops for ex in with_crops]) if with_crops
                         else empty_crops(neighbours=True)),
    )
