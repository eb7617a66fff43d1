"""Typed configuration of the jobs (training, retraining, scoring). The same config runs on a
laptop's CPUs or on GPUs: only the resource settings change."""

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
    """The series type of a detector job name (the inverse of :func:`detector_job`)."""
    for series_type in SERIES_TYPES:
        if detector_job(series_type) == job:
            return series_type
    raise KeyError(f"{job!r} is not a detector job")


def check_selection(val_every: int, patience: int | None) -> None:
    """Refuse a validation interval below one epoch or a negative patience."""
    if int(val_every) < 1:
        raise ValueError(f"val_every must be at least 1 (epochs between validation rounds), not {val_every}")
    if patience is not None and int(patience) < 0:
        raise ValueError(f"patience must be 0 (off) or more validation rounds, not {patience}")


@dataclass
class ScorerConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    focal_gamma: float = 3.0
    # "repeat": one gray slice repeated in 3 channels (the paper); "adjacent": slices k-1, k, k+1.
    channels: str = "repeat"
    # Crop side in millimetres (resampled to 32 px); None = 32 pixels as in the paper. In pixels
    # a crop spans 40-70 mm depending on the pixel spacing; a fixed size in mm scored better
    # (docs/RESULTS.md).
    crop_mm: float | None = 32.0
    max_oversample: float = 4.0
    # Validation on the fold's held-out crops (RSNA score) every `val_every` epochs and after the
    # last; the best round's weights and out-of-fold predictions ship (training/best_epoch.py).
    val_every: int = 1
    # Validation rounds without improvement after which a fold stops; 0 or None: never. The
    # all-studies fit has no validation fold and trains the whole schedule.
    patience: int | None = 5

    def __post_init__(self) -> None:
        check_selection(self.val_every, self.patience)


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
    # `negative_gap` slices from a labelled one first (see detector_data.samples_from_series;
    # None: detector_data.DEFAULT_NEGATIVE_GAP of the series type).
    negatives: int = 2
    negative_gap: int | None = None
    # Validation (3-D hit rate within 5 mm on the fold's held-out studies) every `val_every`
    # epochs and after the last: each round runs the detector over whole series, so every
    # second epoch by default; the best round's weights and records ship.
    val_every: int = 2
    patience: int | None = 5  # validation rounds without improvement before stopping; 0/None: never
    # Times a fold whose detector finds nothing (detector_eval.collapsed) is trained again with
    # another seed; the retry and its reason are recorded in history.json and the model card.
    collapse_retries: int = 1
    # The all-studies fit has no validation fold: its last epoch is checked for a collapse on
    # this many of its own training studies (a detector that finds nothing even there).
    final_check_studies: int = 4
    # Memory (MiB) the validation studies read once per trial may hold between rounds; studies
    # beyond it are read again each round (training/detector_validation.py).
    val_cache_mb: int = 1024

    def __post_init__(self) -> None:
        check_selection(self.val_every, self.patience)
        if self.collapse_retries < 0 or self.final_check_studies < 0 or self.val_cache_mb < 0:
            raise ValueError("collapse_retries, final_check_studies and val_cache_mb cannot be negative")


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
    # Warm start: REGISTRY[@VERSION] whose weights every model starts from, or "champion" (the
    # champion of `registry`); None trains from random weights (training/warm_start.py).
    init_from: str | None = None
    # The retrain holdout rule (fraction, salt) that `exclude_studies` come from, if they do: the
    # card records it, and a later retrain warm-starts from this version only under the same rule.
    holdout_rule: tuple[float, str] | None = None

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


# Salt of the hash that puts a study in the retrain holdout (training/retrain.is_holdout).
HOLDOUT_SALT = "lumbar-ray-holdout"


@dataclass
class RetrainConfig:
    train: TrainConfig  # its .registry is the registry; its .data the labelled data
    margin: float = 0.005  # challenger must be better (lower RSNA score) by at least this much
    holdout_fraction: float = 0.2
    holdout_salt: str = HOLDOUT_SALT


@dataclass
class ScoreConfig:
    input: str  # data root (local or s3://)
    models: str  # REGISTRY[@version]
    out: str  # output root (local or s3://)
    split: str = "test"
    run_id: str | None = None
    # Resources: the same code on a laptop's CPUs or on GPUs.
    # Half a CPU per read task: on a small machine a read then fits beside one detector actor
    # (1 CPU) and one scorer (0.5) and overlaps with detection, instead of being fused into the
    # detector actor (slower), as Ray Data does when both ask for the same resources. On a GPU
    # node, where decode tasks would crowd the detector actors' host work, give them a whole CPU
    # (--read-cpus 1).
    read_cpus: float = 0.5
    # Studies per read task (each still its own row downstream): a read task costs Ray a
    # scheduling round trip that on busy cores takes longer than reading one small study, and
    # one-study tasks left the detector actor waiting for input.
    read_batch_studies: int = 4
    detector_pool: int = 1
    detector_gpus: float = 0.0
    detector_cpus: float = 1.0
    detector_batch_studies: int = 1
    scorer_pool: int = 1
    scorer_gpus: float = 0.0
    scorer_cpus: float = 0.5
    scorer_batch_studies: int = 16
    slice_batch: int = 32  # slices per detector forward pass
    flush_studies: int = 16  # studies per written part file
    # Object-store memory the run may fill with blocks between stages (MiB; 0 = Ray Data's own
    # budget, a share of the object store). On a node with many CPUs the read tasks outrun the
    # detector actors, and under Ray Data's default budget (~15 % of RAM) the backlog of decoded
    # studies (~50 MB each at full size) grows with the number of studies; a fixed cap bounds it.
    buffer_mb: float = 4096.0
    limit: int | None = None
    retry_errors: bool = False
    # Seconds to wait while another run holds the output (0: refuse at once): a retry on a fresh
    # cluster after the old one died finds the dead run's lock until its heartbeat goes stale
    # (5 min); cluster/kuberay/rayjob-score.yaml waits for that instead of failing the retry.
    lock_wait_s: float = 0.0
    # Times a batch of studies is tried again after the process running it died (a decoder
    # crash, the OOM killer); then its studies are scored one at a time, each step tried this
    # many times again, and a study that still kills its process is recorded as WorkerCrashed.
    crash_retries: int = 1
    study_ids: list[str] | None = None  # score only these
