"""Run a trained version's end-to-end out-of-fold pass again with the current selection code (#15).

Each CV fold's detectors and DeepScoreNet are read from the version's fold artefacts
(``{registry}/runs/{version}/artifacts``), score that fold's validation studies as training's
end-to-end pass does (:func:`lumbar_ray.training.end_to_end.end_to_end_oof`, Ray tasks), and the
table training writes is printed for the saved predictions (as trained) and the new ones, both
with each fold's own temperatures (:func:`lumbar_ray.training.cv_metrics.scorer_metrics`).
Nothing is retrained: only what happens after the detectors (choosing boxes, cropping) can differ.

Usage (the run of docs/RESULTS.md "The canal's levels read in order"):

    python docs/experiments/rescore_end_to_end.py --data /work/acq200/train \\
        --registry /work/acq200/models --version v20261202-105025-9ff0 --out /tmp/oof_e2e.parquet
"""

from __future__ import annotations

import argparse

import pandas as pd

from lumbar_ray.config import TrainConfig
from lumbar_ray.metrics.rsna import long_labels
from lumbar_ray.runtime import ray_session
from lumbar_ray.training.cv_metrics import scorer_metrics
from lumbar_ray.training.end_to_end import end_to_end_oof


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the data root the version was trained on")
    p.add_argument("--registry", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--out", required=True, help="Parquet file for the new out-of-fold predictions")
    p.add_argument("--num-cpus", type=int, default=None)
    return p


def summary(name: str, table: pd.DataFrame, frame: pd.DataFrame) -> str:
    rows = table[(table["evaluated_on"] == "end_to_end") & table["model"].str.startswith("deepscorenet")]
    wide = rows.pivot(index="group", columns="model", values="rsna_log_loss").round(4)
    return f"{name}: {frame['detected'].mean():.1%} of targets detected\n{wide.to_string()}"


def main(args: argparse.Namespace) -> None:
    version_dir = f"{args.registry}/versions/{args.version}"
    labels = long_labels(pd.read_csv(f"{args.data}/train.csv"))
    folds = pd.read_parquet(f"{version_dir}/folds.parquet")
    oof = pd.read_parquet(f"{version_dir}/oof_scorer.parquet")
    cfg = TrainConfig(data=args.data, registry=args.registry, folds=int(folds["fold"].nunique()))
    with ray_session(num_cpus=args.num_cpus):
        new = end_to_end_oof(cfg, labels, folds, f"{args.registry}/runs/{args.version}/artifacts", echo=print)
    if not new.available:
        raise SystemExit(f"the pass did not run: {new.skipped}")
    new.frame.to_parquet(args.out, index=False)
    for name, frame in (("as trained", pd.read_parquet(f"{version_dir}/oof_end_to_end.parquet")),
                        ("current code", new.frame)):
        print(summary(name, scorer_metrics(oof, labels, folds, frame)[0], frame))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
