"""One-off A/B of DeepScoreNet's inputs (1 slice repeated vs 2.5D adjacent slices; 32 px vs
crops in mm), kept as the record of the scorer table in docs/RESULTS.md. No Ray: crops at the labelled
points of cv200 (cached by crops.py below), studies with id % 3 == 0 held out, the training
recipe of lumbar_ray.training.scorer_loop.scorer_worker_loop (CropDataset oversampling x4, class-weighted focal
loss gamma 3, AdamW + cosine), RSNA metric on the held-out rows vs the prior baselines fitted on
the training rows.

  python docs/experiments/scorer_crops.py repeat none && python docs/experiments/scorer_ab.py repeat_none '{"epochs": 6}' 1
"""
import sys, pickle, time, json, numpy as np, pandas as pd, torch
from lumbar_ray.models.deepscorenet import DeepScoreNet, FocalLoss, class_weights_from_labels, predict_proba
from lumbar_ray.training.crop_data import CropDataset
from lumbar_ray.metrics.rsna import rsna_score, prediction_frame, weighted_prior_baseline, prior_baseline, PROBS
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
crops, pts = pickle.load(open(f"work/experiments/crops_{sys.argv[1]}.pkl", "rb"))
cfg = json.loads(sys.argv[2])
epochs = cfg.get("epochs", 12)
sids = pts.study_id.to_numpy()
val = (sids % 3) == 0
labels = pts.label.to_numpy()
torch.manual_seed(0)
ds = CropDataset(crops[~val], labels[~val], max_factor=cfg.get("over", 4.0), oversample=cfg.get("over", 4.0) > 1, seed=0)
dl = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True)
model = DeepScoreNet(in_channels=3)
w = cfg.get("w", "inv")
cw = None if w == "none" else (class_weights_from_labels(labels[~val]) if w == "inv" else np.array(w, dtype=np.float32))
loss_fn = FocalLoss(gamma=cfg.get("gamma", 3.0), class_weights=cw)
opt = torch.optim.AdamW(model.parameters(), lr=cfg.get("lr", 1e-3), weight_decay=1e-4)
sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
train_cols = pts.column[~val].to_numpy()
def score(probs):
    fr = prediction_frame(sids[val], pts.column[val], labels[val], probs)
    return rsna_score(fr).score
def prior(weighted):
    tr = pd.DataFrame({"study_id": sids[~val], "column": pts.column[~val], "label": labels[~val]})
    tab = prior_baseline(tr, weighted=weighted)
    return tab.loc[pts.column[val].to_numpy(), PROBS].to_numpy()
t0 = time.time()
for ep in range(epochs):
    ds.set_epoch(ep); model.train()
    for x, y in dl:
        opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()
    sch.step()
    if ep % 3 == 2 or ep == epochs - 1:
        p = predict_proba(model, crops[val])
        # temperature fitted on the val set itself = oracle upper bound of calibration
        logits = np.log(np.clip(p, 1e-7, 1))
        best = min((score(np.exp(logits / T) / np.exp(logits / T).sum(1, keepdims=True)), T) for T in (0.5, 0.7, 1, 1.4, 2, 3))
        acc = (p.argmax(1) == labels[val]).mean()
        print(f"{sys.argv[1]} {cfg} ep{ep} {time.time()-t0:.0f}s rsna={score(p):.4f} acc={acc:.3f} bestT={best[1]}:{best[0]:.4f}", flush=True)
print(f"baselines prior={score(prior(False)):.4f} weighted_prior={score(prior(True)):.4f}")
