"""Per-study inference, pure of Ray: load a registry version once, detect, crop, grade, and turn
the result into the 25 rows of a study. The Ray pipeline's actors and the plain in-process loop
call these same functions, so the two agree to the last bit of arithmetic they share."""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import pandas as pd

from lumbar_ray.config import SCORER, detector_job
from lumbar_ray.dicom.errors import DicomReadError
from lumbar_ray.dicom.read import load_descriptions, read_study
from lumbar_ray.errors import UserError
from lumbar_ray.models import ultralytics_env
from lumbar_ray.models.compat import (
    IncompatibleModelError,
    check_detector_checkpoint,
    check_scorer_payload,
    read_weights,
)
from lumbar_ray.metrics.calibration import apply_temperature
from lumbar_ray.metrics.rsna import WEIGHTED_UNIFORM_PRIOR, weighted_prior_from_card
from lumbar_ray.models.registry import ModelRegistry, parse_model_spec
from lumbar_ray.storage import filesystem_for, is_transient
from lumbar_ray.targets import (
    AXIAL_T2,
    LEVELS,
    PROBABILITY_COLUMNS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SERIES_TYPES,
    TARGETS,
    targets_for_series,
)

log = logging.getLogger(__name__)


# What a ModelBundle can hold; pipeline stages load only their own part.
MODEL_PARTS = ("detectors", "scorer")
# Prefix of the temp folder a bundle's weight files pass through while it loads.
MODEL_CACHE_PREFIX = "lumbar-ray-models-"

ERROR_COLUMNS = ["study_id", "series_id", "stage", "error_type", "message", "model_version", "run_id", "recorded_at"]


@dataclass
class ModelBundle:
    """The models of one registry version, loaded once (per actor)."""

    version: str
    detectors: dict[str, Any]  # series type -> detector module (eval mode)
    scorer: Any  # DeepScoreNet (eval mode); None when loaded without it
    channels: str
    crop_mm: float | None
    # target column -> what a target with no detection gets: the card's class prior weighted by
    # the metric's severity weights (the constant that minimises the weighted log loss)
    priors: dict[str, list[float]]
    device: Any
    detector_conf: float = 0.01
    parts: tuple[str, ...] = MODEL_PARTS  # what was loaded (see from_registry)
    # condition slug -> temperature applied to DeepScoreNet's probabilities (the card's calibration)
    temperatures: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_registry(cls, spec: str, device: str | None = None, cache_dir: str | None = None,
                      parts: Sequence[str] = MODEL_PARTS) -> "ModelBundle":
        """Load ``REGISTRY[@version]`` (default: the champion); every weight file's sha256 is
        checked against the manifest before it is loaded.

        ``parts`` picks what is built: ``("detectors",)`` for a detection stage (the scorer's
        crop settings are still read), ``("scorer",)`` for a grading stage (``detectors`` stays
        empty and Ultralytics is never imported). Why: each pipeline actor pays for what it
        loads in start-up time, on every run, and on a small machine the stages start together.

        The weight files are copied into ``cache_dir`` (kept: the caller's) or, by default, into
        a ``lumbar-ray-models-*`` folder in the temp dir that is removed before this returns or
        raises: every file is read into memory while loading, so nothing needs it afterwards.
        Removing it here, not when the bundle or its process ends, is what makes it certain: Ray
        Data ends a pool's actors by dropping their handles, or with ``ray.kill`` when a run
        stops early, and a killed or crashed actor runs no ``__del__``, finalizer or atexit
        handler; a folder kept until then stays behind, a copy of the weights per actor per run.
        """
        import torch  # heavy: the driver and the read tasks import this module but load no model

        unknown = set(parts) - set(MODEL_PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {MODEL_PARTS}, not {tuple(parts)!r}")
        root, version = parse_model_spec(spec)
        registry = ModelRegistry(root)
        version = registry.resolve(version)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cache_dir is not None:
            return cls.load_version(registry, version, Path(cache_dir) / version, device, parts)
        with tempfile.TemporaryDirectory(prefix=MODEL_CACHE_PREFIX) as scratch:
            return cls.load_version(registry, version, Path(scratch) / version, device, parts)

    @classmethod
    def load_version(cls, registry: ModelRegistry, version: str, local: Path, device: Any,
                     parts: Sequence[str] = MODEL_PARTS) -> "ModelBundle":
        """The ``parts`` of a resolved ``version``, their files fetched into ``local`` (see
        :meth:`from_registry`, which most callers want)."""
        manifest = registry.manifest(version)
        models = manifest.get("models", {})
        spec = manifest.get("input_spec") or {}
        detectors = (load_detectors(registry, version, models, local, device, spec.get("detectors"))
                     if "detectors" in parts else {})
        if SCORER not in models:
            raise IncompatibleModelError(f"registry version {version} has no scorer (models: {sorted(models)})")
        # The scorer's file also carries the crop settings, which detection needs for its crops;
        # it is checked against the card in every stage, since a wrong one would crop wrongly too.
        file = registry.url("versions", version, models[SCORER])
        payload = read_weights(registry.fetch(version, models[SCORER], local), file)
        check_scorer_payload(payload, file, spec.get("scorer"))
        scorer = load_scorer(payload, device) if "scorer" in parts else None
        fallback = weighted_prior_from_card(manifest.get("priors"))
        return cls(version=version, detectors=detectors, scorer=scorer, channels=payload["channels"],
                   crop_mm=payload.get("crop_mm"), priors={c: fallback.loc[c].tolist() for c in fallback.index},
                   device=device,
                   detector_conf=float(manifest.get("config", {}).get("detector", {}).get("conf", 0.01)),
                   parts=tuple(part for part in MODEL_PARTS if part in parts),
                   temperatures={str(c): float(t) for c, t in
                                 ((manifest.get("calibration") or {}).get("temperatures") or {}).items()})

    @classmethod
    def from_files(cls, name: str, scorer_file: str, detector_files: Mapping[str, str] | None = None, *,
                   priors: Mapping[str, Sequence[float]] | None = None,
                   temperatures: Mapping[str, float] | None = None, detector_conf: float = 0.01,
                   device: str | None = None, parts: Sequence[str] = MODEL_PARTS) -> "ModelBundle":
        """A bundle of weight files outside a registry (local paths or URLs), e.g. one
        cross-validation fold's artefacts; ``name`` stands for the version in its rows.
        ``detector_files``: {series type: detector file}; ``priors``: per target the class prior
        in a model card's layout (the fallback of an undetected target is its weighted prior, as
        for a version); ``temperatures``: {condition: T} applied to DeepScoreNet (none: raw).
        With no card, each file is checked against the targets table only; no sha256 either (no
        manifest holds one). The files pass through a temp folder removed before this returns."""
        import torch  # heavy: see from_registry

        unknown = set(parts) - set(MODEL_PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {MODEL_PARTS}, not {tuple(parts)!r}")
        unknown_types = set(detector_files or {}) - set(SERIES_TYPES)
        if unknown_types:
            raise ValueError(f"detector_files: unknown series types {sorted(unknown_types)}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with tempfile.TemporaryDirectory(prefix=MODEL_CACHE_PREFIX) as scratch:
            local = Path(scratch)
            payload = read_weights(copy_to_local(scorer_file, local / "scorer.pt"), scorer_file)
            check_scorer_payload(payload, scorer_file)
            detectors = {}
            if "detectors" in parts:
                ultralytics_env.configure()
                for series_type, file in sorted((detector_files or {}).items()):
                    path = copy_to_local(file, local / f"{detector_job(series_type)}.pt")
                    detectors[series_type] = load_detector(read_weights(path, file), file, series_type, device)
        fallback = weighted_prior_from_card(priors)
        return cls(version=name, detectors=detectors,
                   scorer=load_scorer(payload, device) if "scorer" in parts else None,
                   channels=payload["channels"], crop_mm=payload.get("crop_mm"),
                   priors={c: fallback.loc[c].tolist() for c in fallback.index}, device=device,
                   detector_conf=float(detector_conf), parts=tuple(part for part in MODEL_PARTS if part in parts),
                   temperatures={str(c): float(t) for c, t in (temperatures or {}).items()})


def copy_to_local(file: str, local: Path) -> Path:
    """``file`` (a local path or any fsspec URL) copied to ``local``."""
    fs, path = filesystem_for(file)
    fs.get_file(path, str(local))
    return local


def load_detector(ckpt: dict[str, Any], file: str, series_type: str, device: Any,
                  declared: dict[str, Any] | None = None) -> Any:
    """A detector ready for inference from its checkpoint ``ckpt`` (read from ``file``), after
    checking it against the targets table and the card's ``declared`` entry, if any
    (IncompatibleModelError)."""
    from lumbar_ray.models.detector import detector_from_checkpoint, prepare_detector_for_inference  # heavy: torch

    check_detector_checkpoint(ckpt, file, series_type, declared)
    return prepare_detector_for_inference(detector_from_checkpoint(ckpt, device, file))


def load_detectors(registry: ModelRegistry, version: str, models: dict[str, str], local: Path,
                   device: Any, declared: dict[str, Any] | None = None) -> dict[str, Any]:
    """{series type: detector ready for inference} of the detectors a version holds (``models``:
    its manifest's {job: file}); their files are fetched into ``local``, their sha256 checked,
    and each checkpoint checked against the targets table and the card's ``declared``
    ``input_spec.detectors`` (IncompatibleModelError) before it is loaded."""
    ultralytics_env.configure()
    detectors = {}
    for series_type in SERIES_TYPES:
        job = detector_job(series_type)
        name = models.get(job)
        if name:
            file = registry.url("versions", version, name)
            ckpt = read_weights(registry.fetch(version, name, local), file)
            detectors[series_type] = load_detector(ckpt, file, series_type, device, (declared or {}).get(job))
    return detectors


def load_scorer(payload: dict[str, Any], device: Any) -> Any:
    """DeepScoreNet from its saved ``payload`` (state dict and input channels), ready for inference."""
    from lumbar_ray.models.deepscorenet import DeepScoreNet, prepare_scorer_for_inference  # heavy: torch

    scorer = DeepScoreNet(in_channels=int(payload["in_channels"]))
    scorer.load_state_dict(payload["state_dict"])
    return prepare_scorer_for_inference(scorer.to(device).eval())


class UnreadableStudyError(RuntimeError):
    """A study folder in which no series could be read: it gets an error row, not prior rows."""


def require_readable(study) -> None:
    """Refuse a study with no readable series; the message carries the skipped files' reasons."""
    if study.series:
        return
    reasons = "; ".join(f"{Path(str(f.path)).name}: {f.reason}" for f in study.skipped[:5])
    more = f" (+{len(study.skipped) - 5} more)" if len(study.skipped) > 5 else ""
    raise UnreadableStudyError(f"study {study.study_id}: no series could be read"
                               + (f"; skipped {reasons}{more}" if reasons else "; the folder holds no DICOM series"))


# What a bad study can raise while it is read, detected and cropped: files that are missing,
# unreadable or not DICOM (DicomReadError, OSError), storage that failed (UserError:
# StorageUnavailableError, DataLayoutError; raw transient errors via is_transient), a study with
# nothing to read (UnreadableStudyError), geometry that does not add up (ValueError, IndexError,
# ArithmeticError from NumPy/SciPy on degenerate orientations, spacings or sizes). Everything else
# (TypeError, AttributeError, KeyError, RuntimeError, ...) is a bug in this code and propagates:
# recorded as a study's error row it would be repeated on every study and read as bad data.
STUDY_ERRORS: tuple[type[BaseException], ...] = (
    DicomReadError, UnreadableStudyError, UserError, OSError, ValueError, IndexError, ArithmeticError)


def is_out_of_memory(exc: BaseException) -> bool:
    """Device (``torch.cuda.OutOfMemoryError``) or host (``MemoryError``) out of memory."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only a process that imported torch can raise its error
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def is_study_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is something a bad study (or the memory it needs) causes, to record as
    its error row; false for a bug, which must propagate."""
    return isinstance(exc, STUDY_ERRORS) or is_transient(exc) or is_out_of_memory(exc)


T = TypeVar("T")


def halving_on_oom(call: Callable[[int], T], batch_size: int, what: str) -> T:
    """``call(batch_size)``; when it runs out of memory, again with half the batch, down to 1
    (then the out-of-memory error propagates, for the caller to record). Why: a study with more
    or larger slices than the batch size was tuned for must still score, only slower."""
    size = max(1, int(batch_size))
    while True:
        try:
            return call(size)
        except Exception as exc:
            if size == 1 or not is_out_of_memory(exc):
                raise
            log.warning("%s: out of memory in batches of %d (%s); retrying in batches of %d",
                        what, size, type(exc).__name__, size // 2)
        # Here, after the except block: the failed pass's tensors, held by its traceback, are free.
        size //= 2
        release_device_cache()


def release_device_cache() -> None:
    """Hand the CUDA caching allocator's free blocks back, so a smaller batch can use them."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_row(study_id: str, stage: str, exc: BaseException, series_id: str | None = None,
              max_chars: int = 1000) -> dict:
    """One row of the errors table for an exception at ``stage`` (read | detect)."""
    return {"study_id": study_id, "series_id": series_id, "stage": stage, "error_type": type(exc).__name__,
            "message": str(exc)[:max_chars]}


@dataclass
class TargetHit:
    """Where one target was found (or not) in one study."""

    target_index: int
    series_id: str | None = None
    slice_index: int | None = None
    instance_number: int | None = None
    x: float | None = None
    y: float | None = None
    confidence: float | None = None

    @property
    def detected(self) -> bool:
        return self.slice_index is not None


@dataclass
class DetectedStudy:
    """A study after detection: its hits, the crops of the detected ones, and what went wrong."""

    study_id: str
    hits: list[TargetHit]  # 25, in targets-table order
    crops: np.ndarray  # (n_detected, C, 32, 32), in the order of detected hits
    flags: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # rows for the errors table


def detect_study(bundle: ModelBundle, study, batch_size: int = 32,
                 timings: dict[str, float] | None = None) -> DetectedStudy:
    """Run each series type's detector over every slice of every series of that type (batched),
    pick one detection per target and crop the detected points. The sagittal series give each
    disc level a point in 3-D; the axial targets are chosen per level among the axial slices
    whose planes lie at that level (:mod:`lumbar_ray.models.levels`), so per-level slabs and
    axial series split over two series are read as a radiologist would. ``timings``: a dict to
    add the seconds of each step to (:func:`detect_series`'s steps and "select + crop"; profiling)."""
    # heavy: torch; the driver and the read tasks import this module but run no model
    from lumbar_ray.models.detector_inference import StageClock
    from lumbar_ray.models.levels import geometry_flags

    if "detectors" not in bundle.parts:  # else every series would pass as "no detector in this version"
        raise RuntimeError(f"model bundle {bundle.version} was loaded without its detectors (parts={bundle.parts})")
    study_id = str(study.study_id)
    flags, errors = skipped_file_problems(study)
    found = _run_detectors(bundle, study, batch_size, timings, flags, errors)
    clock = StageClock(timings, bundle.device)
    chosen = _choose_sagittal(found)
    chosen.update(_choose_axial(found.get(AXIAL_T2, []), chosen, flags))
    flags.extend(geometry_flags(chosen))
    hits = {t.index: TargetHit(t.index) for t in TARGETS}
    crops_by_target: dict[int, np.ndarray] = {}
    by_series: dict[int, tuple[Any, dict]] = {}
    for index, located in chosen.items():
        if located is not None:
            by_series.setdefault(id(located.series), (located.series, {}))[1][index] = located.detection
    for series, picked in by_series.values():
        for hit, crop in crop_detections(bundle, series, picked):
            hits[hit.target_index] = hit
            crops_by_target[hit.target_index] = crop
    clock.lap("select + crop")
    ordered = [hits[t.index] for t in TARGETS]
    detected = [h.target_index for h in ordered if h.detected]
    crops = np.stack([crops_by_target[i] for i in detected]) if detected else np.zeros((0, 3, 32, 32), np.float32)
    return DetectedStudy(study_id, ordered, crops.astype(np.float32), flags, errors)


def _run_detectors(bundle: ModelBundle, study, batch_size: int, timings, flags: list[str],
                   errors: list[dict]) -> dict[str, list[tuple[Any, list]]]:
    """{series type: [(series, its detections)]} over every series of each type; a series type
    with no series or no detector, and a series whose detection fails, get a flag (and an error
    row) instead."""
    from lumbar_ray.models.detector_inference import detect_series  # heavy: torch

    study_id = str(study.study_id)
    found: dict[str, list[tuple[Any, list]]] = {}
    for series_type in SERIES_TYPES:
        series_list = study.series_of_type(series_type)
        if not series_list:
            flags.append(f"series_missing:{series_type}")
            errors.append({"study_id": study_id, "series_id": None, "stage": "read", "error_type": "SeriesMissing",
                           "message": f"no {series_type} series could be read; its targets use the prior"})
            continue
        detector = bundle.detectors.get(series_type)
        if detector is None:
            flags.append(f"no_detector:{series_type}")
            continue
        for series in series_list:
            try:
                detections = halving_on_oom(
                    lambda size, detector=detector, series=series: detect_series(
                        detector, series, conf=bundle.detector_conf, device=bundle.device, batch_size=size,
                        timings=timings),
                    batch_size, f"study {study_id} series {series.series_id}")
            except Exception as exc:
                # One bad series must not lose the study's other rows; but a bug propagates, and
                # out of memory even in batches of one fails the whole study (recorded by the
                # caller) rather than leaving prior-filled rows behind as if the series were bad.
                if is_out_of_memory(exc) or not is_study_failure(exc):
                    raise
                flags.append(f"detect_failed:{series_type}")
                errors.append(error_row(study_id, "detect", exc, series_id=str(series.series_id), max_chars=500))
                continue
            found.setdefault(series_type, []).append((series, detections))
    return found


def _choose_sagittal(found: dict[str, list[tuple[Any, list]]]) -> dict[int, Any]:
    """{target index: LocatedDetection | None} of the sagittal targets: each series chooses by
    its type's rule (:func:`select_target_detections`). Over several series of a type (a repeated
    acquisition): for the foramina the most confident choice per target wins; the canal's levels
    all come from the one series whose levels have the largest summed confidence, since its
    rule reads them in order within a series, and levels mixed from two could break that order."""
    from lumbar_ray.models.levels import LocatedDetection, keep_most_confident
    from lumbar_ray.models.target_selection import select_target_detections

    chosen: dict[int, Any] = {}
    for series, detections in found.get(SAGITTAL_T1, []):
        for index, det in select_target_detections(detections, SAGITTAL_T1, series).items():
            if det is not None:
                keep_most_confident(chosen, index, series, det)
            chosen.setdefault(index, None)
    canal = [(series, select_target_detections(detections, SAGITTAL_T2, series))
             for series, detections in found.get(SAGITTAL_T2, [])]
    if canal:
        series, picks = max(canal, key=lambda c: sum(d.confidence for d in c[1].values() if d is not None))
        chosen.update({index: None if det is None else LocatedDetection(series, det) for index, det in picks.items()})
    return chosen


def _choose_axial(axial: list[tuple[Any, list]], sagittal: dict[int, Any], flags: list[str]) -> dict[int, Any]:
    """{target index: LocatedDetection | None} of the axial targets: per level, among the slices
    whose plane lies at that level's disc (from the sagittal detections); without any sagittal
    level, each series' most confident detection per class, flagged ``axial_levels_unchecked``."""
    from lumbar_ray.models.levels import (
        assign_slices_to_levels,
        level_points,
        select_axial_by_level,
        select_axial_whole_series,
    )

    targets = targets_for_series(AXIAL_T2)
    if not axial:
        return {}
    points = level_points(sagittal)
    if not points:
        flags.append("axial_levels_unchecked")
        return select_axial_whole_series(axial, targets)
    assigned = [(series, detections, assign_slices_to_levels(series, points)) for series, detections in axial]
    covered = {int(level) for _, _, levels in assigned for level in levels if level >= 0}
    missed = [LEVELS[level] for level in sorted(points) if level not in covered]
    if missed:
        flags.append("axial_level_not_covered:" + ",".join(missed))
    return select_axial_by_level(assigned, targets)


def skipped_file_problems(study) -> tuple[list[str], list[dict]]:
    """(flags, error rows) for the files of ``study`` that its reading skipped."""
    if not study.skipped:
        return [], []
    study_id = str(study.study_id)
    errors = [{"study_id": study_id, "series_id": series_of_path(skipped.path), "stage": "read",
               "error_type": skipped.error_type, "message": f"{Path(str(skipped.path)).name}: {skipped.reason}"}
              for skipped in study.skipped]
    return [f"skipped_files:{len(study.skipped)}"], errors


def series_of_path(path) -> str | None:
    """The series id of a DICOM file's path: the name of its folder."""
    parts = str(path).rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else None


def crop_detections(bundle: ModelBundle, series, chosen: dict) -> list[tuple[TargetHit, np.ndarray]]:
    """(hit, crop) of each target that ``chosen`` ({target index: detection or None}) found in
    ``series``, in target order."""
    from lumbar_ray.models.crops import extract_crops  # heavy: scipy, only where crops are cut

    found = [(index, det) for index, det in sorted(chosen.items()) if det is not None]
    if not found:
        return []
    points = np.array([(det.slice_index, det.x, det.y) for _, det in found], dtype=np.float64)
    crops = extract_crops(series.volume, points, channels=bundle.channels, mm=bundle.crop_mm,
                          pixel_spacing=tuple(series.pixel_spacing), slab_ids=series.slab_ids())
    return [(TargetHit(index, str(series.series_id), int(det.slice_index), int(det.instance_number), float(det.x),
                       float(det.y), float(det.confidence)), crop)
            for (index, det), crop in zip(found, crops)]


def study_rows(detected: DetectedStudy, probs: np.ndarray, bundle_version: str, priors: dict[str, list[float]],
               run_id: str, scored_at: pd.Timestamp, temperatures: Mapping[str, float] | None = None) -> pd.DataFrame:
    """The 25 prediction rows of one study. ``probs`` (n_detected, 3) follows the detected hits'
    order and is calibrated with its condition's temperature (``temperatures``: the bundle's);
    a target with no detection gets ``priors`` (the bundle's fallback) and ``detected = False``."""
    rows = []
    it = iter(np.asarray(probs, dtype=np.float64))
    flags = ";".join(detected.flags)
    temperatures = temperatures or {}
    for hit in detected.hits:
        target = TARGETS[hit.target_index]
        if hit.detected:
            p = next(it)
            if target.condition.slug in temperatures:
                p = apply_temperature(p[None, :], temperatures[target.condition.slug])[0]
        else:
            p = np.asarray(priors.get(target.column, WEIGHTED_UNIFORM_PRIOR), dtype=np.float64)
        rows.append({
            "study_id": detected.study_id, "row_id": target.row_id(detected.study_id),
            "condition": target.condition.slug, "level": target.level,
            **{c: float(v) for c, v in zip(PROBABILITY_COLUMNS, p)},
            "detected": hit.detected, "confidence": hit.confidence, "series_id": hit.series_id,
            "instance_number": hit.instance_number, "x": hit.x, "y": hit.y,
            "model_version": bundle_version, "run_id": run_id, "scored_at": scored_at, "flags": flags,
        })
    return pd.DataFrame(rows)


# DeepScoreNet's forward passes on a CPU always take this many crops (padded; predict_proba's
# fixed_batch). Why: with a batch size that varies from call to call the heap that each new size's
# activations fragment is kept, and a scoring actor's memory grows over a run; with one size it
# stays flat, and at the crop counts of an actor's calls (~110-400) 32 costs no speed. On a GPU
# the caching allocator reuses blocks of any size.
CPU_GRADE_BATCH = 32


def grade_crops(bundle: ModelBundle, crops: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """DeepScoreNet's probabilities of ``crops``: on a CPU in fixed batches of
    :data:`CPU_GRADE_BATCH`, on a GPU in batches of up to 512 (``batch_size`` overrides); halved
    on out of memory (:func:`halving_on_oom`)."""
    from lumbar_ray.models.deepscorenet import predict_proba  # heavy: torch

    if len(crops) == 0:
        return np.zeros((0, len(PROBABILITY_COLUMNS)), np.float32)
    if "scorer" not in bundle.parts:
        raise RuntimeError(f"model bundle {bundle.version} was loaded without its scorer (parts={bundle.parts})")
    on_cpu = bundle.device.type == "cpu"
    size = batch_size or (CPU_GRADE_BATCH if on_cpu else 512)
    return halving_on_oom(
        lambda n: predict_proba(bundle.scorer, crops, batch_size=n, device=bundle.device, fixed_batch=on_cpu),
        size, f"grading {len(crops)} crops")


def error_frame(errors: list[dict], version: str, run_id: str, recorded_at: pd.Timestamp) -> pd.DataFrame:
    """The errors-table rows of ``errors`` (see :func:`error_row`), stamped with the run."""
    return pd.DataFrame([{**e, "model_version": version, "run_id": run_id, "recorded_at": recorded_at} for e in errors],
                        columns=ERROR_COLUMNS)


def score_in_process(bundle: ModelBundle, root: str, study_ids: list[str], split: str = "test",
                     run_id: str = "in-process") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The plain loop (one process, no Ray) over the same functions as the pipeline: the
    reference that the Ray pipeline must equal."""
    descriptions = load_descriptions(root, split)
    now = pd.Timestamp.now(tz="UTC")
    preds, errs = [], []
    for study_id in study_ids:
        stage = "read"
        try:
            study = read_study(root, study_id, split=split, descriptions=descriptions)
            require_readable(study)
            stage = "detect"
            detected = detect_study(bundle, study)
            stage = "score"
            probs = grade_crops(bundle, detected.crops)
        except Exception as exc:  # a bad study (or one too large for the memory) is recorded; a bug is not
            if not is_study_failure(exc):
                raise
            errs.append(error_frame([error_row(str(study_id), stage, exc)], bundle.version, run_id, now))
            continue
        preds.append(study_rows(detected, probs, bundle.version, bundle.priors, run_id, now, bundle.temperatures))
        errs.append(error_frame(detected.errors, bundle.version, run_id, now))
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    errs = [e for e in errs if len(e)]
    err = pd.concat(errs, ignore_index=True) if errs else error_frame([], bundle.version, run_id, now)
    return pred, err
