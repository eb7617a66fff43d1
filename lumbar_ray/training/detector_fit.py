"""Training a detector: a plain PyTorch loop around Ultralytics' model and loss (DDP-friendly, so the
same epochs run under Ray Train), BatchNorm recalibration, per-image validation, and a local fit.

Pass a DDP-wrapped model to :func:`train_one_epoch`, and a loss built with
:func:`lumbar_ray.models.detector.make_loss_fn` on the *unwrapped* model (``v8DetectionLoss``
reads the Detect head).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lumbar_ray.models.detector import DEFAULT_IMGSZ, build_detector, import_ultralytics, make_loss_fn, unwrap_model
from lumbar_ray.training.detector_data import DetectorAugment, DetectorDataset, collate_detector

log = logging.getLogger(__name__)

__all__ = [
    "DetectorFit",
    "evaluate",
    "fit_detector",
    "make_optimizer",
    "make_scheduler",
    "recalibrate_batchnorm",
    "train_one_epoch",
]



def make_optimizer(model: nn.Module, lr: float = 2e-3, weight_decay: float = 5e-4, betas=(0.9, 0.999)):
    """AdamW with weight decay on conv/linear weights only (not on norms and biases), as
    Ultralytics groups them."""
    decay, no_decay = [], []
    for module in unwrap_model(model).modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias" or isinstance(module, nn.modules.batchnorm._NormBase) or "norm" in type(module).__name__.lower():
                no_decay.append(p)
            else:
                decay.append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas
    )


def make_scheduler(optimizer, total_steps: int, warmup_steps: int = 0, final_lr_ratio: float = 0.05):
    """Per-iteration LambdaLR: linear warm-up, then cosine decay to ``final_lr_ratio`` x lr."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _targets_to(batch: Mapping[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
    *,
    scheduler=None,
    ema=None,
    max_grad_norm: float | None = 10.0,
) -> dict[str, float]:
    """One pass over ``loader``. ``model`` may be DDP-wrapped: the forward goes through the
    wrapper (gradient sync), the loss reads its head outputs via ``loss_fn`` (built on the
    unwrapped model, :func:`lumbar_ray.models.detector.make_loss_fn`). ``scaler`` turns on CUDA
    autocast (fp16); ``scheduler`` steps per iteration; ``ema`` (Ultralytics ``ModelEMA``)
    updates per step.

    Returns means per image of ``loss`` (box+cls+dfl with Ultralytics' gains) and its parts,
    ``n_images``, ``seconds``, ``images_per_s``, ``lr`` (at the end).
    """
    device = torch.device(device)
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)
    n_img = 0
    n_batches = 0
    t0 = time.perf_counter()
    use_amp = scaler is not None and device.type == "cuda"
    names = getattr(loss_fn, "loss_names", ("box_loss", "cls_loss", "dfl_loss"))
    for batch in loader:
        batch = _targets_to(batch, device)
        imgs = batch["img"]
        bs = imgs.shape[0]
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            preds = model(imgs)
            loss, items = loss_fn(preds, batch)
        total = loss.sum()
        if not torch.isfinite(total):
            log.warning("non-finite detector loss %s; batch skipped", loss.detach().cpu().tolist())
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            if max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            if max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        sums += torch.stack([items[k].detach().float().cpu() for k in names]).double() * bs
        n_img += bs
        n_batches += 1
    secs = time.perf_counter() - t0
    out = {k: float(v / max(1, n_img)) for k, v in zip(names, sums)}
    out["loss"] = float(sums.sum() / max(1, n_img))
    out.update(
        n_images=n_img,
        n_batches=n_batches,
        seconds=secs,
        images_per_s=n_img / secs if secs > 0 else float("nan"),
        lr=float(optimizer.param_groups[0]["lr"]),
    )
    return out


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> int:
    """Recompute BatchNorm running statistics as plain averages over ``loader`` ("precise BN").

    Run it on the model you will save (e.g. the EMA model) with un-augmented training images,
    after the last epoch: the running averages collected during training describe weights that
    no longer exist. Works on the unwrapped model (run it on one rank, or on each rank's shard);
    leaves the model in eval mode. Returns the number of images seen.
    """
    bare = unwrap_model(model)
    bns = [m for m in bare.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    bare.train()
    n = 0
    device = torch.device(device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        imgs = batch["img"].to(device, non_blocking=True)
        bare(imgs)
        n += imgs.shape[0]
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    bare.eval()
    return n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    loss_fn=None,
    device: torch.device | str = "cpu",
    *,
    conf: float = 0.01,
    iou: float = 0.5,
    tolerances_mm: Sequence[float] = (5.0, 10.0),
) -> dict[str, float]:
    """Validation loss (if ``loss_fn``) and per-image localisation on labelled slices.

    For each labelled box, the most confident detection of its class *on that image* is a hit
    at tolerance t if its centre lies within t mm of the labelled point. (Choosing the slice is
    not measured here; :func:`lumbar_ray.training.detector_eval.detector_hit_rates` does that on
    whole series.) Runs the unwrapped model. Counts (``n_images``, ``n_targets``, ``n_found``,
    ``hits_<t>mm``) are returned next to rates so DDP ranks can all-reduce them.
    """
    _, _, _, nms = import_ultralytics()
    device = torch.device(device)
    bare = unwrap_model(model)
    was_training = bare.training
    bare.eval()
    names = getattr(loss_fn, "loss_names", ("box_loss", "cls_loss", "dfl_loss"))
    sums = torch.zeros(3, dtype=torch.float64)
    n_img = n_tgt = n_found = 0
    hits = {float(t): 0 for t in tolerances_mm}
    for batch in loader:
        batch = _targets_to(batch, device)
        y, raw = bare(batch["img"])
        bs = batch["img"].shape[0]
        if loss_fn is not None:
            _, items = loss_fn(raw, batch)
            sums += torch.stack([items[k].float().cpu() for k in names]).double() * bs
        dets = [d.cpu() for d in nms(y, conf_thres=conf, iou_thres=iou, multi_label=True, max_det=300)]
        bidx = batch["batch_idx"].long().cpu()
        cls = batch["cls"].view(-1).long().cpu()
        pts = batch["points"].cpu()
        mmpp = batch["mm_per_px"].cpu()
        for j in range(len(cls)):
            b = int(bidx[j])
            d = dets[b]
            n_tgt += 1
            d = d[d[:, 5].long() == cls[j]]
            if len(d) == 0:
                continue
            n_found += 1
            best = d[d[:, 4].argmax()]
            cx, cy = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
            dist = math.hypot(float(cx - pts[j, 0]) * float(mmpp[b, 0]), float(cy - pts[j, 1]) * float(mmpp[b, 1]))
            for t in hits:
                hits[t] += dist <= t
        n_img += bs
    if was_training:
        bare.train()
    out: dict[str, float] = {"n_images": n_img, "n_targets": n_tgt, "n_found": n_found}
    if loss_fn is not None:
        out.update({k: float(v / max(1, n_img)) for k, v in zip(names, sums)})
        out["loss"] = float(sums.sum() / max(1, n_img))
    for t, h in hits.items():
        out[f"hits_{t:g}mm"] = h
        out[f"hit_rate_{t:g}mm"] = h / n_tgt if n_tgt else float("nan")
    return out



def _as_dataset(data, series_type: str, imgsz: int, box_mm: float | None, augment) -> DetectorDataset:
    if isinstance(data, DetectorDataset):
        if data.series_type != series_type:
            raise ValueError(f"dataset is for {data.series_type!r}, not {series_type!r}")
        return DetectorDataset(
            series_type=series_type, imgsz=imgsz, box_mm=box_mm if box_mm is not None else data.box_mm,
            augment=augment, samples=data.samples,
        )
    return DetectorDataset.from_samples(list(data), series_type, imgsz=imgsz, box_mm=box_mm, augment=augment)


@dataclass
class DetectorFit:
    """One detector's training in progress: what each epoch steps, and the model it yields.

    :func:`fit_detector` drives it in one process, and
    :func:`lumbar_ray.training.detector_loop.detector_worker_loop` in a Ray Train worker, with a
    DDP-wrapped ``model`` and a sharded ``loader``: both run :meth:`run_epoch`. Validation,
    BatchNorm recalibration and the final model use the EMA weights when ``ema`` (Ultralytics
    ``ModelEMA``) is given.
    """

    model: nn.Module  # may be DDP-wrapped
    loss_fn: Any  # lumbar_ray.models.detector.make_loss_fn of the unwrapped model
    loader: Iterable[Mapping[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    scheduler: Any  # stepped per iteration
    device: torch.device
    train_data: DetectorDataset  # its un-augmented view recalibrates BatchNorm
    batch_size: int
    epochs: int  # the schedule's length
    ema: Any = None
    scaler: torch.amp.GradScaler | None = None  # CUDA autocast when given

    @property
    def eval_model(self) -> nn.Module:
        """The weights validated and kept: the EMA's when there is one."""
        return self.ema.ema if self.ema is not None else self.model

    def train_epoch(self) -> dict[str, float]:
        """One pass over :attr:`loader` (:func:`train_one_epoch`)."""
        return train_one_epoch(self.model, self.loader, self.optimizer, self.loss_fn, self.device, self.scaler,
                               scheduler=self.scheduler, ema=self.ema)

    def run_epoch(
        self, epoch: int, *, deadline: float | None = None, precise_bn: bool = True,
        val_loader: Iterable[Mapping[str, torch.Tensor]] | None = None, validate: bool = True,
    ) -> tuple[dict[str, float], bool]:
        """Train epoch ``epoch`` (0-based; a sharded loader's sampler reshuffles by it). If it is
        the last — the schedule's, or the first to end past ``deadline`` (``time.perf_counter``)
        — recalibrate BatchNorm when ``precise_bn``. Then validate on ``val_loader`` when given,
        if ``validate`` or last. Returns the epoch's metrics and whether it was the last."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        stats = self.train_epoch()
        last = epoch == self.epochs - 1 or (deadline is not None and time.perf_counter() > deadline)
        if last and precise_bn:
            self.recalibrate_batchnorm()
        if val_loader is not None and (validate or last):
            stats.update(self.validate(val_loader))
        return stats, last

    def state_dict(self) -> dict[str, Any]:
        """What resumes this fit: the unwrapped model's, the EMA's, the optimizer's and the
        schedule's state."""
        state = {"model": unwrap_model(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.ema is not None:
            state.update(ema=self.ema.ema.state_dict(), ema_updates=self.ema.updates)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (extra keys are ignored)."""
        unwrap_model(self.model).load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.ema.load_state_dict(state["ema"])
            self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def recalibrate_batchnorm(self, model: nn.Module | None = None) -> int:
        """:func:`recalibrate_batchnorm` of :attr:`eval_model` (or ``model``, e.g. a copy of it
        graded before the last epoch) on the un-augmented training images: after the last epoch,
        or the saved model can detect nothing in eval mode."""
        plain = torch.utils.data.DataLoader(self.train_data.with_augment(False), batch_size=self.batch_size,
                                            shuffle=False, collate_fn=collate_detector)
        return recalibrate_batchnorm(self.eval_model if model is None else model, plain, self.device)

    def validate(self, val_loader: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """:func:`evaluate` of :attr:`eval_model` on ``val_loader``, keys prefixed ``val_``."""
        return {f"val_{k}": v for k, v in evaluate(self.eval_model, val_loader, self.loss_fn, self.device).items()}

    def final_model(self) -> nn.Module:
        """:attr:`eval_model` with the trained model's metadata (names, args, series_type, imgsz,
        box_mm), in eval mode."""
        final = self.eval_model
        for attr in ("names", "args", "series_type", "imgsz", "box_mm"):
            setattr(final, attr, getattr(unwrap_model(self.model), attr))
        final.eval()
        return final


def _start_local_fit(
    model: nn.Module, train_ds: DetectorDataset, device: torch.device, *, epochs: int, batch_size: int, lr: float,
    weight_decay: float, warmup_epochs: float, use_ema: bool, seed: int, num_workers: int,
) -> DetectorFit:
    """A :class:`DetectorFit` in this process: seeded shuffling, AdamW with warm-up and cosine
    decay over ``epochs``, EMA weights when ``use_ema``, AMP on CUDA."""
    model = model.to(device)
    loss_fn = make_loss_fn(model)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size,
        collate_fn=collate_detector, num_workers=num_workers, generator=gen,
        persistent_workers=num_workers > 0,
    )
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, len(loader))
    scheduler = make_scheduler(optimizer, steps, int(warmup_epochs * len(loader)))
    ema = None
    if use_ema:
        # heavy: ultralytics, configured already by make_loss_fn above
        from ultralytics.utils.torch_utils import ModelEMA

        ema = ModelEMA(model)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    return DetectorFit(model, loss_fn, loader, optimizer, scheduler, device, train_ds, batch_size, epochs, ema, scaler)


def fit_detector(
    train_samples,
    val_samples,
    series_type: str,
    epochs: int = 30,
    imgsz: int = DEFAULT_IMGSZ,
    batch_size: int = 16,
    lr: float = 2e-3,
    device: torch.device | str = "cpu",
    *,
    box_mm: float | None = None,
    augment: bool | DetectorAugment = True,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 1.0,
    use_ema: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    eval_every: int = 1,
    time_budget_s: float | None = None,
    model: nn.Module | None = None,
    precise_bn: bool = True,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a detector locally (no Ray): for tests and small runs.

    ``train_samples``/``val_samples``: a :class:`~lumbar_ray.training.detector_data.DetectorDataset`
    or a sequence of :class:`~lumbar_ray.training.detector_data.DetectorSample` (``val_samples``
    may be empty/None). Returns the trained model (the EMA weights when ``use_ema``), in eval mode
    on ``device``, and one history row per epoch (train metrics, ``val_*`` metrics from
    :func:`evaluate`). ``time_budget_s`` stops early (the learning-rate schedule still assumes
    ``epochs``). ``precise_bn``: after the last epoch, recompute BatchNorm statistics of the
    returned model on the un-augmented training images (:func:`recalibrate_batchnorm`; the last
    ``val_*`` row is measured after it).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    train_ds = _as_dataset(train_samples, series_type, imgsz, box_mm, augment)
    val_ds = _as_dataset(val_samples, series_type, imgsz, train_ds.box_mm, False) if val_samples else None
    if len(train_ds) == 0:
        raise ValueError("no training samples")
    if model is None:
        model = build_detector(series_type, imgsz=imgsz, box_mm=train_ds.box_mm, seed=seed)
    run = _start_local_fit(model, train_ds, device, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, warmup_epochs=warmup_epochs, use_ema=use_ema, seed=seed,
                           num_workers=num_workers)
    val_loader = (
        torch.utils.data.DataLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_detector)
        if val_ds is not None and len(val_ds)
        else None
    )
    history: list[dict[str, float]] = []
    deadline = time.perf_counter() + time_budget_s if time_budget_s is not None else None
    for epoch in range(epochs):
        stats, last = run.run_epoch(epoch, deadline=deadline, precise_bn=precise_bn, val_loader=val_loader,
                                    validate=(epoch + 1) % max(1, eval_every) == 0)
        row: dict[str, float] = {"epoch": epoch + 1, **stats}
        history.append(row)
        log.info("detector %s epoch %d: %s", series_type, epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if last:
            break
    return run.final_model(), history
