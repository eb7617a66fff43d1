"""Training examples cut from labelled studies: scorer crops at the labelled points, and the
labelled slices with their points for the detectors. Pure functions over one study; the Ray job
maps them over studies in parallel."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lumbar_ray.config import DetectorConfig, ScorerConfig
from lumbar_ray.models.detector import DetectorSample, samples_from_series
from lumbar_ray.dicom.read import DicomReadError, Series, read_study
from lumbar_ray.models.deepscorenet import extract_crops
from lumbar_ray.targets import TARGETS

log = logging.getLogger(__name__)

POINT_COLUMNS = ["study_id", "series_id", "instance_number", "condition", "level", "column", "target_index", "label", "x", "y"]


@dataclass
class StudyExamples:
    study_id: int
    crops: np.ndarray  # (n, C, 32, 32) float32
    points: pd.DataFrame  # POINT_COLUMNS, row i <-> crops[i]
    # labelled slices for the detectors, by series type
    slices: dict[str, list[DetectorSample]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what could not be used, and why


def _find_series(study, series_id: int) -> Series | None:
    for series in [*study.series.values(), *study.other_series]:
        if int(series.series_id) == int(series_id):
            return series
    return None


def study_examples(root: str, study_id: int, points: pd.DataFrame, scorer: ScorerConfig,
                   split: str = "train", descriptions: pd.DataFrame | None = None,
                   with_slices: bool = True, negatives: int = 0, negative_gap: int | None = None) -> StudyExamples:
    """Crops (and detector slices) for one study's labelled points; ``negatives`` and
    ``negative_gap``: unlabelled slices per series for the detectors (see
    :func:`lumbar_ray.models.detector.samples_from_series`; gap None: the series type's
    :data:`lumbar_ray.models.detector.DEFAULT_NEGATIVE_GAP`).

    A point whose series or instance cannot be read is recorded in ``problems``, never dropped
    silently.
    """
    problems: list[str] = []
    crops, kept = [], []
    slices: dict[str, list[DetectorSample]] = {}
    try:
        study = read_study(root, study_id, split=split, descriptions=descriptions)
    except DicomReadError as exc:
        return StudyExamples(int(study_id), np.zeros((0, 3, 32, 32), np.float32),
                             pd.DataFrame(columns=POINT_COLUMNS), {}, [f"study {study_id}: {exc}"])
    for skipped in study.skipped:
        problems.append(f"study {study_id}: skipped {skipped.path}: {skipped.reason}")
    n_channels = 3
    for series_id, group in points.groupby("series_id", sort=True):
        series = _find_series(study, series_id)
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
        crops.append(extract_crops(series.volume, pts, channels=scorer.channels, mm=scorer.crop_mm,
                                   pixel_spacing=tuple(series.pixel_spacing), n_channels=n_channels))
        kept.extend(r for *_, r in rows)
        if with_slices:
            # The coordinates say which series type the points were labelled on.
            series_type = TARGETS[int(group["target_index"].iloc[0])].series_type
            slices.setdefault(series_type, []).extend(
                samples_from_series(series, group, series_type, negatives=negatives, negative_gap=negative_gap))
    frame = pd.DataFrame([{c: getattr(r, c) for c in POINT_COLUMNS} for r in kept], columns=POINT_COLUMNS)
    all_crops = np.concatenate(crops) if crops else np.zeros((0, n_channels, 32, 32), np.float32)
    return StudyExamples(int(study_id), all_crops.astype(np.float32), frame, slices, problems)
