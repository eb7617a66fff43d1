"""`lumbar-ray train` / `jobs/train.py`: one argument parser, one main (torchvision-reference style)."""

from __future__ import annotations

import argparse
import shlex
import sys

from lumbar_ray.config import DetectorConfig, ResourceConfig, ScorerConfig, TrainConfig
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.runtime import ray_session, report_expected, run_job
from lumbar_ray.training.promotion import Decision, PromotionLockBusy, champion_after_training



def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cross-validated training of the detectors and DeepScoreNet on Ray",
                                add_help=add_help)
    p.add_argument("--data", required=True, help="data root in the Kaggle layout (local path or s3://…)")
    p.add_argument("--out", required=True, help="model registry (local dir or s3://…) that receives the new version")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold CV, grouped by study")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every model (overrides the two below)")
    p.add_argument("--detector-epochs", type=int, default=DetectorConfig.epochs)
    p.add_argument("--scorer-epochs", type=int, default=ScorerConfig.epochs)
    p.add_argument("--models", default="detector,scorer", help="comma list of: detector, scorer")
    p.add_argument("--series", default=None, help="comma list of detector series types (default: all three)")
    p.add_argument("--imgsz", type=int, default=DetectorConfig.imgsz, help="detector input size (px)")
    p.add_argument("--detector-batch-size", type=int, default=DetectorConfig.batch_size)
    p.add_argument("--detector-negatives", type=int, default=DetectorConfig.negatives,
                   help="unlabelled slices per labelled series trained on as negatives (0: none)")
    p.add_argument("--scorer-batch-size", type=int, default=ScorerConfig.batch_size)
    p.add_argument("--channels", choices=("repeat", "adjacent"), default=ScorerConfig.channels,
                   help="scorer crop channels: one slice repeated, or slices k-1,k,k+1 (2.5D)")
    p.add_argument("--crop-mm", type=float, default=ScorerConfig.crop_mm,
                   help="scorer crop side in mm, resampled to 32 px (0: 32 pixels, as in the paper)")
    p.add_argument("--val-every", type=positive_int, default=None,
                   help="epochs between validation rounds of every model (overrides the two below)")
    p.add_argument("--detector-val-every", type=positive_int, default=DetectorConfig.val_every)
    p.add_argument("--scorer-val-every", type=positive_int, default=ScorerConfig.val_every)
    p.add_argument("--patience", type=non_negative_int, default=None,
                   help="early stopping: validation rounds without improvement before a CV fold stops "
                        "(0: off) for every model (overrides the two below); each fold ships its best round")
    p.add_argument("--detector-patience", type=non_negative_int, default=DetectorConfig.patience)
    p.add_argument("--scorer-patience", type=non_negative_int, default=ScorerConfig.patience)
    p.add_argument("--collapse-retries", type=non_negative_int, default=DetectorConfig.collapse_retries,
                   help="times a fold whose detector finds nothing is trained again with another seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-final-fit", action="store_true", help="ship each model's best-validated fold instead of a fit on all studies")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per training worker")
    p.add_argument("--workers-per-trial", type=int, default=1, help="DDP workers of each (model, fold) trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-concurrent-trials", type=int, default=None)
    p.add_argument("--max-failures", type=int, default=2, help="restarts of a trial's workers from their last checkpoint")
    p.add_argument("--storage", default=None, help="Ray Train/Tune storage path (default: REGISTRY/runs)")
    p.add_argument("--version", default=None, help="version id (default: time-based)")
    p.add_argument("--champion", action="store_true", help="make the new version the champion")
    p.add_argument("--init-from", default=None, metavar="REGISTRY[@VERSION]|champion",
                   help="warm start: every model starts from that version's weights ('champion': the "
                        "champion of the registry trained into; a resumed trial keeps its own progress)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a local runtime)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local runtime")
    return p


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative ({value})")
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    det_epochs = args.epochs if args.epochs is not None else args.detector_epochs
    sc_epochs = args.epochs if args.epochs is not None else args.scorer_epochs
    det_val_every = args.val_every if args.val_every is not None else args.detector_val_every
    sc_val_every = args.val_every if args.val_every is not None else args.scorer_val_every
    det_patience = args.patience if args.patience is not None else args.detector_patience
    sc_patience = args.patience if args.patience is not None else args.scorer_patience
    series = DetectorConfig.series_types
    if args.series:
        from lumbar_ray.targets import SERIES_TYPES, series_slug

        by_slug = {series_slug(s): s for s in SERIES_TYPES}
        wanted = [s.strip() for s in args.series.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in by_slug and s not in SERIES_TYPES]
        if unknown:
            raise SystemExit(f"--series: unknown {unknown}; use {sorted(by_slug)}")
        series = tuple(by_slug.get(s, s) for s in wanted)
    return TrainConfig(
        data=args.data, registry=args.out, folds=args.folds, seed=args.seed,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        final_fit=not args.no_final_fit, storage_path=args.storage, run_name=args.version,
        max_failures=args.max_failures, init_from=args.init_from,
        scorer=ScorerConfig(epochs=sc_epochs, batch_size=args.scorer_batch_size, channels=args.channels,
                            crop_mm=args.crop_mm or None, val_every=sc_val_every, patience=sc_patience),
        detector=DetectorConfig(epochs=det_epochs, batch_size=args.detector_batch_size, imgsz=args.imgsz,
                                series_types=series, negatives=args.detector_negatives,
                                val_every=det_val_every, patience=det_patience,
                                collapse_retries=args.collapse_retries),
        resources=ResourceConfig(use_gpu=args.use_gpu, workers_per_trial=args.workers_per_trial,
                                 cpus_per_worker=args.cpus_per_worker,
                                 max_concurrent_trials=args.max_concurrent_trials),
    )


def require_training_data(cfg: TrainConfig) -> None:
    """Refuse a data root without the Kaggle layout's images and labels before Ray starts."""
    from lumbar_ray.dicom.read import require_split  # pydicom and pandas: `train --help` stays fast
    from lumbar_ray.metrics.labels import require_label_files

    require_split(cfg.data, cfg.split)
    require_label_files(cfg.data)


def next_command(data: str, registry: str, version: str, champion: bool) -> str:
    """The command that scores with what was just trained."""
    models = f"{registry}@{'champion' if champion else version}"
    return f"next: lumbar-ray score --input {shlex.quote(data)} --models {shlex.quote(models)} --out scores"


def say_decision(decision: Decision | None) -> None:
    if decision is None:
        return
    if decision.promoted:
        print(f"champion -> {decision.challenger} ({decision.reason})")
    else:
        print(f"{decision.challenger} not made champion: {decision.reason}")


def main(args: argparse.Namespace) -> int:
    from lumbar_ray.training.cv import run_training  # heavy: Ray Train and torch; `train --help` stays fast

    cfg = config_from_args(args)
    cfg.jobs()  # validates --models before starting Ray
    require_training_data(cfg)
    with ray_session(args.address, num_cpus=args.num_cpus):
        outcome = run_training(cfg, echo=print)
    print(outcome.report)
    registry = ModelRegistry(cfg.registry)
    code = 0
    try:
        say_decision(champion_after_training(registry, outcome.version, pinned=args.champion))
    except PromotionLockBusy as exc:  # --champion while another process moves the pointer: the version stays
        code = report_expected(exc)
    pointer = registry.champion()
    print(f"version: {outcome.version}")
    print(next_command(cfg.data, cfg.registry, outcome.version,
                       champion=pointer is not None and pointer["version"] == outcome.version))
    return code


def run(argv: list[str] | None = None) -> int:
    return run_job(get_args_parser, main, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
