"""One-off A/B: how many studies and epochs the demo's detectors need (record of DemoSizes).

One process, one thread, no Ray: detector_fit.fit_detector on the first N training studies of fold
!= 0 of a CV version's folds, then hit rates on the first V studies of fold 0 (the default
slice-selection rule). Used with the demo's own data and folds (16 training studies) and with
the 200-study set (cv200, N = 32 and 48):

  python docs/experiments/demo_detector_ab.py DATA FOLDS.parquet "Sagittal T1" \\
      '{"n": 32, "val": 24, "epochs": 30, "lr": 2e-3, "warmup": 3, "neg": 2, "gap": 1}'
"""
import json
import sys
import time

import pandas as pd
import torch

torch.set_num_threads(1)
from lumbar_ray.models import ultralytics_env  # noqa: E402
from lumbar_ray.dicom.read import read_study

ultralytics_env.configure()
from lumbar_ray.models.detector_inference import detect_series  # noqa: E402
from lumbar_ray.models.target_selection import select_target_detections  # noqa: E402
from lumbar_ray.training.detector_data import load_detector_samples  # noqa: E402
from lumbar_ray.training.detector_eval import HitRates, detector_hit_rates  # noqa: E402
from lumbar_ray.training.detector_fit import fit_detector  # noqa: E402

root, folds_path, series_type, cfg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
folds = pd.read_parquet(folds_path)
coords = pd.read_csv(f"{root}/train_label_coordinates.csv")
val = sorted(folds[folds.fold == 0].study_id)[: cfg.get("val")]
train = sorted(folds[folds.fold != 0].study_id)[: cfg.get("n")]
t0 = time.time()
torch.manual_seed(0)
samples = load_detector_samples(root, "train", train, coords, series_type, negatives=cfg.get("neg", 0),
                                negative_gap=cfg.get("gap"))
model, hist = fit_detector(samples, None, series_type, epochs=cfg.get("epochs", 10), imgsz=128,
                           lr=cfg.get("lr", 2e-3), warmup_epochs=cfg.get("warmup", 1.0), batch_size=cfg.get("bs", 16))
parts = []
for sid in val:
    series = read_study(root, sid, "train").series.get(series_type)
    if series is not None:
        dets = detect_series(model, series, conf=0.01)
        parts.append(detector_hit_rates(select_target_detections(dets, series_type, series), coords, series))
print(series_type, cfg, f"{len(train)} train studies, {len(samples)} samples, {time.time() - t0:.0f} s",
      {k: round(v, 3) for k, v in HitRates.merge(parts).as_dict().items()}, flush=True)
