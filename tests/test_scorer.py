"""DeepScoreNet layout, focal loss and inference; crops; crop augmentation (all CPU, fast)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lumbar_ray.dicom.series import Series
from lumbar_ray.models.crops import (
    extract_crop, extract_crops, extract_neighbour_crops, mirror_axis, neighbour_slices, normalize_crop,
)
from lumbar_ray.models.deepscorenet import (
    DeepScoreNet,
    FocalLoss,
    KerasSameMaxPool2d,
    class_weights_from_labels,
    count_parameters,
    keras_same_padding,
    predict_proba,
    prepare_scorer_for_inference,
)
from lumbar_ray.training.crop_data import (
    CropAugment, CropDataset, augment_crop, augment_crops, oversample_indices, shift_in_pixels,
)
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2

# ---------------------------------------------------------------- model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepScoreNet()


def test_parameter_counts_match_the_published_keras_layout(model):
    counts = count_parameters(model)
    assert counts.trainable == 2_784_259
    assert counts.bn_running_stats == 3_392  # 1,696 BatchNorm channels x (mean, var)
    assert counts.keras_total == 2_787_651
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn_channels == 1_696


def test_forward_shape_and_spatial_sizes(model):
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    sizes = []
    h = model.stem(x)
    for block in model.blocks:
        h = block(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    # odd sizes work too (pool and residual both give ceil(n / 2))
    assert model.eval()(torch.randn(1, 3, 31, 27)).shape == (1, 3)
    model.train()


def test_in_channels_configurable():
    net = DeepScoreNet(in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    # only the stem conv changes: 2 input channels fewer x 9 x 32
    assert count_parameters(net).trainable == 2_784_259 - 2 * 9 * 32


def test_keras_same_padding_is_asymmetric():
    assert keras_same_padding(32, 3, 2) == (0, 1)
    assert keras_same_padding(15, 3, 2) == (1, 1)
    assert keras_same_padding(8, 1, 2) == (0, 0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = KerasSameMaxPool2d(3, 2)(x)
    # windows rows/cols {0,1,2} and {2,3} (padding after only), like TensorFlow
    assert out.squeeze().tolist() == [[10.0, 11.0], [14.0, 15.0]]
    neg = -x - 100
    # the padding never wins the max (-inf, not 0)
    assert KerasSameMaxPool2d(3, 2)(neg).max().item() == -100.0


# ---------------------------------------------------------------- loss


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    target = torch.tensor([0, 2, 1])
    weights = [1.0, 2.0, 4.0]
    gamma = 2.0
    expected = []
    for row, t in zip(logits.tolist(), target.tolist()):
        exps = [math.exp(v) for v in row]
        p = exps[t] / sum(exps)
        expected.append(-weights[t] * (1 - p) ** gamma * math.log(p))
    loss = FocalLoss(gamma=gamma, class_weights=weights)(logits, target)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    per = FocalLoss(gamma=gamma, class_weights=weights, reduction="none")(logits, target)
    assert per.tolist() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_gamma0_is_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(16, 3, requires_grad=True)
    target = torch.randint(0, 3, (16,))
    focal = FocalLoss(gamma=0.0)(logits, target)
    assert focal.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    w = torch.tensor([1.0, 2.0, 4.0])
    weighted = FocalLoss(gamma=0.0, class_weights=w, reduction="sum")(logits, target)
    assert weighted.item() == pytest.approx(F.cross_entropy(logits, target, weight=w, reduction="sum").item(), rel=1e-6)
    focal.backward()
    assert logits.grad is not None


def test_focal_loss_ignores_missing_labels():
    logits = torch.randn(4, 3)
    target = torch.tensor([0, -1, 2, -1])
    loss = FocalLoss()(logits, target)
    assert loss.item() == pytest.approx(FocalLoss()(logits[[0, 2]], target[[0, 2]]).item())
    assert FocalLoss()(logits[[1, 3]], target[[1, 3]]).item() == 0.0


def test_class_weights_inverse_frequency_normalised():
    labels = [0, 0, 0, 0, 1, 1, 2, -1]
    w = class_weights_from_labels(labels)
    assert w.tolist() == pytest.approx([7 / 12, 7 / 6, 7 / 3])
    counts = np.array([4, 2, 1])
    assert (counts * w).sum() == pytest.approx(7)  # mean weight per sample = 1


# ---------------------------------------------------------------- crops


def _dot_volume(n_slices=5, rows=64, cols=80, k=2, r=10, c=20):
    vol = np.zeros((n_slices, rows, cols), dtype=np.float32)
    vol += np.random.default_rng(0).uniform(0, 1, vol.shape).astype(np.float32)
    vol[k, r, c] = 100.0
    return vol


def test_crop_centred_on_point():
    vol = _dot_volume()
    crop = extract_crop(vol, 2, x=20, y=10)
    assert crop.shape == (3, 32, 32) and crop.dtype == np.float32
    assert 0.0 <= crop.min() and crop.max() <= 1.0 and (crop[:, 16, 16] == 1.0).all()
    crop = extract_crop(vol, 2, x=20.4, y=9.6, percentiles=(0, 100))  # rounds to the pixel
    for ch in crop:
        assert np.unravel_index(ch.argmax(), ch.shape) == (16, 16)
        assert ch[16, 16] == 1.0


def test_crop_at_border_pads_with_zero():
    vol = _dot_volume(r=0, c=0)
    crop = extract_crop(vol, 2, x=0, y=0, percentiles=(0, 100))
    assert crop.shape == (3, 32, 32)
    assert (crop[:, :16, :] == 0).all() and (crop[:, :, :16] == 0).all()
    assert crop[0, 16, 16] == 1.0
    # padding is not part of the percentile scaling: the in-image part spans [0, 1]
    assert crop[0, 16:, 16:].min() == 0.0
    # a point entirely outside the image gives an all-zero crop
    assert (extract_crop(vol, 2, x=-100, y=-100) == 0).all()
    # the far corner
    far = extract_crop(vol, 2, x=79.4, y=63.6)
    assert (far[:, 16 + 1 :, :] == 0).all() and (far[:, :, 16 + 1 :] == 0).all()


def test_mm_mode_resamples_physical_size():
    vol = np.zeros((1, 128, 128), dtype=np.float32)
    vol[0, :, 60] = 1.0  # a bright column 10 px right of the centre
    vol[0, 74, :] = 0.5  # a dimmer row 10 px below it
    # 64 mm crop at 1 mm/px -> 2 px per output pixel: the column lands at 16 + 5
    crop = extract_crop(vol, 0, x=50, y=64, mm=64.0, pixel_spacing=(1.0, 1.0))
    assert crop.shape == (3, 32, 32)
    assert crop[0].mean(axis=0).argmax() == 21
    assert crop[0, :, :20].mean(axis=1).argmax() == 21
    # anisotropic: rows at 1 mm/px (step 1), columns at 0.5 mm/px (step 2)
    crop = extract_crop(vol, 0, x=50, y=64, mm=32.0, pixel_spacing=(1.0, 0.5))
    assert crop[0].mean(axis=0).argmax() == 21
    assert crop[0, :, :20].mean(axis=1).argmax() == 26
    # mm = size * spacing at an integer centre reproduces pixel mode
    vol2 = _dot_volume()
    assert np.allclose(
        extract_crop(vol2, 2, x=20, y=10, mm=16.0, pixel_spacing=(0.5, 0.5)), extract_crop(vol2, 2, x=20, y=10)
    )
    with pytest.raises(ValueError):
        extract_crop(vol, 0, 50, 64, mm=30.0)


def test_adjacent_channels_take_neighbouring_slices():
    vol = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None], (5, 40, 40)).copy()
    crop = extract_crop(vol, 2, x=20, y=20, channels="adjacent")
    assert [float(c.mean()) for c in crop] == pytest.approx([0.0, 0.5, 1.0])  # slices 1, 2, 3
    edge = extract_crop(vol, 0, x=20, y=20, channels="adjacent")  # slice 0 repeated below
    assert [float(c.mean()) for c in edge] == pytest.approx([0.0, 0.0, 1.0])
    assert (extract_crop(vol, 2, x=20, y=20, channels="repeat") == 0).all()  # flat crop -> 0
    five = extract_crop(vol, 2, x=20, y=20, channels="adjacent", n_channels=5)
    assert five.shape == (5, 32, 32)
    with pytest.raises(IndexError):
        extract_crop(vol, 5, 20, 20)


def test_batch_extraction_equals_single():
    vol = _dot_volume()
    pts = [(2, 20, 10), (1, 5.2, 60.7), (4, 79, 0)]
    batch = extract_crops(vol, pts, channels="adjacent")
    assert batch.shape == (3, 3, 32, 32)
    for b, (k, x, y) in zip(batch, pts):
        assert np.array_equal(b, extract_crop(vol, k, x, y, channels="adjacent"))
    assert extract_crops(vol, np.zeros((0, 3))).shape == (0, 3, 32, 32)


def test_normalize_crop_robust():
    crop = np.linspace(0, 1, 300, dtype=np.float32).reshape(3, 10, 10)
    crop[0, 0, 0] = 1e6  # one outlier does not squash the rest
    out = normalize_crop(crop)
    assert out.max() == 1.0 and out.min() == 0.0
    assert np.median(out) == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------- slabs: 2.5D and neighbour crops

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _tilted(tilt_deg: float) -> np.ndarray:
    t = math.radians(tilt_deg)
    return np.array([1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t)])


def _series(positions, orientations=None, instances=None, volume=None) -> Series:
    """An Axial T2 series in memory: one slice per position, parallel unless ``orientations``."""
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    volume = np.zeros((n, 40, 40), np.float32) if volume is None else volume
    instances = np.arange(1, n + 1) if instances is None else np.asarray(instances)
    first = AXIAL if orientations is None else orientations[0]
    return Series("1", "2", None, AXIAL_T2, "axial", volume, instances, positions, np.asarray(first, float),
                  (0.8, 0.8), 3.0, 3.0, [f"{k}.dcm" for k in range(n)],
                  orientations=None if orientations is None else np.asarray(orientations, np.float64))


def _slab_geometry(tilts=(-12.0, 0.0, 14.0), centres_z=(-40.0, 0.0, 40.0), per_slab=4, spacing=3.0, lost=()):
    """Positions, orientations and instance numbers of one slab per tilt (``per_slab`` slices
    ``spacing`` mm apart along the slab's own normal), numbers running through the slabs;
    instances in ``lost`` are left out (numbers kept, a gap left)."""
    positions, orientations, instances = [], [], []
    number = 1
    for tilt, z in zip(tilts, centres_z):
        o = _tilted(tilt)
        normal = np.cross(o[:3], o[3:])
        for k in range(per_slab):
            if number not in lost:
                positions.append(np.array([-16.0, -16.0, z]) + (k - (per_slab - 1) / 2) * spacing * normal)
                orientations.append(o)
                instances.append(number)
            number += 1
    return np.array(positions), np.array(orientations), np.array(instances)


def test_slab_ids_parallel_stack_and_tilted_slabs():
    stack = [[0.0, 0.0, 4.0 * k] for k in range(10)]
    assert _series(stack).slab_ids().tolist() == [0] * 10
    # a lost slice (instance 5; the others keep their numbers) leaves a doubled gap, not two slabs
    lost = [p for k, p in enumerate(stack) if k != 4]
    assert _series(lost, instances=[k + 1 for k in range(10) if k != 4]).slab_ids().tolist() == [0] * 9
    positions, orientations, instances = _slab_geometry()
    assert _series(positions, orientations, instances).slab_ids().tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # a lost slice inside a slab (a doubled gap among single ones) keeps it whole; one at a
    # slab's end changes nothing else
    for lost_instance, sizes in ((8, [5, 4, 5]), (7, [5, 4, 5]), (6, [5, 4, 5]), (2, [4, 5, 5])):
        positions, orientations, instances = _slab_geometry(per_slab=5, lost=(lost_instance,))
        ids = _series(positions, orientations, instances).slab_ids()
        assert np.bincount(ids).tolist() == sizes, lost_instance
        assert (np.diff(ids) >= 0).all()


def test_slab_ids_split_parallel_slabs_by_their_gap():
    # two slabs within 2 degrees of each other, 20 mm apart: the gap splits them, not the angle;
    # one two spacings apart splits too, since the numbers run on (no slice was lost there)
    for tilts, centres in (((0.0, 1.0), (0.0, 20.0)), ((0.0, 0.0), (0.0, 15.0))):
        positions, orientations, instances = _slab_geometry(tilts=tilts, centres_z=centres)
        ids = _series(positions, orientations, instances).slab_ids()
        assert ids.tolist() == [0] * 4 + [1] * 4, (tilts, centres)
    assert _series([[0.0, 0.0, 0.0]]).slab_ids().tolist() == [0]


def _marked_volume(n: int) -> np.ndarray:
    """Slice s: a single bright pixel at row 20, column 4 + 2 s (which slice a channel shows)."""
    vol = np.zeros((n, 40, 40), np.float32)
    for s in range(n):
        vol[s, 20, 4 + 2 * s] = 1.0
    return vol


def _slices_shown(crop: np.ndarray) -> list[int]:
    # a 32 px crop centred on (20, 20) starts at row and column 4: crop column j is volume
    # column j + 4, i.e. slice j / 2
    return [int(np.argmax(c[16])) // 2 for c in crop]


def test_adjacent_channels_never_take_another_slabs_slice():
    positions, orientations, instances = _slab_geometry(lost=(6,))
    series = _series(positions, orientations, instances, volume=_marked_volume(len(positions)))
    slabs = series.slab_ids()
    for k in range(series.n_slices):
        crop = extract_crop(series.volume, k, 20, 20, channels="adjacent", percentiles=(0.0, 100.0),
                            slab_ids=slabs)
        shown = _slices_shown(crop)
        assert shown[1] == k and all(slabs[s] == slabs[k] for s in shown), (k, shown)
        lo, hi = neighbour_slices(series.n_slices, k, slabs)
        assert shown == [lo, k, hi]
    # without slab ids the edge of a slab takes the next slab's slice (what slab_ids prevents)
    assert _slices_shown(extract_crop(series.volume, 3, 20, 20, channels="adjacent", percentiles=(0.0, 100.0))) == [2, 3, 4]
    with pytest.raises(ValueError):
        extract_crop(series.volume, 0, 20, 20, slab_ids=slabs[:-1])


def test_neighbour_crops_are_the_crops_of_the_slices_either_side_in_the_slab():
    positions, orientations, instances = _slab_geometry()
    vol = np.random.default_rng(0).uniform(size=(len(positions), 40, 40)).astype(np.float32)
    series = _series(positions, orientations, instances, volume=vol)
    slabs = series.slab_ids()
    points = np.array([(k, 18.5, 21.0) for k in range(series.n_slices)])
    args = dict(channels="adjacent", mm=20.0, pixel_spacing=series.pixel_spacing)
    crops = extract_crops(vol, points, slab_ids=slabs, **args)
    neighbours = extract_neighbour_crops(vol, points, slab_ids=slabs, **args)
    assert neighbours.shape == (len(points), 2, 3, 32, 32) and neighbours.dtype == np.float32
    for k in range(series.n_slices):
        below, above = neighbour_slices(series.n_slices, k, slabs)
        assert np.array_equal(neighbours[k, 0], crops[below]) and np.array_equal(neighbours[k, 1], crops[above])
        first, last = k % 4 == 0, k % 4 == 3  # 4 slices per slab: a copy of k at the slab's ends
        assert (below == k) == first and (above == k) == last
        assert np.array_equal(neighbours[k, 0], crops[k]) == first
    assert extract_neighbour_crops(vol, np.zeros((0, 3)), slab_ids=slabs).shape == (0, 2, 3, 32, 32)


# ---------------------------------------------------------------- augmentation


def test_mirror_axis_only_patient_left_right():
    assert mirror_axis(AXIAL_T2) == 2
    assert mirror_axis(AXIAL_T2, "adjacent") == 2  # never the slice axis of an axial stack
    assert mirror_axis(SAGITTAL_T1) is None
    assert mirror_axis(SAGITTAL_T2, "adjacent") == 0
    assert mirror_axis(None) is None
    crop = np.random.default_rng(0).uniform(size=(3, 32, 32)).astype(np.float32)
    still = CropAugment(mirror_p=1.0, max_rotation_deg=0, max_shift_px=0, max_scale=0, gamma=0,
                          contrast=0, brightness=0, noise_std=0)
    rng = np.random.default_rng(0)
    assert np.allclose(augment_crop(crop, rng, still, flip_axis=2), crop[:, :, ::-1])
    assert np.allclose(augment_crop(crop, rng, still, flip_axis=0), crop[::-1])
    assert np.allclose(augment_crop(crop, rng, still, flip_axis=None), crop)


def test_augment_crops_oversamples_minorities_and_keeps_labels():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 80 + [1] * 10 + [2] * 5 + [-1] * 3)
    crops = rng.uniform(size=(len(labels), 3, 32, 32)).astype(np.float32)
    out, out_labels = augment_crops(crops, labels, np.random.default_rng(1), series_type=AXIAL_T2)
    assert out.shape == (98 + 30 + 15, 3, 32, 32) and out.dtype == np.float32
    assert np.array_equal(out[:98], crops) and np.array_equal(out_labels[:98], labels)
    assert np.bincount(out_labels[out_labels >= 0]).tolist() == [80, 40, 20]
    assert set(out_labels[98:].tolist()) == {1, 2}
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert not np.allclose(out[98:108], crops[labels == 1][:10].mean())  # actually changed
    again, _ = augment_crops(crops, labels, np.random.default_rng(1), series_type=AXIAL_T2)
    assert np.array_equal(out, again)
    # never more than the majority class
    idx = oversample_indices([0] * 10 + [1] * 8, np.random.default_rng(0))
    assert np.bincount(np.array([0] * 10 + [1] * 8)[idx]).tolist() == [10, 10]


def test_crop_dataset():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 4 + [2] * 2)
    crops = rng.uniform(size=(len(labels), 3, 32, 32)).astype(np.float32)
    ds = CropDataset(crops, labels, series_type=SAGITTAL_T2, channels="adjacent", seed=3)
    assert len(ds) == 26 + 12 + 6
    x, y = ds[len(ds) - 1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(ds[30][0], ds[30][0])  # deterministic per (seed, epoch, item)
    assert torch.equal(ds[0][0], torch.from_numpy(crops[0]))  # originals untouched by default
    ds.set_epoch(1)
    assert len(ds) == 44
    plain = CropDataset(crops, labels, augment=None, oversample=False)
    assert len(plain) == 26 and torch.equal(plain[25][0], torch.from_numpy(crops[25]))


def test_crop_dataset_slice_jitter_at_the_configured_rate_and_never_in_validation():
    n = 2000
    labels = np.zeros(n, dtype=np.int64)  # one class: no oversampled (augmented) rows
    crops = np.full((n, 3, 32, 32), 0.5, np.float32)
    neighbours = np.stack([np.zeros_like(crops), np.ones_like(crops)], axis=1)  # k-1: 0, k+1: 1
    ds = CropDataset(crops, labels, neighbour_crops=neighbours, seed=5)
    shown = np.array([float(ds[i][0][0, 0, 0]) for i in range(n)])
    assert abs(np.mean(shown != 0.5) - CropAugment().slice_jitter_p) < 0.04
    assert abs(np.mean(shown == 0.0) - np.mean(shown == 1.0)) < 0.04  # either side alike
    again = CropDataset(crops, labels, neighbour_crops=neighbours, seed=5)
    assert all(float(again[i][0][0, 0, 0]) == shown[i] for i in range(0, n, 97))  # seeded
    ds.set_epoch(1)
    assert not np.array_equal(shown, [float(ds[i][0][0, 0, 0]) for i in range(n)])  # redrawn per epoch
    rare = CropDataset(crops, labels, neighbour_crops=neighbours, augment=CropAugment(slice_jitter_p=0.1), seed=5)
    assert abs(np.mean([float(rare[i][0][0, 0, 0]) != 0.5 for i in range(n)]) - 0.1) < 0.03
    # evaluation (augment=None) and p = 0 always give the labelled slice's crop
    plain = CropDataset(crops, labels, neighbour_crops=neighbours, augment=None, oversample=False)
    off = CropDataset(crops, labels, neighbour_crops=neighbours, augment=CropAugment(slice_jitter_p=0.0))
    assert all(float(d[i][0][0, 0, 0]) == 0.5 for d in (plain, off) for i in range(n))
    with pytest.raises(ValueError):
        CropDataset(crops, labels, neighbour_crops=neighbours[:-1])


def test_in_plane_shift_in_millimetres_of_the_crop():
    config = CropAugment()
    assert shift_in_pixels(config, 32.0, 32).max_shift_px == pytest.approx(config.max_shift_mm)  # 1 mm/px
    assert shift_in_pixels(config, 64.0, 32).max_shift_px == pytest.approx(config.max_shift_mm / 2)
    assert shift_in_pixels(config, None, 32) == config  # pixel crops: max_shift_px as set
    assert shift_in_pixels(CropAugment(max_shift_mm=None), 32.0, 32) == CropAugment(max_shift_mm=None)
    ds = CropDataset(np.zeros((2, 3, 32, 32), np.float32), [0, 1], crop_mm=16.0)
    assert ds.augment.max_shift_px == pytest.approx(2 * config.max_shift_mm)


# ---------------------------------------------------------------- inference


def test_predict_proba(model):
    crops = np.random.default_rng(0).uniform(size=(5, 3, 32, 32)).astype(np.float32)
    model.train()
    probs = predict_proba(model, crops, batch_size=2)
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert model.training  # mode restored
    assert np.allclose(predict_proba(model, torch.from_numpy(crops), batch_size=8), probs, atol=1e-6)
    assert predict_proba(model, crops[:0]).shape == (0, 3)


def test_predict_proba_fixed_batch_pads_and_keeps_each_crops_output(model):
    """fixed_batch: the network sees one batch size only (the last batch zero-padded), and each
    crop's probabilities are those of the unpadded passes."""
    crops = np.random.default_rng(3).uniform(size=(11, 3, 32, 32)).astype(np.float32)
    seen = []
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        expected = predict_proba(model, crops, batch_size=64)
        assert seen == [11]
        seen.clear()
        fixed = predict_proba(model, crops, batch_size=4, fixed_batch=True)
        assert seen == [4, 4, 4]  # 4 + 4 + (3 crops + 1 padding)
        seen.clear()
        assert predict_proba(model, crops[:1], batch_size=4, fixed_batch=True).shape == (1, 3)
        assert seen == [4]
    finally:
        hook.remove()
    assert fixed.shape == (11, 3)
    np.testing.assert_allclose(fixed, expected, atol=1e-6)


def test_grade_crops_on_cpu_uses_one_batch_size(model):
    """Scoring actors grade in fixed CPU batches whatever a call's crop count (flat memory)."""
    from types import SimpleNamespace

    from lumbar_ray.scoring.study import CPU_GRADE_BATCH, grade_crops

    bundle = SimpleNamespace(parts=("scorer",), device=torch.device("cpu"), scorer=model, version="v")
    rng = np.random.default_rng(4)
    for n in (1, CPU_GRADE_BATCH + 5, 3 * CPU_GRADE_BATCH):
        crops = rng.uniform(size=(n, 3, 32, 32)).astype(np.float32)
        seen = []
        hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
        try:
            probs = grade_crops(bundle, crops)
        finally:
            hook.remove()
        assert seen == [CPU_GRADE_BATCH] * -(-n // CPU_GRADE_BATCH)
        np.testing.assert_allclose(probs, predict_proba(model, crops, batch_size=512), atol=1e-6)


def test_prepare_scorer_for_inference_folds_batchnorm_and_keeps_probabilities():
    torch.manual_seed(0)
    net = DeepScoreNet()
    net.train()
    with torch.no_grad():  # running statistics away from their defaults, so folding changes weights
        for _ in range(3):
            net(torch.rand(8, 3, 32, 32) * 3)
    crops = np.random.default_rng(1).uniform(size=(6, 3, 32, 32)).astype(np.float32)
    expected = predict_proba(net, crops)
    prepared = prepare_scorer_for_inference(copy.deepcopy(net))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 11  # the original is untouched
    np.testing.assert_allclose(predict_proba(prepared, crops), expected, atol=1e-5)
    assert not np.allclose(predict_proba(prepared, crops[::-1].copy()), expected)  # it does look at the crops
