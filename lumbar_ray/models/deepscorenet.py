"""DeepScoreNet, the severity CNN (3x32x32 crop -> 3 severity logits), its focal loss and inference.

Everything here is pure (numpy / torch, no Ray, no storage):

* :class:`DeepScoreNet` — a straight PyTorch transcription of the published Keras layout.
  2,784,259 trainable parameters plus 3,392 BatchNorm running-stat values = 2,787,651, the
  number Keras reports for the same layout.
* :class:`FocalLoss` — class-weighted multi-class focal loss (gamma = 3 in the paper), with
  :func:`class_weights_from_labels`.
* :func:`prepare_scorer_for_inference`, :func:`predict_proba` — batched softmax inference.

The crops it grades are cut by :mod:`lumbar_ray.models.crops`; training data and augmentation
are in :mod:`lumbar_ray.training.crop_data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lumbar_ray.targets import SEVERITIES

NUM_CLASSES = len(SEVERITIES)
# The "kind" of a shipped DeepScoreNet weights file (training.scorer_loop.scorer_weights_bytes).
SCORER_KIND = "deepscorenet"
# Keras BatchNormalization defaults: epsilon=1e-3, momentum=0.99 (moving = 0.99*moving + 0.01*batch).
KERAS_BN_EPS = 1e-3


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def keras_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow/Keras ``padding='same'`` along one axis.

    Output size is ``ceil(size / stride)``; the total padding needed is split with the smaller
    half *before* and the larger half *after* (asymmetric when odd), unlike PyTorch's symmetric
    ``padding=``. E.g. size 32, kernel 3, stride 2 -> (0, 1).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasSameMaxPool2d(nn.Module):
    """``keras.layers.MaxPooling2D(kernel, strides, padding='same')``.

    TensorFlow ignores padded cells in a max pool, i.e. pads with -inf; done explicitly with
    ``F.pad`` because PyTorch's ``MaxPool2d(padding=...)`` pads symmetrically.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = keras_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = keras_same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same' (Keras)"


class ResidualBlock(nn.Module):
    """n x [ReLU, Conv3x3(f, same), BN] -> MaxPool(3, 2, same) + Conv1x1(f, stride 2)(input).

    The 1x1 stride-2 residual conv needs no padding for Keras 'same' (total padding is always 0
    for a 1x1 kernel), and gives ceil(size / 2) like the pool, so the shapes always add up.
    """

    def __init__(self, in_channels: int, filters: int, n_convs: int, bn_momentum: float):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(n_convs):
            layers += [
                nn.ReLU(),  # not in-place: the block input also feeds the residual
                nn.Conv2d(channels, filters, kernel_size=3, padding=1, bias=True),
                nn.BatchNorm2d(filters, eps=KERAS_BN_EPS, momentum=bn_momentum),
            ]
            channels = filters
        self.body = nn.Sequential(*layers)
        self.pool = KerasSameMaxPool2d(3, 2)
        self.residual = nn.Conv2d(in_channels, filters, kernel_size=1, stride=2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)) + self.residual(x)


class DeepScoreNet(nn.Module):
    """The paper's severity CNN, transcribed layer by layer from its Keras layout.

    Keras layout (all convs ``padding='same'`` with bias, the Keras default)::

        x = Conv2D(32, 3)(in); x = BatchNormalization()(x); x = ReLU(x); prev = x
        for f, n in ((64, 2), (128, 4), (256, 4)):
            n x [ReLU, Conv2D(f, 3), BatchNormalization]
            x = MaxPooling2D(3, strides=2, padding='same')(x)
            x = add([x, Conv2D(f, 1, strides=2, padding='same')(prev)]); prev = x
        GlobalAveragePooling2D -> Dense(256, relu) -> Dense(128, relu) -> Dense(3, softmax)

    ``forward`` returns logits (softmax at inference, see :func:`predict_proba`). At 3x32x32:
    2,784,259 trainable parameters + 3,392 BN running statistics (1,696 channels x 2, which
    Keras counts as non-trainable parameters) = 2,787,651. Spatial size goes 32 -> 16 -> 8 -> 4.

    ``bn_momentum`` is PyTorch's convention (weight of the *new* batch). Keras' default 0.99
    corresponds to 0.01; the PyTorch default 0.1 is used here because with short trainings
    Keras' slow moving averages leave eval-mode statistics far from the data.
    ``keras_init`` uses Keras' initialisers (Glorot-uniform kernels, zero biases).
    """

    BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 4), (256, 4))

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = NUM_CLASSES,
        bn_momentum: float = 0.1,
        keras_init: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, bias=True),
            nn.BatchNorm2d(32, eps=KERAS_BN_EPS, momentum=bn_momentum),
            nn.ReLU(),
        )
        blocks = []
        channels = 32
        for filters, n_convs in self.BLOCKS:
            blocks.append(ResidualBlock(channels, filters, n_convs, bn_momentum))
            channels = filters
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        if keras_init:
            self._keras_init()

    def _keras_init(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    bn_running_stats: int  # running_mean + running_var values (Keras' non-trainable params)

    @property
    def keras_total(self) -> int:
        return self.trainable + self.bn_running_stats


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable parameters and BatchNorm running-stat values (``num_batches_tracked`` excluded)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    running = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            running += m.running_mean.numel() + m.running_var.numel()
    return ParameterCount(trainable, running)


# --------------------------------------------------------------------------------------------
# Loss and class weights
# --------------------------------------------------------------------------------------------


class FocalLoss(nn.Module):
    """Class-weighted multi-class focal loss (Lin et al. 2017).

    Per sample with true class t: ``loss = -w[t] * (1 - p_t) ** gamma * log(p_t)``, p = softmax.
    ``reduction='mean'`` divides by the number of (non-ignored) samples, like Keras'
    ``CategoricalFocalCrossentropy`` (not by the sum of weights as ``F.cross_entropy(weight=)``
    does); with :func:`class_weights_from_labels` the average weight per sample is 1, so the
    scale matches the unweighted loss. ``gamma=0`` without weights is exactly cross entropy.
    Targets equal to ``ignore_index`` (missing label, -1) are dropped.
    """

    def __init__(
        self,
        gamma: float = 3.0,
        class_weights: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -1,
    ):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        self.gamma = float(gamma)
        self.reduction = reduction
        self.ignore_index = ignore_index
        if class_weights is None:
            self.register_buffer("class_weights", None)
        else:
            self.register_buffer("class_weights", torch.as_tensor(np.asarray(class_weights, dtype=np.float32)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        valid = target != self.ignore_index
        logits, target = logits[valid], target[valid]
        log_p = F.log_softmax(logits.float(), dim=1)
        log_p_t = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        p_t = log_p_t.exp()
        loss = -((1.0 - p_t).clamp_min(0.0) ** self.gamma) * log_p_t
        if self.class_weights is not None:
            loss = loss * self.class_weights.to(loss.device)[target]
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        if loss.numel() == 0:  # a batch of only missing labels: zero, but keep the graph
            return logits.sum() * 0.0
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts of each class id; missing labels (< 0) are ignored."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    labels = labels[labels >= 0]
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} out of range for {num_classes} classes")
    return np.bincount(labels, minlength=num_classes)


def class_weights_from_labels(labels: Sequence[int] | np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Inverse-frequency class weights, normalised so the mean weight per *sample* is 1.

    ``w_c = N / (K * n_c)`` (scikit-learn's ``class_weight='balanced'``), so
    ``sum_c n_c * w_c = N``. A class absent from ``labels`` is counted as 1 (a large but finite
    weight). Missing labels (-1) are ignored.
    """
    counts = class_counts(labels, num_classes)
    n = counts.sum()
    if n == 0:
        return np.ones(num_classes, dtype=np.float32)
    return (n / (num_classes * np.maximum(counts, 1))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prepare_scorer_for_inference(model: nn.Module) -> nn.Module:
    """Scoring-only speed-ups, in place: every Conv2d directly followed by a BatchNorm2d in a
    Sequential becomes one convolution (eval-mode statistics folded in; the BatchNorm becomes
    Identity) and the weights are stored channels-last. Same probabilities up to float rounding
    (tested); about a third faster on this project's CPU. Not for a model that will be trained
    again."""
    model.eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    crops: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    fixed_batch: bool = False,
) -> np.ndarray:
    """Softmax probabilities (N, num_classes) float32 of crops (N, C, H, W), in eval mode
    (the model's previous train/eval mode is restored afterwards).

    ``fixed_batch``: every forward pass gets exactly ``batch_size`` crops, the last one padded
    with zeros whose outputs are dropped (in eval mode each crop's output depends on that crop
    alone). Why: a long-lived CPU process that feeds the network ever new batch sizes grows
    without bound — glibc keeps the heap that each new size's activations fragmented
    (``python docs/experiments/scorer_memory.py`` measures it). One shape per model keeps the
    scoring actors' memory flat over a run of any length."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n = len(crops)
    num_classes = getattr(model, "num_classes", NUM_CLASSES)
    out = np.empty((n, num_classes), dtype=np.float32)
    try:
        for start in range(0, n, batch_size):
            batch = crops[start : start + batch_size]
            batch = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
            m = len(batch)
            if fixed_batch and m < batch_size:
                batch = torch.cat([batch, batch.new_zeros((batch_size - m, *batch.shape[1:]))])
            logits = model(batch.to(device=device, dtype=torch.float32))
            out[start : start + m] = torch.softmax(logits[:m].float(), dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return out
