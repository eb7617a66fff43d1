"""One-off A/B of the canal detector's training (negatives, epochs, learning rate) and of the
slice-selection rules, kept as the record of the rule table in docs/RESULTS.md. One process, one thread,
no Ray: detector_fit.fit_detector on the training studies of fold 0 of an earlier CV run, then every
rule of select_target_detections on the same detections of fold 0's validation studies.

  python docs/experiments/detector_training_ab.py "Sagittal T2/STIR" detector_sagittal_t2_stir \
      '{"neg": 2, "gap": 1, "warmup": 3, "epochs": 60}' cv200 registry/runs/VERSION/artifacts

(table rows: {"neg": 0, "warmup": 3}, {"neg": 2, "gap": 1, "warmup": 3} and the line above.)
"""
import sys, json, time, numpy as np, pandas as pd, torch
torch.set_num_threads(1)
from lumbar_ray.models import ultralytics_env
from lumbar_ray.dicom.read import read_study
ultralytics_env.configure()
from lumbar_ray.models.detector_inference import detect_series
from lumbar_ray.models.target_selection import select_target_detections
from lumbar_ray.training.detector_data import load_detector_samples
from lumbar_ray.training.detector_eval import HitRates, detector_hit_rates
from lumbar_ray.training.detector_fit import fit_detector
R = sys.argv[4]  # the synthetic set (cv200)
# a CV version's artifacts (registry/runs/VERSION/artifacts): its fold-0 validation studies are reused
A = sys.argv[5]
series_type, job = sys.argv[1], sys.argv[2]
cfg = json.loads(sys.argv[3])
coords = pd.read_csv(f"{R}/train_label_coordinates.csv")
val = sorted(pd.read_parquet(f"{A}/{job}/fold0/oof.parquet").study_id.unique())
allst = sorted(pd.read_csv(f"{R}/train.csv").study_id)
train = [s for s in allst if s not in set(val)]
t0 = time.time()
samples = load_detector_samples(R, "train", train, coords, series_type, negatives=cfg.get("neg", 0), negative_gap=cfg.get("gap", 2))
print(len(samples), "samples", flush=True)
model, hist = fit_detector(samples, None, series_type, epochs=cfg.get("epochs", 30), imgsz=128, lr=cfg.get("lr", 2e-3),
                           warmup_epochs=cfg.get("warmup", 1.0))
print("history", hist[-1], f"{time.time()-t0:.0f}s", flush=True)
parts = {"max": [], "centroid": [], "slice": []}
for sid in val:
    st = read_study(R, sid, "train")
    s = st.series.get(series_type)
    if s is None: continue
    dets = detect_series(model, s, conf=0.01)
    for rule in parts:
        parts[rule].append(detector_hit_rates(select_target_detections(dets, series_type, s, rule=rule), coords, s))
for rule, p in parts.items():
    print(cfg, rule, {k: round(v, 3) for k, v in HitRates.merge(p).as_dict().items()}, flush=True)
