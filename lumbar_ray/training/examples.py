"""Training examples cut from labelled studies: scorer crops at the labelled points (and at the
slices either side, the slice noise the grader trains with), and the labelled slices with their
points for the detectors; one study at a time (pure), or every study in parallel Ray tasks that
write them as shard files on the run's storage (training/shards.py): per chunk of one fold's
studies and, for the detector slices, per series type."""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lumbar_ray import storage
from lumbar_ray.config import ScorerConfig, TrainConfig
from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.dicom.read import load_descriptions, read_study
from lumbar_ray.models.crops import CROP_SIZE, extract_crops, extract_neighbour_crops
from lumbar_ray.storage import ray_remote_args_with_storage_env
from lumbar_ray.targets import SERIES_TYPES, TARGETS
from lumbar_ray.training.detector_data import DetectorSample, samples_from_series
from lumbar_ray.training.shards import (
    STUDIES_PER_CHUNK, ChunkEntry, Manifest, chunk_studies, crops_file, npz_bytes, pack_samples, points_file,
    remove_examples, slices_file,
)

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
    # for the RSNA training set's ~49,000. They go to the shards with the crops; a scorer worker
    # holds a few chunks of them at a time (training/shards.py).
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
# Every study's examples, cut by Ray tasks into shard files on the run's storage
# ---------------------------------------------------------------------------------------------


@dataclass
class ExamplesSummary:
    """What the driver keeps of a run's examples: where the shards are, counts and problems."""

    root: str  # the examples folder (training.shards.examples_dir), its manifest.json inside
    n_crops: int
    n_slices: dict[str, int]  # series type -> detector slices
    channels: int
    problems: list[str]
    chunks: list[ChunkEntry]  # the manifest's entries: per chunk its fold, studies and counts


def write_chunk(root: str, chunk: int, fold: int | None, examples: list[StudyExamples],
                series_types: tuple[str, ...] = SERIES_TYPES) -> ChunkEntry:
    """Write one chunk's shards (scorer crops and points; detector slices per series type with
    any) and return its manifest entry, with the problems met."""
    with_crops = [ex for ex in examples if len(ex.crops)]
    frames = [ex.points for ex in examples if len(ex.points)]
    crops = np.concatenate([ex.crops for ex in with_crops]) if with_crops else empty_crops()
    neighbours = (np.concatenate([ex.neighbour_crops for ex in with_crops]) if with_crops
                  else empty_crops(neighbours=True))
    points = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=POINT_COLUMNS)
    storage.write_bytes(crops_file(root, chunk), npz_bytes(crops=crops.astype(np.float32),
                                                          neighbours=neighbours.astype(np.float32)))
    buffer = io.BytesIO()
    points.to_parquet(buffer, index=False)
    storage.write_bytes(points_file(root, chunk), buffer.getvalue())
    n_slices = {}
    for series_type in series_types:
        samples = [s for ex in examples for s in ex.slices.get(series_type, [])]
        if samples:
            # uint8 slices deflate well; a trial decodes each chunk once per epoch
            storage.write_bytes(slices_file(root, series_type, chunk), npz_bytes(True, **pack_samples(samples)))
        n_slices[series_type] = len(samples)
    return ChunkEntry(chunk, fold, [int(ex.study_id) for ex in examples], len(crops), n_slices,
                      [p for ex in examples for p in ex.problems], int(crops.shape[1]))


def cut_chunk(root: str, split: str, out: str, chunk: int, fold: int | None, study_ids: list[int],
              points: pd.DataFrame, scorer_cfg: dict, with_slices: bool, negatives: int = 0,
              negative_gap: int | None = None) -> ChunkEntry:
    """One task's work: cut the examples of a few studies and write them as chunk ``chunk``'s
    shards under ``out``; only the small manifest entry goes back."""
    descriptions = load_descriptions(root, split)
    cfg = ScorerConfig(**scorer_cfg)
    examples = [study_examples(root, sid, points[points["study_id"] == sid], cfg, split=split,
                               descriptions=descriptions, with_slices=with_slices, negatives=negatives,
                               negative_gap=negative_gap) for sid in study_ids]
    return write_chunk(out, chunk, fold, examples)


def cut_examples(cfg: TrainConfig, points: pd.DataFrame, folds: pd.DataFrame, out: str, with_slices: bool,
                 per_chunk: int = STUDIES_PER_CHUNK) -> ExamplesSummary:
    """Cut crops and labelled slices from every study in parallel Ray tasks, a chunk of one
    fold's studies each, into shards under ``out`` (any earlier shards there are removed first:
    a rerun of the same version never mixes two cuts). Writes the manifest; returns counts and
    problems only."""
    import ray  # heavy: ray; study_examples and write_chunk run without it

    remove_examples(out)
    fold_of = {int(s): int(f) for s, f in zip(folds["study_id"], folds["fold"])}
    study_folds = {int(s): fold_of.get(int(s)) for s in points["study_id"].unique()}
    task = ray.remote(**ray_remote_args_with_storage_env(num_cpus=1))(cut_chunk)
    refs = [task.remote(cfg.data, cfg.split, out, i, fold, chunk, points[points["study_id"].isin(chunk)],
                        dataclasses.asdict(cfg.scorer), with_slices, cfg.detector.negatives, cfg.detector.negative_gap)
            for i, (fold, chunk) in enumerate(chunk_studies(study_folds, per_chunk))]
    entries = ray.get(refs)
    channels = next((e.channels for e in entries if e.n_crops), 3)
    Manifest(out, entries, channels).write()
    return ExamplesSummary(out, sum(e.n_crops for e in entries),
                           {st: sum(e.n_slices.get(st, 0) for e in entries) for st in SERIES_TYPES},
                           channels, [p for e in entries for p in e.problems],
                           [dataclasses.replace(e, problems=[]) for e in entries])
