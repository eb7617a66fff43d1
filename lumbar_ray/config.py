"""Typed configuration shared by the jobs. The same config runs on a laptop's CPUs or on GPUs:
only :class:`ResourceConfig` changes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lumbar_ray.targets import SERIES_TYPES, series_slug

SCORER = "scorer"
DETECTOR_PREFIX = "detector_"
MODEL_FAMILIES = ("detector", "scorer")


def detector_job(series_type: str) -> str:
    """Name of the detector model of one series type, e.g. 'detector_sagittal_t1'."""
    return DETECTOR_PREFIX + series_slug(series_type)


def series_type_of_job(job: str) -> str:
    for series_type in SERIES_TYPES:
        if detector_job(series_type) == job:
            return series_type
    raise KeyError(f"{job!r} is not a detector job")


@dataclass
class ScorerConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    focal_gamma: float = 3.0
    # "repeat": one gray slice repeated in 3 channels (the paper); "adjacent": slices k-1, k, k+1.
    channels: str = "repeat"
    # Crop side in millimetres (resampled to 32 px); None = 32 pixels as in the paper. 32 mm
    # measured better than 32 px on 200 synthetic studies (RSNA score 0.452 vs 0.559 out of
    # sample, docs/RESULTS.md), where 32 px span 40-70 mm depending on the pixel spacing.
    crop_mm: float | None = 32.0
    max_oversample: float = 4.0


@dataclass
class DetectorConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    imgsz: int = 256
    # Training boxes are centred on the labelled point and sized in millimetres
    # (None: detector.DEFAULT_BOX_MM of the series type).
    box_mm: float | None = None
    series_types: tuple[str, ...] = SERIES_TYPES
    conf: float = 0.01
    # Linear learning-rate warm-up (epochs); one epoch was too short for the few hundred
    # steps of a small set: the loss jumped after it and one CV fold never recovered.
    warmup_epochs: float = 3.0
    # Unlabelled slices per labelled series trained on as negatives (no boxes), the ones
    # `negative_gap` slices from a labelled one first (see detector.samples_from_series;
    # None: detector.DEFAULT_NEGATIVE_GAP of the series type).
    negatives: int = 2
    negative_gap: int | None = None


@dataclass
class ResourceConfig:
    use_gpu: bool = False
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # None: as many trials at once as the cluster's CPUs (or GPUs) allow.
    max_concurrent_trials: int | None = None
    trial_memory_mb: int = 64


@dataclass
class TrainConfig:
    data: str
    registry: str
    folds: int = 5
    seed: int = 0
    models: tuple[str, ...] = MODEL_FAMILIES
    # Also train each model on all studies (the version that is shipped); CV models only estimate.
    final_fit: bool = True
    storage_path: str | None = None  # Ray Train/Tune storage (local dir or s3://); default: under registry
    run_name: str | None = None
    max_failures: int = 2
    split: str = "train"
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    # Studies never trained on (e.g. the retrain holdout).
    exclude_studies: tuple[int, ...] = ()
    # Fault injection for tests: the first attempt of a trial's worker dies at this epoch
    # (only the trials of inject_failure_job when that is set).
    inject_failure_at_epoch: int | None = None
    inject_failure_job: str | None = None

    def jobs(self) -> list[str]:
        unknown = set(self.models) - set(MODEL_FAMILIES)
        if unknown:
            raise ValueError(f"unknown models {sorted(unknown)}; choose from {MODEL_FAMILIES}")
        jobs = []
        if "detector" in self.models:
            jobs += [detector_job(s) for s in self.detector.series_types]
        if "scorer" in self.models:
            jobs.append(SCORER)
        return jobs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        raw = dict(raw)
        raw["scorer"] = ScorerConfig(**raw.get("scorer", {}))
        det = dict(raw.get("detector", {}))
        if "series_types" in det:
            det["series_types"] = tuple(det["series_types"])
        raw["detector"] = DetectorConfig(**det)
        raw["resources"] = ResourceConfig(**raw.get("resources", {}))
        raw["models"] = tuple(raw.get("models", MODEL_FAMILIES))
        raw["exclude_studies"] = tuple(raw.get("exclude_studies", ()))
        return cls(**raw)
