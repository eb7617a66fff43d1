"""A detector trial's validation studies, read once and graded every validation round: whole-
series detection -> the targets chosen as scoring chooses them -> one record per labelled target
(:func:`~lumbar_ray.training.detector_eval.detector_hit_rates`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import pandas as pd

from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.dicom.read import load_descriptions, read_study
from lumbar_ray.dicom.series import Series, Study
from lumbar_ray.models.detector_inference import Detection, detect_series
from lumbar_ray.models.levels import (
    LocatedDetection, assign_slices_to_levels, level_points, select_axial_by_level, select_axial_whole_series,
)
from lumbar_ray.models.target_selection import select_target_detections
from lumbar_ray.targets import AXIAL_T2, TARGETS, targets_for_series
from lumbar_ray.training.detector_eval import HitRates, detector_hit_rates

log = logging.getLogger(__name__)

SPINAL_TARGETS = [t.index for t in TARGETS if t.family == "spinal"]
MIB = 1024 * 1024


class ValidationStudies:
    """The studies a detector is graded on, for every round of one trial attempt.

    Each study is read once (on the first round) and only the series the grading uses are kept:
    the series of the detector's type and those its labelled points are on; for Axial T2 also the
    series of the labelled spinal-canal points, whose geometry places the levels. Memory bound:
    kept series are held until their volumes fill ``cache_mb`` MiB; studies beyond that are read
    again every round (slower, never more memory), so the bound holds however large the fold is.
    A study that cannot be read is logged, listed in :attr:`unreadable` and skipped from then on.
    """

    def __init__(self, root: str, split: str, study_ids: Sequence[int], points: pd.DataFrame, series_type: str,
                 cache_mb: float):
        own_targets = [t.index for t in targets_for_series(series_type)]
        ids = {int(s) for s in study_ids}
        self.points = points[points["study_id"].astype(int).isin(ids)]
        own = self.points[self.points["target_index"].isin(own_targets)]
        self.root, self.split, self.series_type = root, split, series_type
        self.own = {int(s): rows for s, rows in own.groupby("study_id")}
        self.study_ids = sorted(self.own)  # studies with nothing of this type labelled grade nothing
        self.cache_bytes = float(cache_mb) * MIB
        self.held_bytes = 0
        self.cache: dict[int, Study] = {}
        self.unreadable: dict[int, str] = {}
        self.descriptions = None

    def __len__(self) -> int:
        return len(self.study_ids)

    def __iter__(self) -> Iterator[tuple[int, Study, pd.DataFrame, pd.DataFrame]]:
        """(study id, its kept series, its labelled rows of this series type, all its labelled
        points) per readable study."""
        for sid in self.study_ids:
            if sid in self.unreadable:
                continue
            study = self.cache.get(sid) or self.read(sid)
            if study is not None:
                yield sid, study, self.own[sid], self.points[self.points["study_id"].astype(int) == sid]

    def read(self, sid: int) -> Study | None:
        if self.descriptions is None:
            self.descriptions = load_descriptions(self.root, self.split)
        try:
            study = read_study(self.root, int(sid), split=self.split, descriptions=self.descriptions)
        except DicomReadError as exc:
            log.warning("validation study %s unreadable: %s", sid, exc)
            self.unreadable[sid] = str(exc)
            return None
        kept = self.kept_series(study, sid)
        study = Study(study_id=study.study_id, series={t: s for t, s in study.series.items() if id(s) in kept},
                      other_series=[s for s in study.other_series if id(s) in kept])
        size = sum(int(s.volume.nbytes) for s in study.all_series())
        if self.held_bytes + size <= self.cache_bytes:
            self.cache[sid] = study
            self.held_bytes += size
        return study

    def kept_series(self, study: Study, sid: int) -> set[int]:
        """ids (``id()``) of the series the grading of study ``sid`` uses."""
        wanted = list(study.series_of_type(self.series_type))
        rows = self.own[sid]
        if self.series_type == AXIAL_T2:
            study_points = self.points[self.points["study_id"].astype(int) == sid]
            rows = pd.concat([rows, study_points[study_points["target_index"].isin(SPINAL_TARGETS)]])
        for row in rows[["series_id", "instance_number"]].itertuples(index=False):
            series = study.find_series(row.series_id, int(row.instance_number))
            if series is not None:
                wanted.append(series)
        return {id(s) for s in wanted}


def validation_records(model, studies: ValidationStudies, conf: float, device) -> tuple[pd.DataFrame, dict]:
    """Whole-series detection on the validation studies -> (one record per labelled target, the
    merged :meth:`HitRates.as_dict`).

    Each labelled series is graded whole and its targets chosen as scoring chooses them. Axial
    targets are chosen per level among every axial series of the study
    (:func:`lumbar_ray.models.levels.select_axial_by_level`), the levels placed in 3-D from the
    study's *labelled* canal points on its sagittal series: this measures the axial detector
    with its levels given (a diagnostic; scoring places them from the sagittal detections). A
    canal level that the "ordered" rule placed between its neighbours (no box fitted there)
    counts as detected, at its placed point: it is what scoring crops."""
    series_type = studies.series_type
    parts, records = [], []
    for sid, study, rows, study_points in studies:
        if series_type == AXIAL_T2:
            selected = axial_selection_at_labelled_levels(model, study, study_points, conf, device)
        for series_id, srows in rows.groupby("series_id"):
            series = study.find_series(series_id, int(srows["instance_number"].iloc[0]))
            if series is None:
                continue
            if series_type == AXIAL_T2:
                chosen = {i: (located.detection if located is not None and located.series is series else None)
                          for i, located in selected.items()}
            else:
                chosen = select_target_detections(detect_series(model, series, conf=conf, device=device),
                                                  series_type, series)
            hits = detector_hit_rates(chosen, srows, series)
            parts.append(hits)
            for rec in hits.records:
                records.append({"study_id": int(sid), "series_id": int(series_id), **rec})
    merged = HitRates.merge(parts)
    return pd.DataFrame(records), merged.as_dict()


def axial_selection_at_labelled_levels(model, study: Study, study_points: pd.DataFrame, conf: float,
                                       device) -> dict[int, LocatedDetection | None]:
    """{axial target index: LocatedDetection | None}: the detector run over every axial series
    of the study, targets chosen per level, the levels' 3-D points from the labelled canal
    points (none labelled: each series' own most confident detection per class)."""
    canal = {}
    for row in study_points[study_points["target_index"].isin(SPINAL_TARGETS)].itertuples(index=False):
        series = study.find_series(row.series_id, int(row.instance_number))
        if series is not None and (series.instance_numbers == int(row.instance_number)).any():
            k = series.index_of_instance(int(row.instance_number))
            canal[int(row.target_index)] = LocatedDetection(
                series, Detection(0, k, int(row.instance_number), float(row.x), float(row.y), 1.0))
    found: list[tuple[Series, list[Detection]]] = [
        (series, detect_series(model, series, conf=conf, device=device)) for series in study.series_of_type(AXIAL_T2)]
    targets = targets_for_series(AXIAL_T2)
    levels = level_points(canal)
    if not levels:
        return select_axial_whole_series(found, targets)
    return select_axial_by_level([(s, d, assign_slices_to_levels(s, levels)) for s, d in found], targets)
