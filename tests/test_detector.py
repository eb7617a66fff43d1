"""The per-series-type YOLOv8 detector: model shape, loss, mm-sized boxes, letterbox geometry,
whole-series inference, selection, hit rates, persistence, DDP loop, and no network use."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

import lumbar_ray
from lumbar_ray.models import detector_preprocess
from lumbar_ray.models.detector import (
    CHECKPOINT_FORMAT,
    DEFAULT_BOX_MM,
    build_detector,
    load_detector,
    make_loss_fn,
    prepare_detector_for_inference,
    save_detector,
    unwrap_model,
)
from lumbar_ray.models.detector_inference import Detection, best_box_per_class, detect_series
from lumbar_ray.models.detector_preprocess import (
    Letterbox,
    letterbox_image,
    normalize_volume,
    percentiles,
    preprocess_slices,
    preprocess_volume,
    preprocess_volume_torch,
)
from lumbar_ray.models.levels import LocatedDetection, geometry_flags
from lumbar_ray.models.target_selection import select_target_detections
from lumbar_ray.scoring.study import _choose_sagittal
from lumbar_ray.training.detector_data import (
    DetectorDataset,
    DetectorSample,
    collate_detector,
    samples_from_series,
)
from lumbar_ray.training.detector_eval import HitRates, detector_hit_rates
from lumbar_ray.training.detector_fit import (
    evaluate,
    fit_detector,
    make_optimizer,
    make_scheduler,
    recalibrate_batchnorm,
    train_one_epoch,
)
from lumbar_ray.dicom.series import Series
from lumbar_ray.targets import (
    AXIAL_T2,
    SAGITTAL_T1,
    SAGITTAL_T2,
    detector_class_names,
    targets_for_series,
)


@pytest.fixture(scope="module", autouse=True)
def _ultralytics_offline(tmp_path_factory):
    """A private Ultralytics config dir for this test process (if nothing imported it yet)."""
    if "ultralytics" not in sys.modules:
        from lumbar_ray.models import ultralytics_env

        ultralytics_env.configure(tmp_path_factory.mktemp("ultralytics"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------- helpers


@dataclass
class FakeSeries:
    """The fields of lumbar_ray.dicom.series.Series the detector uses."""

    study_id: int
    series_id: int
    series_type: str
    volume: np.ndarray
    instance_numbers: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float = 4.0
    slice_spacing: float = 4.0
    plane: str = "sagittal"

    orientations: np.ndarray | None = None  # one orientation for every slice

    pixel_to_patient = Series.pixel_to_patient  # the real geometry, not a copy of it
    slice_orientation = Series.slice_orientation

    def index_of_instance(self, instance_number: int) -> int:
        hits = np.flatnonzero(self.instance_numbers == instance_number)
        if not len(hits):
            raise KeyError(instance_number)
        return int(hits[0])


def fake_series(series_type=SAGITTAL_T2, n=6, rows=120, cols=90, spacing=(0.8, 0.8), step=4.0, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.normal(200, 20, (n, rows, cols)).astype(np.float32)
    if series_type == AXIAL_T2:
        orient = np.array([1, 0, 0, 0, 1, 0], float)
        pos = np.array([[0.0, 0.0, -step * k] for k in range(n)])  # sorted along normal (0,0,1) ascending
        pos = pos[::-1].copy()
        plane = "axial"
    else:
        orient = np.array([0, 1, 0, 0, 0, -1], float)
        # normal = (-1, 0, 0): ascending dot(pos, normal) -> decreasing patient x (left -> right)
        pos = np.array([[step * (n - 1) / 2 - step * k, 0.0, 0.0] for k in range(n)])
        plane = "sagittal"
    return FakeSeries(1, 7, series_type, vol, np.arange(n) + 11, pos, orient, spacing, slice_spacing=step, plane=plane)


def canal_box(series, level, k, y, confidence, x=65.0, width=float("nan"), height=float("nan")):
    """A canal detector's box of disc ``level`` (0 = L1/L2) on slice ``k`` of ``series``."""
    cls = targets_for_series(SAGITTAL_T2)[level].detector_class_id
    return Detection(cls, k, int(series.instance_numbers[k]), x, y, confidence, width, height)


def blob_image(rows, cols, points, sigma=3.0, rng=None):
    rng = rng or np.random.default_rng(0)
    img = rng.normal(0.1, 0.02, (rows, cols)).astype(np.float32)
    yy, xx = np.mgrid[:rows, :cols]
    for x, y in points:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)
    return np.clip(img, 0, 1)


def blob_samples(n, rows=100, cols=80, spacing=(1.0, 1.0), seed=0, series_type=SAGITTAL_T2):
    rng = np.random.default_rng(seed)
    nc = len(targets_for_series(series_type))
    out = []
    for i in range(n):
        k = min(nc, 5)
        pts = np.array([[15 + 12 * c + rng.uniform(-3, 3), 12 + 17 * c + rng.uniform(-3, 3)] for c in range(k)])
        img = blob_image(rows, cols, pts, rng=rng)
        out.append(DetectorSample(1, 2, i + 1, np.rint(img * 255).astype(np.uint8), spacing, np.arange(k), pts))
    return out


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("series_type,nc", [(SAGITTAL_T1, 10), (SAGITTAL_T2, 5), (AXIAL_T2, 10)])
def test_model_per_series_type(series_type, nc):
    model = build_detector(series_type, imgsz=128)
    assert model.model[-1].nc == nc
    assert model.names == detector_class_names(series_type)
    assert len(model.names) == nc
    assert model.series_type == series_type and model.imgsz == 128
    assert model.box_mm == DEFAULT_BOX_MM[series_type]
    model.eval()
    with torch.no_grad():
        y, _ = model(torch.zeros(1, 3, 128, 128))
    assert y.shape[1] == 4 + nc


def test_unknown_series_type():
    with pytest.raises(KeyError):
        build_detector("Coronal T1")


def test_loss_finite_and_decreases():
    ds = DetectorDataset.from_samples(blob_samples(8), SAGITTAL_T2, imgsz=96, box_mm=40)
    batch = collate_detector([ds[i] for i in range(len(ds))])
    assert batch["img"].shape == (8, 3, 96, 96)
    assert batch["bboxes"].shape == (40, 4) and batch["cls"].shape == (40, 1) and batch["batch_idx"].shape == (40,)
    assert torch.equal(batch["batch_idx"], torch.arange(8).repeat_interleave(5).float())
    assert float(batch["bboxes"].min()) >= 0 and float(batch["bboxes"].max()) <= 1
    torch.manual_seed(0)
    model = build_detector(SAGITTAL_T2, imgsz=96)
    loss_fn = make_loss_fn(model)
    opt = make_optimizer(model, lr=2e-3)
    losses = [train_one_epoch(model, [batch], opt, loss_fn, "cpu")["loss"] for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    # v8's task-aligned assigner gives ~0 box loss while predicted boxes are still huge, so the
    # loss first rises, then falls: compare the end with the early peak.
    assert np.mean(losses[-5:]) < 0.6 * max(losses[:8]), losses


def test_assigned_positives_keep_a_floor_target_when_every_box_has_regressed_to_nothing():
    """The collapse seen in CV folds: each target has anchors assigned, but every predicted box has
    CIoU 0 with it, so Ultralytics' targets are all 0, and the box and DFL losses (weighted by
    them) with them. The floored assigner of our loss keeps a small target for those positives;
    where boxes fit, its targets equal Ultralytics'."""
    from ultralytics.utils.tal import TaskAlignedAssigner

    from lumbar_ray.models.detector import ASSIGNED_SCORE_FLOOR

    torch.manual_seed(0)
    criterion = make_loss_fn(build_detector(SAGITTAL_T2, imgsz=64)).criterion
    ys, xs = torch.meshgrid(torch.arange(8) * 8 + 4.0, torch.arange(8) * 8 + 4.0, indexing="ij")
    anchors = torch.stack([xs.flatten(), ys.flatten()], -1)  # 64 anchors on an 8 px grid
    gt_boxes = torch.tensor([[[8.0, 8.0, 28.0, 28.0], [36.0, 36.0, 60.0, 60.0]]])
    gt_labels, mask_gt = torch.tensor([[[1.0], [3.0]]]), torch.ones(1, 2, 1)
    scores = torch.full((1, 64, 5), 1e-5)
    nothing = torch.cat([anchors, anchors], -1)[None]  # every box of zero size at its anchor
    fitting = gt_boxes[0, (anchors[:, 0] > 32).long()][None]  # each anchor's box: the target on its side
    fitting_scores = scores.clone()
    fitting_scores[..., 1], fitting_scores[..., 3] = 0.3, 0.3
    stock = TaskAlignedAssigner(topk=10, num_classes=5, alpha=0.5, beta=6.0)
    for assigner in (stock, criterion.assigner):
        labels, _, targets, fg, _ = assigner(scores, nothing, anchors, gt_labels, gt_boxes, mask_gt)
        assert int(fg.sum()) > 0 and set(labels[fg].tolist()) <= {1, 3}  # some anchors are assigned
        floored = assigner is criterion.assigner
        assert float(targets.sum()) == pytest.approx(ASSIGNED_SCORE_FLOOR * int(fg.sum()) if floored else 0.0)
    healthy = stock(fitting_scores, fitting, anchors, gt_labels, gt_boxes, mask_gt)
    ours = criterion.assigner(fitting_scores, fitting, anchors, gt_labels, gt_boxes, mask_gt)
    assert float(healthy[2].sum()) > 1.0 and torch.equal(healthy[3], ours[3])
    assert torch.allclose(healthy[2], ours[2])


# ---------------------------------------------------------------- data geometry


def test_boxes_sized_in_millimetres():
    base = blob_samples(1, rows=100, cols=100)[0]
    fine = DetectorSample(**{**base.__dict__, "pixel_spacing": (0.5, 0.5)})
    coarse = DetectorSample(**{**base.__dict__, "pixel_spacing": (1.0, 1.0)})
    aniso = DetectorSample(**{**base.__dict__, "pixel_spacing": (0.5, 1.0)})  # (row, col)
    ds = DetectorDataset.from_samples([fine, coarse, aniso], SAGITTAL_T2, imgsz=100, box_mm=10)
    wf, hf = ds[0]["bboxes"][0, 2:].tolist()
    wc, hc = ds[1]["bboxes"][0, 2:].tolist()
    wa, ha = ds[2]["bboxes"][0, 2:].tolist()
    # 10 mm at 0.5 mm/px = 20 px; at 1 mm/px = 10 px; canvas 100 px (scale 1)
    assert wf == pytest.approx(0.20, abs=1e-4) and hf == pytest.approx(0.20, abs=1e-4)
    assert wc == pytest.approx(0.10, abs=1e-4) and hc == pytest.approx(0.10, abs=1e-4)
    assert wa == pytest.approx(0.10, abs=1e-4) and ha == pytest.approx(0.20, abs=1e-4)
    # the mm -> canvas factor follows the letterbox scale too
    ds2 = DetectorDataset.from_samples([coarse], SAGITTAL_T2, imgsz=50, box_mm=10)
    assert ds2[0]["bboxes"][0, 2].item() == pytest.approx(0.10, abs=1e-4)
    assert ds2[0]["mm_per_px"].tolist() == pytest.approx([2.0, 2.0])


@pytest.mark.parametrize("rows,cols,imgsz", [(512, 512, 256), (320, 256, 256), (200, 300, 384), (64, 48, 96)])
def test_letterbox_round_trip(rows, cols, imgsz):
    lb = Letterbox.fit(rows, cols, imgsz)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, cols - 1, 50), rng.uniform(0, rows - 1, 50)
    xb, yb = Letterbox.inverse(lb, *lb.forward(x, y))
    np.testing.assert_allclose(xb, x, atol=1e-9)
    np.testing.assert_allclose(yb, y, atol=1e-9)
    # the image lands where the points go: a blob at (x, y) peaks at forward(x, y)
    px, py = cols * 0.3, rows * 0.7
    yy, xx = np.mgrid[:rows, :cols]
    sigma = max(rows, cols) / 40
    blob = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma**2)).astype(np.float32)
    canvas = letterbox_image(blob, lb)
    assert canvas.shape == (imgsz, imgsz)
    w = np.where(canvas > 0.3 * canvas.max(), canvas, 0.0)
    cy_, cx_ = np.mgrid[:imgsz, :imgsz]
    ex, ey = lb.forward(px, py)
    assert (w * cx_).sum() / w.sum() == pytest.approx(ex, abs=0.25)
    assert (w * cy_).sum() / w.sum() == pytest.approx(ey, abs=0.25)
    # the longer side fills the canvas, the other is centred
    assert lb.forward(-0.5, -0.5)[0] == pytest.approx((imgsz - lb.scale * cols) / 2 - 0.5)
    assert lb.forward(cols - 0.5, 0)[0] + lb.forward(-0.5, 0)[0] == pytest.approx(imgsz - 1)


def test_augmented_boxes_follow_the_image():
    samples = blob_samples(4, rows=120, cols=90)
    ds = DetectorDataset.from_samples(samples, SAGITTAL_T2, imgsz=128, box_mm=12, augment=True)
    torch.manual_seed(3)
    for i in range(len(ds)):
        item = ds[i]
        img = item["img"][0].numpy()
        for (cx, cy, _, _), (px, py) in zip(item["bboxes"].numpy() * 128, item["points"].numpy()):
            if 8 < px < 120 and 8 < py < 120:  # boxes clipped at the border move their centre
                assert abs(cx - px) < 1e-3 and abs(cy - py) < 1e-3
            r0, c0 = int(round(py)), int(round(px))
            win = img[max(0, r0 - 4) : r0 + 5, max(0, c0 - 4) : c0 + 5]
            if win.size:
                fy, fx = np.unravel_index(np.argmax(win), win.shape)
                assert abs(max(0, r0 - 4) + fy - py) <= 2.5 and abs(max(0, c0 - 4) + fx - px) <= 2.5


def test_samples_from_series_one_per_labelled_instance():
    series = fake_series(SAGITTAL_T1, n=8)
    coords = pd.DataFrame(
        [
            (1, 7, 12, "Left Neural Foraminal Narrowing", "L4/L5", 30.0, 60.0),
            (1, 7, 12, "Left Neural Foraminal Narrowing", "L5/S1", 32.0, 80.0),
            (1, 7, 17, "Right Neural Foraminal Narrowing", "L4/L5", 31.0, 61.0),
            (1, 7, 14, "Spinal Canal Stenosis", "L4/L5", 40.0, 60.0),  # other series type: ignored
            (1, 8, 13, "Left Neural Foraminal Narrowing", "L1/L2", 40.0, 60.0),  # other series: ignored
        ],
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
    )
    samples = samples_from_series(series, coords)
    assert [s.instance_number for s in samples] == [12, 17]
    names = detector_class_names(SAGITTAL_T1)
    assert [names[c] for c in samples[0].class_ids] == [
        "left_neural_foraminal_narrowing_l4_l5", "left_neural_foraminal_narrowing_l5_s1"]
    assert [names[c] for c in samples[1].class_ids] == ["right_neural_foraminal_narrowing_l4_l5"]
    assert samples[0].image.dtype == np.uint8 and samples[0].image.shape == (120, 90)
    assert samples[0].pixel_spacing == (0.8, 0.8)


def test_negative_slices_are_far_from_labelled_ones():
    series = fake_series(SAGITTAL_T2, n=12)
    coords = pd.DataFrame(
        [(1, 7, 16, "Spinal Canal Stenosis", lv, 40.0, 20.0 + 15 * i)
         for i, lv in enumerate(("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"))],
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
    )
    assert len(samples_from_series(series, coords)) == 1
    samples = samples_from_series(series, coords, negatives=3, negative_gap=2)
    neg = [s for s in samples if len(s.class_ids) == 0]
    assert len(samples) == 4 and len(neg) == 3
    assert all(abs(s.instance_number - 16) >= 2 for s in neg)
    assert {14, 18} <= {s.instance_number for s in neg}  # the hardest first: exactly 2 slices away
    hardest = samples_from_series(series, coords, negatives=2, negative_gap=1)
    assert sorted(s.instance_number for s in hardest if len(s.class_ids) == 0) == [15, 17]
    ds = DetectorDataset.from_samples(samples, SAGITTAL_T2, imgsz=64, augment=True)
    batch = collate_detector([ds[i] for i in range(len(ds))])
    assert batch["img"].shape[0] == 4 and batch["bboxes"].shape == (5, 4)
    assert set(batch["batch_idx"].tolist()) == {0.0}
    model = build_detector(SAGITTAL_T2, imgsz=64)
    loss, _ = make_loss_fn(model)(model(batch["img"]), batch)
    assert torch.isfinite(loss).all()


def test_recalibrate_batchnorm():
    model = build_detector(SAGITTAL_T2, imgsz=64)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {m.momentum for m in bns} == {0.1}
    ds = DetectorDataset.from_samples(blob_samples(6), SAGITTAL_T2, imgsz=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_detector)
    assert recalibrate_batchnorm(model, loader) == 6
    assert not model.training and {m.momentum for m in bns} == {0.1}
    assert all(int(m.num_batches_tracked) == 2 for m in bns)
    # first BN: running mean = mean over both batches of its conv's output per channel
    conv, bn = model.model[0].conv, model.model[0].bn
    with torch.no_grad():
        feats = torch.cat([conv(b["img"]) for b in loader])
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- inference


class FakeDetector(torch.nn.Module):
    """Eval-mode output of a DetectionModel ((B, 4+nc, A) xywh + scores) with boxes where we say."""

    def __init__(self, nc, boxes_by_slice, imgsz):
        super().__init__()
        self.nc, self.boxes, self.imgsz = nc, boxes_by_slice, imgsz
        self.seen = 0
        self.batches = []

    def forward(self, x):
        b = x.shape[0]
        y = torch.zeros(b, 4 + self.nc, 8)
        for j in range(b):
            for a, (cls, cx, cy, conf) in enumerate(self.boxes.get(self.seen + j, [])):
                y[j, :4, a] = torch.tensor([cx, cy, 10.0, 10.0])
                y[j, 4 + cls, a] = conf
        self.seen += b
        self.batches.append(b)
        return y, {}


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("shape, imgsz", [((16, 448, 448), 128), ((48, 352, 352), 256), ((5, 352, 300), 256),
                                           ((3, 100, 130), 256), ((2, 300, 200), 96)])
def test_torch_preprocessing_equals_numpy_opencv(shape, imgsz, device):
    """The on-device preprocessing (GPU nodes) gives the detector the same images as the
    NumPy/OpenCV path that training uses: blurred downscale, upscale and non-square shapes."""
    rng = np.random.default_rng(sum(shape) + imgsz)
    z = np.linspace(0, 1, shape[0])[:, None, None]
    volume = (rng.normal(300, 60, shape) + 400 * z + np.indices(shape[1:]).sum(0)).astype(np.float32)
    expected, lb_np = preprocess_slices(normalize_volume(volume), imgsz)
    got, lb_torch = preprocess_volume_torch(volume, imgsz, device)
    assert got.device.type == device
    assert lb_torch == lb_np and got.shape == expected.shape == (shape[0], 3, imgsz, imgsz)
    diff = (got.cpu() - expected).abs()
    # OpenCV interpolates with 1/32-pixel fixed-point weights: far below the detector's noise.
    assert float(diff.max()) < 2e-3 and float(diff.mean()) < 1e-4


@pytest.mark.parametrize("shape, imgsz", [((16, 448, 448), 128), ((5, 352, 300), 256), ((2, 300, 200), 96)])
def test_fused_numpy_preprocessing_equals_the_two_steps(shape, imgsz):
    """Scoring's slice-by-slice preprocessing equals normalising the whole volume and then
    letterboxing it (the training path), and the normalisation is the robust min-max formula."""
    rng = np.random.default_rng(sum(shape))
    volume = rng.integers(0, 2000, shape).astype(np.int16)  # DICOM pixels arrive as integers
    volume[0, :3] = 4000  # a few bright voxels above the 99.5th percentile are clipped
    vol01 = normalize_volume(volume)
    lo, hi = np.percentile(volume.reshape(-1)[:: detector_preprocess._percentile_step(volume.size)].astype(np.float64), [0.5, 99.5])
    assert vol01.dtype == np.float32
    np.testing.assert_allclose(vol01, np.clip((volume - lo) / (hi - lo), 0, 1), atol=1e-6)
    expected, lb_two = preprocess_slices(vol01, imgsz)
    got, lb_fused = preprocess_volume(volume, imgsz)
    assert lb_fused == lb_two and got.shape == expected.shape == (shape[0], 3, imgsz, imgsz)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_003])
def test_counted_percentiles_equal_numpy(dtype, n):
    rng = np.random.default_rng(n)
    low = -300 if np.dtype(dtype).kind in "if" else 0
    sample = rng.integers(low, 3000, n).astype(dtype)
    q = [0.0, 0.5, 25.0, 50.0, 99.5, 100.0]
    np.testing.assert_array_equal(percentiles(sample, q), np.percentile(sample, q))
    # not integers, NaN, a huge range: NumPy's own percentile
    fractional = sample.astype(np.float32) + 0.25
    np.testing.assert_array_equal(percentiles(fractional, q), np.percentile(fractional, q))
    with_nan = sample.astype(np.float32)
    with_nan[0] = np.nan
    assert np.isnan(percentiles(with_nan, q)).all()
    wide = sample.astype(np.int64) * 10_000
    np.testing.assert_array_equal(percentiles(wide, q), np.percentile(wide, q))


def test_numpy_preprocessing_degenerate_volumes():
    got, _ = preprocess_volume(np.full((3, 40, 50), 7, np.uint16), 64)
    assert got.shape == (3, 3, 64, 64) and float(got.abs().max()) == 0.0
    assert float(np.abs(normalize_volume(np.full((2, 8, 8), 7.0, np.float32))).max()) == 0.0
    with_nan = np.random.default_rng(0).normal(size=(2, 40, 50)).astype(np.float32)
    with_nan[0, :5] = np.nan
    vol01 = normalize_volume(with_nan)
    assert np.isfinite(vol01).all() and (vol01[0, :5] == 0).all() and vol01.min() >= 0 and vol01.max() <= 1
    got, _ = preprocess_volume(with_nan, 64)
    np.testing.assert_allclose(got.numpy(), preprocess_slices(vol01, 64)[0].numpy(), atol=1e-6)


def test_torch_preprocessing_of_integer_volumes():
    volume = np.random.default_rng(3).integers(0, 1500, (4, 90, 70)).astype(np.int16)
    got, _ = preprocess_volume_torch(volume, 64, "cpu")
    as_float, _ = preprocess_volume_torch(volume.astype(np.float32), 64, "cpu")
    assert torch.equal(got, as_float)
    got_np, _ = preprocess_volume(volume, 64)
    assert torch.equal(got_np, preprocess_volume(volume.astype(np.float32), 64)[0])


def test_torch_preprocessing_degenerate_volumes():
    flat = np.full((3, 40, 50), 7.0, np.float32)
    got, _ = preprocess_volume_torch(flat, 64, "cpu")
    assert got.shape == (3, 3, 64, 64) and float(got.abs().max()) == 0.0
    with_nan = np.random.default_rng(0).normal(size=(2, 40, 50)).astype(np.float32)
    with_nan[0, :5] = np.nan
    got, _ = preprocess_volume_torch(with_nan, 64, "cpu")
    expected, _ = preprocess_slices(normalize_volume(with_nan), 64)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=2e-3)


@pytest.mark.parametrize("preprocess", ["numpy", "torch"])
def test_detect_series_maps_to_original_pixels_and_selects(preprocess):
    series = fake_series(SAGITTAL_T2, n=7, rows=200, cols=150, spacing=(0.5, 0.5))
    imgsz = 128
    lb = Letterbox.fit(200, 150, imgsz)
    truth = {  # slice -> [(class, x, y, conf)] in original pixels
        1: [(0, 40.0, 50.0, 0.6), (2, 70.0, 120.0, 0.3)],
        4: [(0, 42.0, 55.0, 0.9), (1, 60.0, 90.0, 0.8)],
    }
    boxes = {k: [(c, *lb.forward(x, y), p) for c, x, y, p in v] for k, v in truth.items()}
    model = FakeDetector(5, boxes, imgsz)
    dets = detect_series(model, series, imgsz=imgsz, conf=0.1, batch_size=3, preprocess=preprocess)
    assert model.batches == [3, 3, 1]
    assert len(dets) == 4
    for d in dets:
        c, x, y, p = next(t for t in truth[d.slice_index] if t[0] == d.class_id)
        assert d.x == pytest.approx(x, abs=1e-3) and d.y == pytest.approx(y, abs=1e-3)
        assert d.confidence == pytest.approx(p, abs=1e-6)
        assert d.instance_number == series.instance_numbers[d.slice_index]
        assert d.width == pytest.approx(10.0 / lb.scale, rel=1e-4)
    sel = select_target_detections(dets, SAGITTAL_T2, rule="max")
    targets = targets_for_series(SAGITTAL_T2)
    assert set(sel) == {t.index for t in targets}
    assert sel[targets[0].index].slice_index == 4  # most confident over slices
    assert sel[targets[1].index].slice_index == 4
    assert sel[targets[2].index].slice_index == 1
    assert sel[targets[3].index] is None and sel[targets[4].index] is None
    assert select_target_detections(dets, SAGITTAL_T2, rule="max", min_conf=0.5)[targets[2].index] is None


def test_canal_selection_keeps_one_slice():
    t2 = targets_for_series(SAGITTAL_T2)
    dets = [Detection(c, 4, 15, 50.0, 10.0 + 20 * c, 0.7) for c in range(4)]  # mid slice, no class 4
    dets += [Detection(1, 2, 13, 50.0, 30.0, 0.9), Detection(4, 7, 18, 50.0, 90.0, 0.4)]
    one_slice = select_target_detections(dets, SAGITTAL_T2, rule="slice")
    assert [one_slice[t.index].slice_index for t in t2] == [4, 4, 4, 4, 7]  # class 4 falls back
    assert select_target_detections(dets, SAGITTAL_T2) == one_slice  # the default for the canal
    midline = select_target_detections(dets, SAGITTAL_T2, rule="centroid")
    assert [midline[t.index].slice_index for t in t2] == [4, 4, 4, 4, 7]
    best = select_target_detections(dets, SAGITTAL_T2, rule="max")
    assert [best[t.index].slice_index for t in t2] == [4, 2, 4, 4, 7]
    with pytest.raises(ValueError):
        select_target_detections(dets, SAGITTAL_T2, rule="median")


def test_canal_levels_are_read_in_order_across_slices():
    # An obliquely planned Sagittal T2 of a realistic holdout study (3532832980 of the 200-study
    # run, boxes as its detector gave them): on slice 5, which has the largest summed confidence,
    # the detector labelled the discs one level off (L3/L4 and L4/L5 on one disc); slice 6 has
    # L1/L2-L4/L5 right, and L5/S1 shows on slice 5 only.
    t2 = targets_for_series(SAGITTAL_T2)
    series = fake_series(SAGITTAL_T2, n=11, rows=140, cols=140, spacing=(2.0, 2.0))  # row = 2 mm down
    box = functools.partial(canal_box, series)
    dets = [box(4, 4, 101.4, 0.152), box(0, 5, 44.3, 0.09), box(1, 5, 62.8, 0.078), box(2, 5, 83.5, 0.075),
            box(3, 5, 83.5, 0.215), box(4, 5, 101.2, 0.341),
            box(0, 6, 26.1, 0.103), box(1, 6, 44.0, 0.273), box(2, 6, 63.0, 0.11), box(3, 6, 83.2, 0.064)]
    one_slice = select_target_detections(dets, SAGITTAL_T2, series, rule="slice")
    assert [one_slice[t.index].y for t in t2] == [44.3, 62.8, 83.5, 83.5, 101.2]
    ordered = select_target_detections(dets, SAGITTAL_T2, series)  # the default with the series
    assert ordered == select_target_detections(dets, SAGITTAL_T2, series, rule="ordered")
    assert [(ordered[t.index].slice_index, ordered[t.index].y) for t in t2] == [
        (6, 26.1), (6, 44.0), (6, 63.0), (5, 83.5), (5, 101.2)]
    with pytest.raises(ValueError, match="needs the series"):
        select_target_detections(dets, SAGITTAL_T2, rule="ordered")


def test_ordered_canal_levels_skip_a_disc_found_twice_and_stay_near_one_slice():
    t2 = targets_for_series(SAGITTAL_T2)
    series = fake_series(SAGITTAL_T2, n=9, rows=170, cols=140, spacing=(1.0, 1.0))  # row = 1 mm down
    box = functools.partial(canal_box, series)

    # Discs 39-40 mm apart. On slice 4 the L1/L2 and L2/L3 boxes sit on one disc (1 mm apart);
    # L5/S1's best box is far lateral (slice 8), a weaker one on slice 5 is in reach of the canal.
    dets = [box(0, 4, 10.0, 0.8), box(1, 4, 11.0, 0.9), box(2, 4, 50.0, 0.7), box(3, 4, 90.0, 0.7),
            box(4, 8, 130.0, 0.95), box(4, 5, 129.0, 0.3)]
    chosen = select_target_detections(dets, SAGITTAL_T2, series)
    picks = [chosen[t.index] for t in t2]
    # L2/L3 (0.9) wins the disc over L1/L2 (0.8), and its place agrees (one spacing above
    # L3/L4); one spacing above it (row 11 - 39) is off the image, so no L1/L2 is placed
    assert picks[0] is None
    assert [(d.slice_index, d.y) for d in picks[1:]] == [(4, 11.0), (4, 50.0), (4, 90.0), (5, 129.0)]
    assert not any(d.interpolated for d in picks[1:])


def test_a_canal_box_labelled_one_level_off_takes_the_level_its_place_says():
    # Study 1860249757 of the 200-study run (fold 1, out of fold), rounded: the detector put
    # L1/L2 on the L2/L3 disc and L2/L3 on the L3/L4 disc, where L3/L4 also is; L4/L5 and
    # L5/S1 are right. Discs ~28 mm apart (14 rows of 2 mm).
    t2 = targets_for_series(SAGITTAL_T2)
    series = fake_series(SAGITTAL_T2, n=11, rows=128, cols=128, spacing=(2.0, 2.0))

    def box(level, y, p):
        return canal_box(series, level, 6, y, p, x=60.0)

    dets = [box(0, 46.6, 0.12), box(1, 61.5, 0.2), box(2, 61.5, 0.12), box(3, 76.0, 0.25), box(4, 89.4, 0.3)]
    assert [select_target_detections(dets, SAGITTAL_T2, series, rule="slice")[t.index].y for t in t2] == [
        46.6, 61.5, 61.5, 76.0, 89.4]
    chosen = select_target_detections(dets, SAGITTAL_T2, series)
    picks = [chosen[t.index] for t in t2]
    # labelled (truth): 34.6, 48.0, 62.0, 76.7, 89.6
    assert [round(d.y, 1) for d in picks[1:]] == [46.6, 61.5, 76.0, 89.4]
    # L2/L3 is the L1/L2 box, reported at half its confidence (the detector did not say L2/L3);
    # L3/L4 its own box (0.12) rather than the L2/L3 box moved down (0.2 / 2)
    assert [d.confidence for d in picks] == pytest.approx([0.0, 0.06, 0.12, 0.25, 0.3])
    assert picks[0].interpolated and picks[0].y == pytest.approx(46.6 - (61.5 - 46.6))  # one spacing above


def test_canal_levels_left_out_are_not_filled_from_one_off_canal_disc():
    # L2/L3 and L3/L4 were found only on one disc of a slice 3 slices (12 mm) off the canal: the
    # fill between neighbours must keep the same checks (and see its own fills), else both
    # levels land on that disc. They are placed between L1/L2 and L4/L5 instead.
    t2 = targets_for_series(SAGITTAL_T2)
    cls = [t.detector_class_id for t in t2]
    series = fake_series(SAGITTAL_T2, n=11, rows=200, cols=140, spacing=(1.0, 1.0))  # slices 4 mm apart
    box = functools.partial(canal_box, series)

    dets = [box(0, 5, 30.0, 0.8), box(1, 8, 65.0, 0.5), box(2, 8, 66.0, 0.5), box(3, 5, 135.0, 0.8),
            box(4, 5, 170.0, 0.8)]
    chosen = select_target_detections(dets, SAGITTAL_T2, series)
    picks = [chosen[t.index] for t in t2]
    assert [(d.slice_index, round(d.y, 6), d.interpolated) for d in picks] == [
        (5, 30.0, False), (5, 65.0, True), (5, 100.0, True), (5, 135.0, False), (5, 170.0, False)]
    # on a series of 1 mm slices the same 3 slices are 3 mm: the canal may move that far per level
    thin = fake_series(SAGITTAL_T2, n=11, rows=200, cols=140, spacing=(1.0, 1.0), step=1.0)
    dets = [Detection(d.class_id, d.slice_index, int(thin.instance_numbers[d.slice_index]), d.x, d.y, d.confidence)
            for d in dets if d.class_id != cls[2]]
    picks = [select_target_detections(dets, SAGITTAL_T2, thin)[t.index] for t in t2]
    assert (picks[1].slice_index, picks[1].y, picks[1].interpolated) == (8, 65.0, False)


def test_repeated_canal_series_give_all_levels_from_one_series():
    t2 = targets_for_series(SAGITTAL_T2)
    first = fake_series(SAGITTAL_T2, n=9, rows=200, cols=140, spacing=(1.0, 1.0))
    repeat = fake_series(SAGITTAL_T2, n=9, rows=200, cols=140, spacing=(1.0, 1.0), seed=1)

    def boxes(series, ys, p):
        return [canal_box(series, level, 4, y, q) for level, (y, q) in enumerate(zip(ys, p))]

    # the repeat is more confident at L1/L2 alone, but less in all: levels mixed from the two
    # would put L1/L2 (repeat, row 60) below L2/L3 (first, row 65)
    found = {SAGITTAL_T2: [(first, boxes(first, [30, 65, 100, 135, 170], [0.5] * 5)),
                           (repeat, boxes(repeat, [60, 95, 130, 165, 199], [0.9, 0.1, 0.1, 0.1, 0.1]))]}
    chosen = _choose_sagittal(found)
    assert {id(chosen[t.index].series) for t in t2} == {id(first)}
    assert [chosen[t.index].detection.y for t in t2] == [30, 65, 100, 135, 170]


def test_a_canal_level_without_a_box_is_placed_between_its_neighbours():
    t2 = targets_for_series(SAGITTAL_T2)
    cls = [t.detector_class_id for t in t2]
    series = fake_series(SAGITTAL_T2, n=9, rows=140, cols=140, spacing=(2.0, 2.0))

    def box(level, k, x, y, p=0.6):
        return canal_box(series, level, k, y, p, x=x, width=8.0, height=6.0)

    # L3/L4 has no box at all, L1/L2's only box is on L2/L3's disc (and weaker), L5/S1 is missing
    dets = [box(0, 5, 60.0, 41.0, 0.3), box(1, 4, 60.0, 40.0), box(3, 3, 66.0, 80.0)]
    chosen = select_target_detections(dets, SAGITTAL_T2, series)
    picks = [chosen[t.index] for t in t2]
    assert not picks[1].interpolated and not picks[3].interpolated
    mid = picks[2]  # halfway between L2/L3 (slice 4, row 40) and L4/L5 (slice 3, row 80)
    assert mid.interpolated and mid.confidence == 0.0 and mid.class_id == cls[2]
    assert (mid.slice_index, mid.x, mid.y) == (4, 63.0, 60.0)  # slice 3.5 rounds to even: 4
    assert mid.instance_number == series.instance_numbers[4]
    # the ends: one spacing beyond the two nearest found levels (L1/L2 from L2/L3 and L4/L5,
    # spacing 20 rows per level: row 20; L5/S1 from L4/L5 and L2/L3: row 100), never from a
    # placed level
    assert picks[0].interpolated and picks[0].y == pytest.approx(20.0) and picks[0].slice_index == 4
    assert picks[4].interpolated and picks[4].y == pytest.approx(100.0) and picks[4].slice_index == 2  # 2.5 rounds to even
    located = {t.index: LocatedDetection(series, chosen[t.index]) for t in t2}
    assert [f for f in geometry_flags(located) if f.startswith("level_interpolated")] == [
        f"level_interpolated:{t2[i].column}" for i in (0, 2, 4)]


def test_centroid_selection_takes_the_slice_nearest_the_midline():
    # The canal shows on the mid-sagittal slice and its neighbours; here a neighbour (slice 3)
    # is the most confident, but the confidence profile is centred on slice 4.
    series = fake_series(SAGITTAL_T2, n=9, step=4.0)
    t2 = targets_for_series(SAGITTAL_T2)
    profile = {2: 0.3, 3: 0.8, 4: 0.78, 5: 0.7}
    dets = [Detection(t.detector_class_id, k, int(series.instance_numbers[k]), 50.0, 10.0 + 20 * i, p)
            for k, p in profile.items() for i, t in enumerate(t2)]
    dets = [d for d in dets if not (d.slice_index == 4 and d.class_id == t2[4].detector_class_id)]
    most_confident = select_target_detections(dets, SAGITTAL_T2, series, rule="slice")
    assert {most_confident[t.index].slice_index for t in t2} == {3}
    chosen = select_target_detections(dets, SAGITTAL_T2, series, rule="centroid")
    # weighted mean position = slice 3.73 -> slice 4; L5/S1 has no box on slice 4, so it takes the
    # nearest slice that has one (3 and 5 tie at one slice away: the lower index wins)
    assert [chosen[t.index].slice_index for t in t2] == [4, 4, 4, 4, 3]
    # positions, not indices: slices 10 mm apart except slices 4 and 5 (2 mm) put the weighted
    # mean at 34.8 mm, nearer slice 3 (30 mm) than slice 4 (40 mm)
    uneven = fake_series(SAGITTAL_T2, n=9, step=4.0)
    along = np.array([0.0, 10, 20, 30, 40, 42, 52, 62, 72])
    uneven.positions = np.stack([-along, np.zeros(9), np.zeros(9)], axis=1)  # normal (-1, 0, 0)
    assert select_target_detections(dets, SAGITTAL_T2, uneven, rule="centroid")[t2[0].index].slice_index == 3


def test_real_model_runs_on_a_series():
    series = fake_series(AXIAL_T2, n=5, rows=96, cols=96)
    model = build_detector(AXIAL_T2, imgsz=64)
    dets = detect_series(model, series, conf=0.0001, batch_size=4)
    assert dets and all(0 <= d.slice_index < 5 for d in dets)
    assert all(-20 < d.x < 116 and -20 < d.y < 116 for d in dets)
    sel = select_target_detections(dets, AXIAL_T2)
    assert len(sel) == 10


def test_best_box_per_class_by_hand():
    # 2 images, 2 classes, 3 anchors: rows (cx, cy, w, h, score class 0, score class 1)
    y = torch.tensor([
        [[10, 20, 30], [11, 21, 31], [4, 5, 6], [7, 8, 9], [0.2, 0.9, 0.1], [0.05, 0.3, 0.6]],
        [[1, 2, 3], [4, 5, 6], [1, 1, 1], [2, 2, 2], [0.01, 0.02, 0.03], [0.5, 0.4, 0.7]],
    ], dtype=torch.float32)
    rows = best_box_per_class(y, conf=0.1)
    expected = [[0, 0, 0.9, 20, 21, 5, 8],  # image 0, class 0: anchor 1
                [0, 1, 0.6, 30, 31, 6, 9],  # image 0, class 1: anchor 2
                [1, 1, 0.7, 3, 6, 1, 2]]  # image 1: class 0's best (0.03) is below conf
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-6)
    assert rows.dtype == torch.float32
    assert best_box_per_class(y.half(), conf=0.1).dtype == torch.float32
    assert best_box_per_class(y, conf=0.95).shape == (0, 7)


class UntiedScores(torch.nn.Module):
    """A detector whose class scores get a fixed jitter (1e-4): an untrained model gives many
    anchors exactly the same score, and which of two tied boxes NMS or an argmax keeps is
    arbitrary (both are "the most confident")."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)[0].clone()
        jitter = torch.rand(y[:, 4:].shape, generator=torch.Generator().manual_seed(y.shape[0]))
        y[:, 4:] += 1e-4 * jitter
        return y, {}


def test_best_boxes_keep_what_nms_keeps_for_selection():
    """Each class's best box on each slice is what NMS keeps first, so every selection rule picks
    the same detections from "best" candidates as from NMS's (random model: boxes everywhere)."""
    torch.manual_seed(1)
    with pytest.raises(ValueError):
        detect_series(build_detector(AXIAL_T2, imgsz=64), fake_series(AXIAL_T2, n=2), candidates="all")
    for series_type in (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2):
        model = UntiedScores(build_detector(series_type, imgsz=64))
        series = fake_series(series_type, n=7, rows=100, cols=80, seed=3)
        best = detect_series(model, series, conf=0.0001, batch_size=3)
        nms = detect_series(model, series, conf=0.0001, batch_size=3, candidates="nms", max_det=100_000)
        assert len(nms) > len(best) > 0
        top = {}
        for d in nms:  # NMS's most confident box per (slice, class)
            if (d.slice_index, d.class_id) not in top or d.confidence > top[d.slice_index, d.class_id].confidence:
                top[d.slice_index, d.class_id] = d
        assert {(d.slice_index, d.class_id): d for d in best}.keys() == top.keys()
        for d in best:
            t = top[d.slice_index, d.class_id]
            assert d.instance_number == t.instance_number and d.confidence == pytest.approx(t.confidence, rel=1e-6)
            assert (d.x, d.y, d.width, d.height) == pytest.approx((t.x, t.y, t.width, t.height), abs=1e-3)
        for rule in ("max", "slice", "centroid"):
            picked_best = select_target_detections(best, series_type, series, rule=rule)
            picked_nms = select_target_detections(nms, series_type, series, rule=rule)
            assert picked_best.keys() == picked_nms.keys()
            for index, det in picked_best.items():
                other = picked_nms[index]
                assert (det is None) == (other is None)
                if det is not None:
                    assert (det.class_id, det.slice_index) == (other.class_id, other.slice_index)
                    assert (det.x, det.y, det.confidence) == pytest.approx((other.x, other.y, other.confidence), abs=1e-3)


def test_sagittal_t1_side_from_slice_position():
    series = fake_series(SAGITTAL_T1, n=9)  # slice 0 most left (patient x largest), 8 most right
    t1 = targets_for_series(SAGITTAL_T1)
    left_l1 = next(t for t in t1 if t.side == "left" and t.level == "L1/L2")
    right_l1 = next(t for t in t1 if t.side == "right" and t.level == "L1/L2")
    dets = [  # the detector can't tell sides apart: both peaks carry the "left" class
        Detection(left_l1.detector_class_id, 1, 12, 30.0, 40.0, 0.7),
        Detection(left_l1.detector_class_id, 7, 18, 31.0, 41.0, 0.6),
        Detection(right_l1.detector_class_id, 2, 13, 30.0, 40.0, 0.5),
    ]
    plain = select_target_detections(dets, SAGITTAL_T1)
    assert plain[left_l1.index].slice_index == 1 and plain[right_l1.index].slice_index == 2
    geo = select_target_detections(dets, SAGITTAL_T1, series)
    assert geo[left_l1.index].slice_index == 1
    assert geo[right_l1.index].slice_index == 7 and geo[right_l1.index].class_id == right_l1.detector_class_id
    assert sum(v is not None for v in geo.values()) == 2


def test_hit_rates():
    series = fake_series(SAGITTAL_T2, n=6, spacing=(0.5, 0.5))
    t2 = targets_for_series(SAGITTAL_T2)
    coords = pd.DataFrame(
        [(1, 7, 13, "Spinal Canal Stenosis", lv, 50.0, 50.0) for lv in ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")],
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
    )
    sel = {
        t2[0].index: Detection(0, 2, 13, 52.0, 50.0, 0.9),  # 1 mm: hit
        t2[1].index: Detection(1, 2, 13, 50.0, 64.0, 0.9),  # 7 mm: hit at 10 only
        t2[2].index: Detection(2, 3, 14, 50.0, 50.0, 0.9),  # wrong instance
        t2[3].index: None,
        t2[4].index: Detection(4, 2, 13, 80.0, 50.0, 0.9),  # 15 mm
    }
    r = detector_hit_rates(sel, coords, series)
    assert (r.n_labelled, r.n_detected, r.n_right_slice) == (5, 4, 3)
    assert r.rate(5) == pytest.approx(0.2) and r.rate(10) == pytest.approx(0.4)
    d = r.as_dict()
    assert d["hit_5mm"] == pytest.approx(0.2) and d["detected"] == pytest.approx(0.8)
    merged = HitRates.merge([r, r])
    assert merged.n_labelled == 10 and merged.rate(10) == pytest.approx(0.4)
    # patient space: slices 4 mm apart, pixels 0.5 mm; the wrong-instance detection (one slice
    # over, same pixel) is 4 mm from the labelled point, so it counts within 5 mm in 3-D
    dist_3d = {rec["column"]: rec.get("dist_3d_mm") for rec in r.records}
    assert dist_3d[t2[0].column] == pytest.approx(1.0) and dist_3d[t2[1].column] == pytest.approx(7.0)
    assert dist_3d[t2[2].column] == pytest.approx(4.0) and dist_3d[t2[4].column] == pytest.approx(15.0)
    assert dist_3d[t2[3].column] is None  # not detected
    assert r.rate_3d(5) == pytest.approx(0.4) and r.rate_3d(10) == pytest.approx(0.6)
    assert d["hit_5mm_3d"] == pytest.approx(0.4) and merged.rate_3d(5) == pytest.approx(0.4)
    # axial: a neighbouring slice (one spacing away) is still the right slice, two are not
    ax = fake_series(AXIAL_T2, n=6, step=4.0)
    t_ax = targets_for_series(AXIAL_T2)
    coords_ax = pd.DataFrame(
        [(1, 7, 13, t.condition.name, t.level, 50.0, 50.0) for t in t_ax[:2]],
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
    )
    sel_ax = {t_ax[0].index: Detection(0, 3, 14, 50.0, 50.0, 0.9), t_ax[1].index: Detection(1, 4, 15, 50.0, 50.0, 0.9)}
    r_ax = detector_hit_rates(sel_ax, coords_ax, ax)
    assert r_ax.n_right_slice == 1 and r_ax.rate(5) == pytest.approx(0.5)
    assert [rec["dist_3d_mm"] for rec in r_ax.records] == pytest.approx([4.0, 8.0])
    assert r_ax.rate_3d(5) == pytest.approx(0.5) and r_ax.rate_3d(10) == pytest.approx(1.0)


# ---------------------------------------------------------------- persistence, DDP, offline


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_detector(SAGITTAL_T1, imgsz=96, box_mm=18)
    # move BN running stats off their defaults so they are checked too
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 96, 96))
    model.eval()
    path = tmp_path / "det.pt"
    save_detector(model, path, fold=3)
    loaded = load_detector(path)
    assert loaded.names == model.names and loaded.series_type == SAGITTAL_T1
    assert loaded.imgsz == 96 and loaded.box_mm == 18 and loaded.checkpoint_extra == {"fold": 3}
    x = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        a, b = model(x)[0], loaded(x)[0]
    assert torch.equal(a, b)
    ckpt = torch.load(path, weights_only=True)  # no pickled modules
    assert ckpt["nc"] == 10 and ckpt["format"] == CHECKPOINT_FORMAT
    json.dumps(ckpt["yaml"])


def test_prepare_detector_for_inference_keeps_outputs_and_detections():
    torch.manual_seed(0)
    model = build_detector(SAGITTAL_T1, imgsz=64)
    model.train()
    with torch.no_grad():  # BN running stats off their defaults, so folding them changes weights
        for _ in range(3):
            model(torch.rand(4, 3, 64, 64) * 2)
    model.eval()
    prepared = prepare_detector_for_inference(copy.deepcopy(model))
    bare = unwrap_model(prepared)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bare.modules())
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), prepared(x)
    ref, out = (ref[0] if isinstance(ref, (tuple, list)) else ref), (out[0] if isinstance(out, (tuple, list)) else out)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    series = fake_series(SAGITTAL_T1, n=5, rows=70, cols=60)
    before = detect_series(model, series, imgsz=64, conf=0.0, max_det=20)
    after = detect_series(prepared, series, imgsz=64, conf=0.0, max_det=20)
    assert len(before) == len(after) > 0
    ref_boxes = np.array(sorted((d.slice_index, d.class_id, -d.confidence, d.x, d.y) for d in before))
    new_boxes = np.array(sorted((d.slice_index, d.class_id, -d.confidence, d.x, d.y) for d in after))
    np.testing.assert_allclose(new_boxes, ref_boxes, atol=1e-3)


def test_ddp_wrapped_train_and_evaluate(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_detector(SAGITTAL_T2, imgsz=64)
        loss_fn = make_loss_fn(model)  # on the bare model, before wrapping
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ds = DetectorDataset.from_samples(blob_samples(4), SAGITTAL_T2, imgsz=64, augment=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detector)
        opt = make_optimizer(ddp, lr=1e-3)
        sched = make_scheduler(opt, total_steps=4, warmup_steps=1)
        before = [p.detach().clone() for p in model.parameters()]
        stats = train_one_epoch(ddp, loader, opt, loss_fn, "cpu", scheduler=sched)
        assert stats["n_images"] == 4 and stats["n_batches"] == 2 and math.isfinite(stats["loss"])
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        ev = evaluate(ddp, loader, loss_fn, "cpu")
        assert ev["n_images"] == 4 and ev["n_targets"] == 20 and math.isfinite(ev["loss"])
        assert 0.0 <= ev["hit_rate_5mm"] <= ev["hit_rate_10mm"] <= 1.0
        assert unwrap_model(ddp) is model
    finally:
        dist.destroy_process_group()


def test_fit_detector_small():
    model, history = fit_detector(blob_samples(6), blob_samples(2, seed=1), SAGITTAL_T2, epochs=2, imgsz=64,
                                    batch_size=3, lr=2e-3)
    assert len(history) == 2 and "val_hit_rate_5mm" in history[-1] and "loss" in history[0]
    assert not model.training and model.names == detector_class_names(SAGITTAL_T2)


def test_no_network_access(tmp_path):
    """Fresh interpreter: configure, first import, build, loss, NMS and the font check never
    touch the network (every socket connect / DNS lookup is recorded and refused)."""
    script = textwrap.dedent(
        """
        import json, socket, sys
        attempts = []
        def refuse(name):
            def f(*a, **k):
                attempts.append(name + repr(a[:2])[:80])
                raise OSError("network disabled in test")
            return f
        socket.socket.connect = refuse("connect")
        socket.socket.connect_ex = refuse("connect_ex")
        socket.create_connection = refuse("create_connection")
        socket.getaddrinfo = refuse("getaddrinfo")
        from lumbar_ray.models import ultralytics_env
        cfg = ultralytics_env.configure(sys.argv[1])
        import torch
        from lumbar_ray.models.detector import build_detector, make_loss_fn
        from lumbar_ray.targets import SAGITTAL_T1
        m = build_detector(SAGITTAL_T1, imgsz=64)
        loss_fn = make_loss_fn(m)
        batch = {"batch_idx": torch.tensor([0.0]), "cls": torch.tensor([[3.0]]),
                 "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
        loss, _ = loss_fn(m(torch.rand(1, 3, 64, 64)), batch)
        loss.sum().backward()
        m.eval()
        from ultralytics.utils.nms import non_max_suppression
        with torch.no_grad():
            non_max_suppression(m(torch.rand(2, 3, 64, 64))[0], 0.001, 0.5)
        from ultralytics.utils.checks import check_font
        font = check_font("Arial.ttf")
        import ultralytics.utils as uu
        print(json.dumps({"attempts": attempts, "online": uu.ONLINE, "font": str(font),
                          "sync": uu.SETTINGS["sync"], "raytune": uu.SETTINGS["raytune"],
                          "config": str(uu.USER_CONFIG_DIR)}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(lumbar_ray.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ucfg")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attempts"] == []
    assert out["online"] is False and out["sync"] is False and out["raytune"] is False
    assert out["config"] == str(tmp_path / "ucfg" / "Ultralytics")
    assert out["font"] == str(tmp_path / "ucfg" / "Ultralytics" / "Arial.ttf")
    assert (tmp_path / "ucfg" / "Ultralytics" / "Arial.Unicode.ttf").is_file()


def test_no_side_effects_at_import():
    modules = ["lumbar_ray.models.detector", "lumbar_ray.models.detector_preprocess", "lumbar_ray.models.detector_inference",
               "lumbar_ray.models.target_selection", "lumbar_ray.training.detector_data",
               "lumbar_ray.training.detector_fit", "lumbar_ray.training.detector_eval", "lumbar_ray.models.ultralytics_env"]
    code = f"import sys, {', '.join(modules)}; print('ultralytics' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(lumbar_ray.__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_loop_and_inference():
    """The Ray worker order: loss made on CPU, model moved to the GPU afterwards; AMP on."""
    torch.manual_seed(0)
    model = build_detector(SAGITTAL_T2, imgsz=128)
    loss_fn = make_loss_fn(model)
    model = model.cuda()
    ds = DetectorDataset.from_samples(blob_samples(8), SAGITTAL_T2, imgsz=128, box_mm=30, augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_detector)
    opt = make_optimizer(model, lr=2e-3)
    scaler = torch.amp.GradScaler("cuda")
    from ultralytics.utils.torch_utils import ModelEMA

    ema = ModelEMA(model)
    for _ in range(3):
        stats = train_one_epoch(model, loader, opt, loss_fn, "cuda", scaler, ema=ema)
        assert math.isfinite(stats["loss"]) and stats["n_images"] == 8
    ev = evaluate(ema.ema, loader, loss_fn, "cuda")
    assert math.isfinite(ev["loss"])
    dets = detect_series(ema.ema, fake_series(SAGITTAL_T2, n=5), conf=0.0001, device="cuda")
    assert all(isinstance(d.x, float) for d in dets)
