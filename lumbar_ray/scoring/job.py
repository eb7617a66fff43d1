"""`lumbar-ray score` / `jobs/score.py`: one argument parser, one main."""

from __future__ import annotations

import argparse
import sys

from lumbar_ray.config import ScoreConfig
from lumbar_ray.errors import EXIT_BUSY, EXIT_TRANSIENT
from lumbar_ray.models.registry import ModelRegistry, RegistryError, parse_model_spec
from lumbar_ray.runtime import ray_session, report_expected, run_job
from lumbar_ray.scoring.args import add_resource_args, resource_kwargs
from lumbar_ray.scoring.output_lock import OutputBusy

EXIT_OUTPUT_BUSY = EXIT_BUSY  # another scoring run holds --out (its id, host and pid are printed)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    d = ScoreConfig(input="", models="", out="")
    p = argparse.ArgumentParser(description="Bulk scoring on Ray Data: studies -> detectors -> DeepScoreNet -> Parquet",
                                add_help=add_help)
    p.add_argument("--input", required=True, help="data root in the Kaggle layout (local path or s3://…)")
    p.add_argument("--models", required=True, help="REGISTRY[@version|@champion|@latest] (default: the champion)")
    p.add_argument("--out", required=True, help="output root for predictions/ and errors/ Parquet (local or s3://…)")
    p.add_argument("--split", default=d.split, help="which {split}_images folder to score")
    p.add_argument("--run-id", default=None)
    add_resource_args(p)
    p.add_argument("--limit", type=int, default=None, help="score at most this many (new) studies")
    p.add_argument("--retry-errors", action="store_true", help="score again studies that only have error rows (those whose rows are all retryable, "
                        "storage having failed transiently, are scored again without it)")
    p.add_argument("--crash-retries", type=int, default=d.crash_retries,
                   help="times a batch whose worker process died is tried again; then its studies are scored one "
                        "at a time, and one that still kills its process is recorded as WorkerCrashed")
    p.add_argument("--lock-wait", type=float, default=d.lock_wait_s,
                   help="seconds to wait while another run holds --out (its scoring.lock) before giving up")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a local runtime)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local runtime")
    return p


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(input=args.input, models=args.models, out=args.out, split=args.split, run_id=args.run_id,
                       limit=args.limit, retry_errors=args.retry_errors, lock_wait_s=args.lock_wait,
                       crash_retries=args.crash_retries,
                       **resource_kwargs(args))


def require_inputs(cfg: ScoreConfig) -> None:
    """Refuse a model spec the registry cannot resolve (no champion, unknown version) and a data
    root without ``{split}_images/`` before Ray starts."""
    from lumbar_ray.dicom.read import require_split  # pydicom: `score --help` stays fast

    root, version = parse_model_spec(cfg.models)
    registry = ModelRegistry(root)
    if not registry.versions():
        raise RegistryError(f"registry {root} holds no versions; train one first: "
                            f"lumbar-ray train --data DATA --out {root}")
    registry.resolve(version)
    require_split(cfg.input, cfg.split)


def main(args: argparse.Namespace) -> int:
    from lumbar_ray.scoring.pipeline import run_scoring  # heavy: Ray Data; `lumbar-ray score --help` stays fast

    cfg = config_from_args(args)
    require_inputs(cfg)
    try:
        with ray_session(args.address, num_cpus=args.num_cpus):
            summary = run_scoring(cfg, echo=print)
    except OutputBusy as exc:  # another run holds the output: say who, no traceback
        return report_expected(exc)
    print(f"run_id: {summary.run_id}  model_version: {summary.model_version}  "
          f"scored: {summary.n_scored}  failed: {summary.n_failed}  skipped (done before): {summary.n_skipped_done}")
    if summary.crashed:
        # A permanent failure like a corrupt study (exit status unchanged): a rerun would crash
        # again, and a RayJob retrying the run for it would redo everything else for nothing.
        shown = ", ".join(summary.crashed[:10]) + (f" (+{len(summary.crashed) - 10} more)" if len(summary.crashed) > 10 else "")
        print(f"crashed: {len(summary.crashed)} studies killed their worker process on every try, recorded with "
              f"error_type WorkerCrashed: {shown}", file=sys.stderr, flush=True)
    if summary.n_retryable:
        # Its own exit status, so that a RayJob's backoffLimit (or any scheduler) retries the run.
        print(f"transient: {summary.n_retryable} studies failed transiently (storage did not answer); "
              "rerunning the same command scores them", file=sys.stderr, flush=True)
        return EXIT_TRANSIENT
    return 0


def run(argv: list[str] | None = None) -> int:
    return run_job(get_args_parser, main, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
