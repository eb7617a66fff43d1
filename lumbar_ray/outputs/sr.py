"""DICOM Structured Reports of the scoring results: one SR per study, for a PACS to show beside
the images.

Each SR is a Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom) with one
measurement group per target (25, in the targets table's order):

* tracking identifier: the target's column (e.g. ``left_neural_foraminal_narrowing_l4_l5``), with
  a new tracking UID;
* finding: the condition (:mod:`lumbar_ray.outputs.sr_codes`); finding site: the level's disc,
  with the laterality for left/right conditions;
* qualitative evaluations: *Severity* = the graded class (argmax of the probabilities:
  Normal/Mild, Moderate, Severe), and *Target localization* = localized / not localized;
* measurements (unit ``1``, exact floats in FloatingPointValue): the three class probabilities
  as stored in the predictions row, and for a localized target the detection confidence;
* algorithm identification: ``lumbar-ray DeepScoreNet``, version = the model version, parameter
  ``run_id=...``;
* a localized target (``detected``) is a planar ROI group (TID 1410) whose image region is a
  SCOORD POINT on the source instance (series_id + instance_number of the row). DICOM image
  coordinates put the top-left corner of the first pixel at (0, 0), the repository's pixel
  coordinates put its centre there, so the point is ``(x + 0.5, y + 0.5)``. A target that was not
  localized is a TID 1501 group without any image reference.

Patient and study identifiers (StudyInstanceUID, patient module, accession number, study date)
are copied by highdicom from the source instances (the evidence); only empty values are added
for Type 2 elements the source lacks. The SR series and instance get new UIDs. Source headers
come from :func:`lumbar_ray.dicom.read.read_study` (the same series and instance the scorer
chose), so the data root may be any URL the reader takes.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import highdicom as hd
import numpy as np
import pandas as pd
import pyarrow as pa
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lumbar_ray import storage
from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.dicom.files import read_image
from lumbar_ray.dicom.read import load_descriptions, read_study, require_split
from lumbar_ray.dicom.series import id_sort_key
from lumbar_ray.errors import StorageUnavailableError
from lumbar_ray.outputs import sr_codes
from lumbar_ray.outputs.parallel import DEFAULT_STUDY_WORKERS, map_in_order
from lumbar_ray.outputs.schema import format_examples
from lumbar_ray.outputs.store import select_scores
from lumbar_ray.targets import PROBABILITY_COLUMNS, TARGET_BY_COLUMN, TARGETS

log = logging.getLogger(__name__)

__all__ = [
    "SR_SERIES_NUMBER",
    "SRSourceError",
    "SourceImages",
    "StudySR",
    "SRExport",
    "load_sources",
    "build_study_sr",
    "study_srs",
    "built_srs",
    "export_srs",
    "sr_path",
    "sr_bytes",
    "read_sr_findings",
]

# Series number of the SR series: past any an MR scanner gives its series, so viewers list it last.
SR_SERIES_NUMBER = 9901
# Where DICOM image coordinates put the first pixel's centre (its top-left corner is 0.0).
PIXEL_CENTRE = 0.5
# Type 2 patient/study elements highdicom reads from the first evidence instance; a source that
# lacks one gets it empty (never a made-up value).
_TYPE2_FROM_SOURCE = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                      "StudyID", "StudyDate", "StudyTime")
_PROBS = list(PROBABILITY_COLUMNS)


class SRSourceError(ValueError):
    """The source instances of a study cannot back its SR (named in the message)."""


@dataclass
class SourceImages:
    """Headers of the source instances one study's SR references."""

    by_instance: dict[tuple[str, int], Dataset]  # (series_id, instance_number) -> header
    representative: Dataset  # carries the patient and study modules when no target was localized

    def evidence(self) -> list[Dataset]:
        """Every referenced header (the representative first: highdicom copies the patient and
        study modules from the first one), each instance once."""
        seen: set[str] = set()
        out: list[Dataset] = []
        for ds in (self.representative, *self.by_instance.values()):
            if str(ds.SOPInstanceUID) not in seen:
                seen.add(str(ds.SOPInstanceUID))
                out.append(ds)
        return out


@dataclass
class StudySR:
    """One study's SR, or why it has none."""

    study_id: str
    dataset: hd.sr.Comprehensive3DSR | None = None
    error: str | None = None
    transient: bool = False  # storage failed transiently: running again may succeed


@dataclass
class SRExport:
    """What :func:`export_srs` wrote."""

    written: list[str] = field(default_factory=list)  # paths of the SRs written
    failed: dict[str, str] = field(default_factory=dict)  # study id -> one-line reason
    transient: list[str] = field(default_factory=list)  # failed studies that storage kept from being read


# --------------------------------------------------------------------------------------------
# Source instances


def _check_rows(study_id: str, rows: pd.DataFrame) -> None:
    columns = list(rows["column"])
    if sorted(columns) != sorted(t.column for t in TARGETS):
        missing = [t.column for t in TARGETS if t.column not in set(columns)]
        raise SRSourceError(f"study {study_id}: {len(rows)} prediction rows, an SR needs the {len(TARGETS)} targets "
                            f"once each" + (f"; missing {format_examples(missing)}" if missing else ""))


def _instance_of(row) -> tuple[str, int]:
    return str(row["series_id"]), int(row["instance_number"])


def load_sources(data_root: str | os.PathLike, study_id: str, rows: pd.DataFrame, split: str = "test",
                 descriptions=None) -> SourceImages:
    """Read the study (:func:`read_study`) and the header of each instance a localized row
    points at (series_id + instance_number, as the scorer chose them). SRSourceError when a
    row's series or instance is not in the study or the study has no readable series; the
    reader's DicomReadError / StorageUnavailableError pass through."""
    study = read_study(data_root, study_id, split=split, descriptions=descriptions)
    by_instance: dict[tuple[str, int], Dataset] = {}
    for _, row in rows[rows["detected"].astype(bool)].iterrows():
        series_id, instance = _instance_of(row)
        if (series_id, instance) in by_instance:
            continue
        series = study.find_series(series_id, instance)
        if series is None:
            raise SRSourceError(f"study {study_id}: {row['column']} points at series {series_id}, "
                                f"which the study at {data_root} does not hold")
        try:
            k = series.index_of_instance(instance)
        except KeyError:
            raise SRSourceError(f"study {study_id}: {row['column']} points at instance {instance}, "
                                f"which series {series_id} does not hold") from None
        by_instance[(series_id, instance)] = read_image(series.files[k]).dataset
    if by_instance:
        representative = next(iter(by_instance.values()))
    else:
        every = study.all_series()
        if not every:
            raise SRSourceError(f"study {study_id}: no readable series at {data_root}")
        representative = read_image(every[0].files[0]).dataset
    return SourceImages(by_instance, representative)


def _with_type2(header: Dataset) -> Dataset:
    """A copy of ``header`` in which the Type 2 patient/study elements it lacks are present and empty."""
    out = copy.deepcopy(header)
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


# --------------------------------------------------------------------------------------------
# Building


def _grade(probs: list[float]) -> int:
    return int(np.argmax(np.asarray(probs, dtype=np.float64)))


def _group(row, sources: SourceImages, algorithm: hd.sr.AlgorithmIdentification):
    target = TARGET_BY_COLUMN[row["column"]]
    probs = [float(row[c]) for c in _PROBS]
    measurements = [hd.sr.Measurement(name=name, value=p, unit=sr_codes.UNITLESS)
                    for name, p in zip(sr_codes.PROBABILITY_NAMES, probs, strict=True)]
    evaluations = [hd.sr.QualitativeEvaluation(sr_codes.SEVERITY, sr_codes.SEVERITY_VALUES[_grade(probs)])]
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=target.column),
        "finding_type": sr_codes.finding_code(target),
        "finding_sites": [hd.sr.FindingSite(sr_codes.level_code(target), laterality=sr_codes.laterality_code(target))],
        "algorithm_id": algorithm,
        "measurements": measurements,
        "qualitative_evaluations": evaluations,
    }
    if not bool(row["detected"]):
        evaluations.append(hd.sr.QualitativeEvaluation(sr_codes.LOCALIZATION, sr_codes.NOT_LOCALIZED))
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    evaluations.append(hd.sr.QualitativeEvaluation(sr_codes.LOCALIZATION, sr_codes.LOCALIZED))
    measurements.append(hd.sr.Measurement(name=sr_codes.DETECTION_CONFIDENCE, value=float(row["confidence"]),
                                          unit=sr_codes.UNITLESS))
    header = sources.by_instance[_instance_of(row)]
    point = np.array([[float(row["x"]) + PIXEL_CENTRE, float(row["y"]) + PIXEL_CENTRE]])
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=point,
        source_image=hd.sr.SourceImageForRegion(referenced_sop_class_uid=header.SOPClassUID,
                                                referenced_sop_instance_uid=header.SOPInstanceUID),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def build_study_sr(rows: pd.DataFrame, sources: SourceImages) -> hd.sr.Comprehensive3DSR:
    """The SR of one study from its 25 rows of a :func:`select_scores` frame (one model version,
    one run) and the headers of its source instances."""
    study_id = str(rows["study_id"].iloc[0])
    _check_rows(study_id, rows)
    version = str(rows["model_version"].iloc[0])
    run_id = str(rows["run_id"].iloc[0]) if "run_id" in rows else None
    algorithm = hd.sr.AlgorithmIdentification(name=sr_codes.ALGORITHM_NAME, version=version,
                                              parameters=[f"run_id={run_id}"] if run_id else None)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # one device UID per model version: the same algorithm is the same observer in every SR
            uid=pydicom.uid.generate_uid(entropy_srcs=[sr_codes.ALGORITHM_NAME, version]),
            name=sr_codes.DEVICE_NAME, model_name=sr_codes.ALGORITHM_NAME),
    )
    ordered = rows.sort_values("target_index", kind="stable") if "target_index" in rows else rows
    groups = [_group(row, sources, algorithm) for _, row in ordered.iterrows()]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=sr_codes.PROCEDURE,
        imaging_measurements=groups,
        title=sr_codes.TITLE,
    )
    evidence = sources.evidence()
    evidence[0] = _with_type2(evidence[0])
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=hd.UID(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=sr_codes.DEVICE_NAME,
            is_complete=True,
            series_description=f"lumbar-ray findings {version}"[:64],
            manufacturer_model_name=sr_codes.ALGORITHM_NAME,
            software_versions=version[:64],
            coding_schemes=[sr_codes.CODING_SCHEME],
        )
    except AttributeError as exc:  # a source header without the study's UIDs cannot anchor an SR
        raise SRSourceError(f"study {study_id}: source instance lacks {exc}") from None


def sr_bytes(dataset: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, dataset, enforce_file_format=True)
    return buf.getvalue()


def sr_path(to_dir: str | os.PathLike, study_id: str) -> str:
    """``{to_dir}/{study_id}.dcm``."""
    return storage.join(to_dir, f"{study_id}.dcm")


# --------------------------------------------------------------------------------------------
# Many studies


def study_srs(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    data_root: str | os.PathLike,
    *,
    split: str = "test",
    model_version: str | None = None,
    studies: Iterable[str | int] | None = None,
    workers: int = DEFAULT_STUDY_WORKERS,
) -> Iterator[StudySR]:
    """One :class:`StudySR` per study (``studies``, else every study of the scores, in study
    order), built lazily, ``workers`` studies at a time (:func:`map_in_order`). A study without
    its 25 rows, or whose source instances cannot be read, yields its error (one line) instead
    of an SR. Checked at once, before any SR is built:
    ValueError when the scores hold no predictions (of ``model_version``), DataLayoutError when
    ``data_root`` lacks the split."""
    frame = select_scores(scores, model_version)
    if frame.empty:
        where = os.fspath(scores) if isinstance(scores, (str, os.PathLike)) else "the given scores"
        raise ValueError(f"no predictions under {where}" + (f" of model version {model_version!r}" if model_version else "")
                         + ": nothing to report (is it a scoring output root?)")
    if "model_version" not in frame.columns:
        raise ValueError("scores need a model_version column: every SR names its model version")
    require_split(data_root, split)
    wanted = sorted(set(frame["study_id"]), key=id_sort_key) if studies is None else list(dict.fromkeys(map(str, studies)))
    return _each_study(frame, data_root, split, model_version, wanted, workers)


def _each_study(frame: pd.DataFrame, data_root, split: str, model_version: str | None,
                wanted: list[str], workers: int) -> Iterator[StudySR]:
    descriptions = load_descriptions(data_root, split)
    by_study = dict(tuple(frame.groupby("study_id", sort=False)))

    def one(study_id: str) -> StudySR:
        rows = by_study.get(study_id)
        if rows is None:
            return StudySR(study_id, error=f"study {study_id}: no predictions"
                           + (f" of model version {model_version!r}" if model_version else "") + " in the scores")
        try:
            _check_rows(study_id, rows)
            sources = load_sources(data_root, study_id, rows, split, descriptions)
            return StudySR(study_id, dataset=build_study_sr(rows, sources))
        except (SRSourceError, DicomReadError, StorageUnavailableError) as exc:
            message = " ".join(str(exc).split())
            log.warning("no SR for study %s: %s", study_id, message)
            return StudySR(study_id, error=message if study_id in message else f"study {study_id}: {message}",
                           transient=isinstance(exc, StorageUnavailableError))

    # The sources of the next few studies are read while this one is written or stored.
    yield from map_in_order(one, wanted, workers)


def built_srs(items: Iterable[StudySR], result: SRExport) -> Iterator[StudySR]:
    """The items of ``items`` that hold an SR; each study without one is recorded in ``result`` on
    the way (so a consumer that stores them elsewhere, e.g. STOW-RS, drops none silently)."""
    for item in items:
        if item.dataset is None:
            result.failed[item.study_id] = item.error or f"study {item.study_id}: no SR"
            if item.transient:
                result.transient.append(item.study_id)
            continue
        yield item


def export_srs(
    scores: str | os.PathLike | pd.DataFrame | pa.Table,
    data_root: str | os.PathLike,
    to_dir: str | os.PathLike,
    *,
    split: str = "test",
    model_version: str | None = None,
    studies: Iterable[str | int] | None = None,
    workers: int = DEFAULT_STUDY_WORKERS,
) -> SRExport:
    """Write ``{to_dir}/{study_id}.dcm`` for each study of :func:`study_srs` (local folder or
    URL, each file written whole); studies without an SR are listed in ``failed``, never dropped."""
    result = SRExport()
    items = study_srs(scores, data_root, split=split, model_version=model_version, studies=studies, workers=workers)
    for item in built_srs(items, result):
        result.written.append(storage.write_bytes(sr_path(to_dir, item.study_id), sr_bytes(item.dataset)))
    log.info("wrote %d SRs to %s; %d studies without one", len(result.written), os.fspath(to_dir), len(result.failed))
    return result


# --------------------------------------------------------------------------------------------
# Reading back


def _algorithm_version(group) -> str | None:
    items = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
    return str(items[0].value) if items else None


def _by_name(items, name):
    """The first of ``items`` (measurements or qualitative evaluations) named ``name``, or None."""
    return next((item for item in items if sr_codes.same_code(item.name, name)), None)


def _finding(group) -> dict:
    target = TARGET_BY_COLUMN[group.tracking_identifier]
    # one search per kind, matched here: highdicom's per-name lookups walk the group each time
    measurements = group.get_measurements()
    evaluations = group.get_qualitative_evaluations()
    record = {"column": target.column, "condition": target.condition.slug, "level": target.level}
    for name, column in zip(sr_codes.PROBABILITY_NAMES, _PROBS, strict=True):
        record[column] = float(_by_name(measurements, name).value)
    record["grade"] = sr_codes.index_of_code(_by_name(evaluations, sr_codes.SEVERITY).value, sr_codes.SEVERITY_VALUES)
    record["detected"] = sr_codes.same_code(_by_name(evaluations, sr_codes.LOCALIZATION).value, sr_codes.LOCALIZED)
    confidence = _by_name(measurements, sr_codes.DETECTION_CONFIDENCE)
    record["confidence"] = float(confidence.value) if confidence is not None else None
    roi = getattr(group, "roi", None)
    if roi is not None:
        source = roi.ContentSequence[0].ReferencedSOPSequence[0]
        record["sop_instance_uid"] = str(source.ReferencedSOPInstanceUID)
        (x, y), = np.asarray(roi.value, dtype=np.float64).reshape(-1, 2)
        record["x"], record["y"] = float(x) - PIXEL_CENTRE, float(y) - PIXEL_CENTRE
    else:
        record["sop_instance_uid"], record["x"], record["y"] = None, None, None
    record["model_version"] = _algorithm_version(group)
    record["target_index"] = target.index
    return record


def read_sr_findings(sr: Dataset | str | os.PathLike) -> pd.DataFrame:
    """The findings of an SR written here, one row per group, in the targets table's order:
    column, condition, level, the three probabilities, grade (severity id), detected, confidence,
    sop_instance_uid, x, y (the row's pixel coordinates, i.e. the point minus 0.5),
    model_version. Read with highdicom (a path or URL is read through storage; a given dataset
    is left unchanged)."""
    if isinstance(sr, Dataset):
        document = hd.sr.Comprehensive3DSR.from_dataset(sr)
    else:  # read here, so highdicom may take it over without a copy
        document = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(storage.read_bytes(sr))), copy=False)
    report = document.content
    groups = [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]
    frame = pd.DataFrame([_finding(group) for group in groups])
    if frame.empty:
        return frame
    return frame.sort_values("target_index").drop(columns="target_index").reset_index(drop=True)
