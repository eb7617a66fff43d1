"""`lumbar-ray retrain` / `jobs/retrain.py`: train a challenger, promote only if it beats the champion."""

from __future__ import annotations

import argparse
import sys

from lumbar_ray.config import RetrainConfig
from lumbar_ray.runtime import ray_session, run_job
from lumbar_ray.training import job as train_job


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    # Same training flags as `train` (one definition), with --registry in place of --out.
    p = argparse.ArgumentParser(description="Scheduled retraining with champion/challenger promotion",
                                parents=[train_job.get_args_parser(add_help=False)], add_help=add_help,
                                conflict_handler="resolve")
    p.add_argument("--registry", required=True, help="model registry (local dir or s3://…)")
    p.add_argument("--out", required=False, default=None, help=argparse.SUPPRESS)
    p.add_argument("--margin", type=float, default=RetrainConfig.margin,
                   help="promote only if the challenger's holdout RSNA score is lower by at least this")
    p.add_argument("--holdout-fraction", type=float, default=RetrainConfig.holdout_fraction,
                   help="share of studies held out (by hash of study id)")
    return p


def main(args: argparse.Namespace) -> int:
    # heavy: the models, the data readers and Ray Train; `lumbar-ray retrain --help` stays fast
    from lumbar_ray.training.retrain import run_retrain

    args.out = args.registry
    cfg = RetrainConfig(train=train_job.config_from_args(args), margin=args.margin,
                        holdout_fraction=args.holdout_fraction)
    train_job.require_training_data(cfg.train)
    with ray_session(args.address, num_cpus=args.num_cpus):
        decision = run_retrain(cfg, echo=print)
    print(f"challenger: {decision.challenger}  champion before: {decision.champion}  promoted: {decision.promoted}")
    print(f"why: {decision.reason}")  # e.g. a refused comparison says what to do next
    return 0


def run(argv: list[str] | None = None) -> int:
    return run_job(get_args_parser, main, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
