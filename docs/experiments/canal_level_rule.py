"""The canal detector's out-of-fold hit rates with the current selection rule (#15).

Each fold's Sagittal T2/STIR detector (from the version's fold artefacts) grades its validation
studies as training's validation rounds do (:func:`lumbar_ray.training.detector_validation.validation_records`,
whose choice of boxes is :func:`lumbar_ray.models.target_selection.select_target_detections`),
and the share of labelled levels found within 5 / 10 mm in 3-D is printed beside the version's
saved records (the rule it was trained with). The detections are cached in ``--cache``: a second
run (after a change to the selection code) takes seconds.

Usage (docs/RESULTS.md "The canal's levels read in order"):

    python docs/experiments/canal_level_rule.py --data /work/acq200/train \\
        --registry /work/acq200/models --version v20261202-105025-9ff0 --cache /tmp/canal.pkl
"""

from __future__ import annotations

import argparse
import os
import pickle

import pandas as pd

import lumbar_ray.training.detector_validation as validation
from lumbar_ray.metrics.labels import labelled_points, read_coordinates, read_labels
from lumbar_ray.models.detector import load_detector, prepare_detector_for_inference
from lumbar_ray.targets import SAGITTAL_T2
from lumbar_ray.training.artifacts import fold_dir, weights_file

JOB = "detector_sagittal_t2_stir"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the data root the version was trained on")
    p.add_argument("--registry", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--cache", required=True, help="pickle of the detections per (study, series)")
    return p


def rates(name: str, records: pd.DataFrame) -> str:
    d = records["dist_3d_mm"]
    return (f"{name}: {len(records)} levels, {records['detected'].mean():.1%} detected, within 5 mm in 3-D "
            f"{(d <= 5).mean():.1%}, within 10 mm {(d <= 10).mean():.1%}, beyond 25 mm {(d > 25).mean():.1%}, "
            f"on the labelled slice {records['right_slice'].mean():.1%}")


def main(args: argparse.Namespace) -> None:
    version_dir = f"{args.registry}/versions/{args.version}"
    folds = pd.read_parquet(f"{version_dir}/folds.parquet")
    points = labelled_points(read_labels(args.data), read_coordinates(args.data))
    cached = os.path.exists(args.cache)
    store = pickle.load(open(args.cache, "rb")) if cached else {}
    detect = validation.detect_series

    def detect_once(model, series, **kw):
        key = (str(series.study_id), str(series.series_id))
        if key not in store:
            store[key] = detect(model, series, **kw)
        return store[key]

    validation.detect_series = detect_once  # this script's process only
    parts = []
    for fold in sorted(folds["fold"].unique()):
        weights = f"{fold_dir(f'{args.registry}/runs/{args.version}/artifacts', JOB, int(fold))}/{weights_file(JOB)}"
        model = None if cached else prepare_detector_for_inference(load_detector(weights))
        ids = folds.loc[folds["fold"] == fold, "study_id"].astype(int).tolist()
        studies = validation.ValidationStudies(args.data, "train", ids, points, SAGITTAL_T2, cache_mb=4096)
        parts.append(validation.validation_records(model, studies, 0.01, "cpu")[0])
    with open(args.cache, "wb") as f:
        pickle.dump(store, f)
    saved = pd.read_parquet(f"{version_dir}/oof_detectors.parquet")
    print(rates("as trained", saved[saved["job"] == JOB]))
    print(rates("current code", pd.concat(parts, ignore_index=True)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
