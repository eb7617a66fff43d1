"""One-off check of the assigned-score floor (models/detector.py ASSIGNED_SCORE_FLOOR), kept as the
record of its lines in docs/RESULTS.md. It continues a collapsed detector fit from its full state
(weights, AdamW moments, EMA), as the CV trial would have gone on, for a few epochs with a given
floor (0 = Ultralytics' assigner unchanged), and prints each epoch's losses and validation.
First it prints what the assigner makes of 16 training slices in the collapsed state (EPOCHS 0:
only that).

  python docs/experiments/collapsed_detector_resume.py EXAMPLES STATE FLOOR EPOCHS LR
  EXAMPLES: the run's example shards ({storage}/{version}/examples, kept while the run is live)
  STATE: the collapsed trial's checkpoint state.pt; fold 1 of Sagittal T1, imgsz 128 (the demo's)
"""
import sys
import time

import torch

import lumbar_ray.models.detector as det
from lumbar_ray.targets import SAGITTAL_T1
from lumbar_ray.training.detector_data import DetectorDataset, collate_detector
# a one-off record: the fit object fit_detector builds inside, to load a trial's state into it
from lumbar_ray.training.detector_fit import _start_local_fit
from lumbar_ray.training.shard_data import fold_chunks
from lumbar_ray.training.shards import Manifest, ShardedSamples

examples, state_path, floor, epochs, lr = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
torch.set_num_threads(1)
manifest = Manifest.read(examples)
train_chunks, val_chunks = fold_chunks(manifest, 1)
train = DetectorDataset.from_samples(ShardedSamples(manifest.root, SAGITTAL_T1, train_chunks), SAGITTAL_T1, imgsz=128,
                                     box_mm=20.0, augment=True)
val = DetectorDataset.from_samples(ShardedSamples(manifest.root, SAGITTAL_T1, val_chunks), SAGITTAL_T1, imgsz=128,
                                   box_mm=20.0, augment=False)
floored = det.floor_assigned_scores
det.floor_assigned_scores = lambda assigner: floored(assigner, floor)  # read when the loss is built
state = torch.load(state_path, weights_only=True)
torch.manual_seed(1)
fit = _start_local_fit(det.build_detector(SAGITTAL_T1, imgsz=128, box_mm=20.0, seed=0), train, torch.device("cpu"),
                       epochs=epochs, batch_size=16, lr=lr, weight_decay=5e-4, warmup_epochs=0.0, use_ema=True,
                       seed=1, num_workers=0)
fit.model.load_state_dict(state["model"])
fit.optimizer.load_state_dict(state["optimizer"])  # the trial's AdamW moments
for group in fit.optimizer.param_groups:
    group["lr"] = group["initial_lr"] = lr
fit.scheduler.base_lrs = [lr] * len(fit.scheduler.base_lrs)
fit.ema.ema.load_state_dict(state["ema"])
val_loader = torch.utils.data.DataLoader(val, batch_size=16, shuffle=False, collate_fn=collate_detector)


def assignment_on(model, images: int = 16) -> str:
    """What the assigner makes of ``images`` training slices (un-augmented): anchors assigned,
    the sum of their target scores, and the loss parts."""
    plain = DetectorDataset.from_samples(ShardedSamples(manifest.root, SAGITTAL_T1, train_chunks), SAGITTAL_T1,
                                         imgsz=128, box_mm=20.0, augment=False)
    batch = collate_detector([plain[i] for i in range(0, len(plain), max(1, len(plain) // images))][:images])
    seen = []
    assigner = fit.loss_fn.criterion.assigner
    inner = assigner._forward
    assigner._forward = lambda *a, **k: seen.append(inner(*a, **k)) or seen[-1]
    model.train()
    with torch.no_grad():
        _, parts = fit.loss_fn(model(batch["img"]), batch)
    assigner._forward = inner
    _, _, scores, fg, _ = seen[-1]
    return (f"{len(batch['img'])} images, {batch['bboxes'].shape[0]} targets: {int(fg.sum())} anchors assigned, "
            f"target score sum {float(scores.sum()):.3f}, " + ", ".join(f"{k} {float(v):.3f}" for k, v in parts.items()))


print(f"floor {floor}, the collapsed state:", assignment_on(fit.model))
start = time.time()
for epoch in range(epochs):
    stats, _ = fit.run_epoch(epoch, precise_bn=True, val_loader=val_loader, validate=True)
    print(f"floor {floor} lr {lr} epoch {epoch + 1}:", {k: round(v, 3) for k, v in stats.items() if k in (
        "box_loss", "cls_loss", "dfl_loss", "val_box_loss", "val_n_found")}, flush=True)
print(f"{time.time() - start:.0f} s")
