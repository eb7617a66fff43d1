"""Training examples as shard files (training/shards.py, training/shard_data.py): cut per chunk of
one fold's studies and per series type, read lazily, each trial reading only its own. Cut here
without Ray (the tasks' function called in-process) on a few small synthetic studies."""

import dataclasses

import numpy as np
import pytest
import torch

from lumbar_ray import storage
from lumbar_ray.config import ScorerConfig
from lumbar_ray.metrics import labels as label_io
from lumbar_ray.targets import SAGITTAL_T2, SERIES_TYPES
from lumbar_ray.training.artifacts import ALL_FOLDS
from lumbar_ray.training.detector_data import DetectorDataset, DetectorSample
from lumbar_ray.training.examples import cut_chunk, study_examples
from lumbar_ray.training.shard_data import (
    ShardBlockSampler, block_loader, block_shuffled_order, detector_fold_data, scorer_fold_data,
)
from lumbar_ray.training.shards import (
    Manifest, ShardCache, chunk_studies, pack_samples, remove_examples, unpack_samples,
)

N_STUDIES = 4


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """4 small studies, 2 folds, 1 study per chunk, cut into shards as cut_examples' tasks do."""
    from lumbar_ray.synth import writer as synth

    root = str(tmp_path_factory.mktemp("rsna"))
    synth.synthesize(root, n_studies=N_STUDIES, seed=5, split="train", size="small")
    points = label_io.labelled_points(label_io.read_labels(root), label_io.read_coordinates(root))
    studies = sorted(int(s) for s in points["study_id"].unique())
    folds = {s: i % 2 for i, s in enumerate(studies)}
    out = str(tmp_path_factory.mktemp("run") / "examples")
    scorer = dataclasses.asdict(ScorerConfig())
    entries = [cut_chunk(root, "train", out, i, fold, chunk, points[points["study_id"].isin(chunk)],
                         scorer, True, negatives=1)
               for i, (fold, chunk) in enumerate(chunk_studies(folds, per_chunk=1))]
    Manifest(out, entries, entries[0].channels).write()
    worker = {"examples": out, "folds": folds, "scorer": scorer, "seed": 0}
    return root, points, folds, out, worker


def test_chunks_hold_one_fold_each_at_most_per_chunk_studies():
    chunks = chunk_studies({1: 0, 2: 1, 3: 0, 4: 0, 5: None}, per_chunk=2)
    assert chunks == [(0, [1, 3]), (0, [4]), (1, [2]), (None, [5])]
    with pytest.raises(ValueError):
        chunk_studies({1: 0}, per_chunk=0)


def test_detector_samples_pack_and_unpack_exactly():
    rng = np.random.default_rng(0)
    samples = [DetectorSample(7, 8, k, rng.integers(0, 255, size=shape, dtype=np.uint8), (0.5, 0.75),
                              np.arange(m, dtype=np.int64), rng.uniform(size=(m, 2)))
               for k, (shape, m) in enumerate([((5, 6), 2), ((3, 9), 0), ((4, 4), 1)])]
    back = unpack_samples(pack_samples(samples))
    for a, b in zip(samples, back, strict=True):
        assert (a.study_id, a.series_id, a.instance_number, a.pixel_spacing) == (b.study_id, b.series_id, b.instance_number, b.pixel_spacing)
        assert np.array_equal(a.image, b.image) and a.image.dtype == b.image.dtype
        assert np.array_equal(a.class_ids, b.class_ids) and np.array_equal(a.points, b.points)
    assert unpack_samples(pack_samples([])) == []


def test_block_order_is_a_permutation_visiting_a_window_of_blocks_at_a_time():
    blocks = np.repeat(np.arange(6), 5)
    order = block_shuffled_order(blocks, np.random.default_rng(1), window=2)
    assert sorted(order) == list(range(30))
    windows = [set(blocks[order[i:i + 10]]) for i in range(0, 30, 10)]
    assert all(len(w) == 2 for w in windows) and set().union(*windows) == set(range(6))
    assert not np.array_equal(order, block_shuffled_order(blocks, np.random.default_rng(2), window=2))


def test_ranks_share_out_every_item_once():
    data = list(range(11))
    blocks = np.repeat(np.arange(4), 3)[:11]
    ranks = [list(ShardBlockSampler(data, lambda: blocks, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert set(ranks[0]) | set(ranks[1]) == set(range(11))  # one item padded twice, as DistributedSampler pads
    sampler = ShardBlockSampler(data, lambda: blocks, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == sorted(sampler) and first != list(sampler)


def test_cache_keeps_the_last_few_chunks():
    cache = ShardCache(lambda chunk: [chunk], capacity=2)
    for chunk in (1, 2, 1, 3, 1, 2):
        cache.get(chunk)
    assert cache.loads == 4 and list(cache.entries) == [1, 2]


def test_detector_shards_per_series_type_and_a_trial_reads_only_its_own(cut, monkeypatch):
    root, points, folds, out, worker = cut
    manifest = Manifest.read(out)
    assert {c.fold for c in manifest.chunks} == {0, 1} and all(len(c.studies) == 1 for c in manifest.chunks)
    for series_type in SERIES_TYPES:
        files = storage.glob(f"{out}/detector/{series_type}/*.npz")
        assert len(files) == sum(1 for c in manifest.chunks if c.n_slices.get(series_type))
    read = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda path: read.append(str(path)) or real(path))
    data = detector_fold_data(worker, SAGITTAL_T2, fold=0)
    samples = list(data.train_samples)
    assert samples and {s.study_id for s in samples} == {s for s, f in folds.items() if f == 1}
    assert data.val_studies == sorted(s for s, f in folds.items() if f == 0)
    assert set(data.points["study_id"]) == set(data.val_studies)
    slices = [p for p in read if p.endswith(".npz")]
    assert slices and all(f"/detector/{SAGITTAL_T2}/" in p for p in slices), read  # no crops, no other type
    # the same slices as cut in memory, exactly (uint8, not re-encoded)
    sid = samples[0].study_id
    own = points[points["study_id"] == sid]
    direct = study_examples(root, sid, own, ScorerConfig(), negatives=1).slices[SAGITTAL_T2]
    assert len(direct) == sum(s.study_id == sid for s in samples)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(direct, [s for s in samples if s.study_id == sid]))
    dataset = DetectorDataset.from_samples(data.train_samples, SAGITTAL_T2, imgsz=64)
    assert dataset.samples is data.train_samples and len(dataset.item_blocks()) == len(dataset)
    assert len(detector_fold_data(worker, SAGITTAL_T2, ALL_FOLDS).train_samples) > len(samples)


def test_scorer_trial_reads_its_folds_crops_lazily_and_exactly(cut):
    root, points, folds, _, worker = cut
    data = scorer_fold_data(worker, fold=1)
    train_studies = {s for s, f in folds.items() if f == 0}
    rows = data.dataset.rows
    assert set(rows.points["study_id"]) == train_studies
    assert set(data.val.points["study_id"]) == {s for s, f in folds.items() if f == 1}
    assert len(data.labels) == len(rows) == (points["study_id"].isin(train_studies)).sum()
    sid = int(rows.points["study_id"].iloc[0])
    direct = study_examples(root, sid, points[points["study_id"] == sid], ScorerConfig(), with_slices=False)
    mine = np.flatnonzero(rows.points["study_id"].to_numpy() == sid)
    assert np.array_equal(np.stack([rows.crop(i) for i in mine]), direct.crops)
    assert np.array_equal(np.stack([rows.crop(i, 1) for i in mine]), direct.neighbour_crops[:, 1])
    # one epoch decodes each training chunk once, a window of chunks at a time (here one chunk:
    # a plain shuffle would decode a chunk for almost every item)
    rows.cache = ShardCache(rows.cache.load, capacity=1)
    loader = block_loader(data.dataset, 8, seed=0, window=1)
    loader.sampler.set_epoch(1)
    seen = sum(len(y) for _, y in loader)
    assert seen == len(data.dataset) > 2 * len(train_studies)
    assert rows.cache.loads == len(train_studies) and len(rows.cache.entries) == 1
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    assert data.val.predict(net, "cpu", batch_size=7).shape == (len(data.val), 3)


def test_removing_the_shards(tmp_path):
    out = tmp_path / "examples"
    (out / "scorer").mkdir(parents=True)
    (out / "scorer" / "chunk-00000.npz").write_bytes(b"x")
    remove_examples(str(out))
    assert not out.exists()
    remove_examples(str(out))  # already gone: nothing to do
