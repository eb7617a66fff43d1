"""Add the patient-space (3-D) distance to an older version's out-of-fold detector records (#3).

Versions trained before ``dist_3d_mm`` existed recorded only the in-plane distance and whether
the detection was on the labelled instance. This script re-reads each validation series'
geometry (headers and pixels, from the data root the version was trained on), puts both the
labelled point (instance, x, y) and the detection (instance, x, y) into patient coordinates
and prints the detector table of ``lumbar_ray.training.cv_metrics.detector_metrics`` with the ``*_3d`` columns
filled, as training now writes it.

Usage: python docs/experiments/detector_3d_distance.py --data DATA --registry REG@VERSION
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from lumbar_ray.dicom.read import read_series
from lumbar_ray.models.registry import ModelRegistry, parse_model_spec
from lumbar_ray.training.cv_metrics import detector_metrics


def add_3d_distance(records: pd.DataFrame, data_root: str) -> pd.DataFrame:
    records = records.copy()
    records["dist_3d_mm"] = np.nan
    for (study_id, series_id), part in records.groupby(["study_id", "series_id"]):
        series = read_series(f"{data_root}/train_images/{study_id}/{series_id}")
        for i, rec in part.iterrows():
            if not rec["detected"]:
                continue
            label = series.pixel_to_patient(series.index_of_instance(int(rec["instance_number"])), rec["x"], rec["y"])
            found = series.pixel_to_patient(series.index_of_instance(int(rec["det_instance_number"])),
                                            rec["det_x"], rec["det_y"])
            records.loc[i, "dist_3d_mm"] = float(np.linalg.norm(found - label))
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--registry", required=True)
    args = p.parse_args()
    root, version = parse_model_spec(args.registry)
    version = ModelRegistry(root).resolve(version)
    records = pd.read_parquet(f"{root}/versions/{version}/oof_detectors.parquet")
    records = add_3d_distance(records, args.data)
    table = detector_metrics(records)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    misses = records[records["detected"] & ~records["right_slice"].fillna(False).astype(bool)]
    for job, part in misses.groupby("job"):
        q = part["dist_3d_mm"].quantile([0.1, 0.5, 0.9]).round(2).tolist()
        print(f"{job}: {len(part)} detections off the labelled instance; 3-D distance 10/50/90 %: {q} mm")


if __name__ == "__main__":
    main()
