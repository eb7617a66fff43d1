"""Training examples on storage: the shard files a run's example-cutting tasks write, their
manifest, and lazy, cached readers of them (no Ray here).

Layout under ``{storage}/{version}/examples/`` (:func:`examples_dir`), local or an fsspec URL:

* ``manifest.json`` — one entry per chunk (a few studies of one fold, :class:`ChunkEntry`): its
  fold, studies, counts; plus the crops' channel count.
* ``scorer/chunk-00000.npz`` — the chunk's scorer crops ``(n, C, 32, 32)`` float32 and their
  neighbour crops ``(n, 2, C, 32, 32)``; ``scorer/chunk-00000.parquet`` — their labelled points
  (row i <-> crop i).
* ``detector/{series type}/chunk-00000.npz`` — the chunk's detector slices of one series type,
  packed (:func:`pack_samples`), so that a detector trial reads its own series type only.

Crops stay float32 and slices uint8, exactly as cut: a trial trains on what it would have held in
memory before, it only holds a few chunks of it at once (:class:`ShardCache`).

``run_training`` removes the folder once the version is published (shards can be large). A run
that failed leaves it under ``{storage}/{version}/examples``, to inspect or delete; it is never
reused: cutting removes any earlier shards of the same version first.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from lumbar_ray import storage
from lumbar_ray.training.detector_data import DetectorSample

EXAMPLES_DIR = "examples"
MANIFEST_FILE = "manifest.json"
# Studies per chunk: a chunk is one task's work and one shard file per kind; what a trial holds at
# once is a few chunks (ShardCache), so this bounds a worker's example memory whatever the number
# of studies. 8 RSNA studies make ~7 MB of scorer crops and ~20 MB of detector slices per type.
STUDIES_PER_CHUNK = 8


def examples_dir(storage_path: str, version: str) -> str:
    """Where a run's example shards go: ``{storage}/{version}/examples``."""
    return storage.join(storage_path, version, EXAMPLES_DIR)


def crops_file(root: str, chunk: int) -> str:
    return storage.join(root, "scorer", f"chunk-{chunk:05d}.npz")


def points_file(root: str, chunk: int) -> str:
    return storage.join(root, "scorer", f"chunk-{chunk:05d}.parquet")


def slices_file(root: str, series_type: str, chunk: int) -> str:
    return storage.join(root, "detector", series_type, f"chunk-{chunk:05d}.npz")


@dataclass
class ChunkEntry:
    """One chunk's shards as the manifest lists them; fold None: studies without a fold."""

    chunk: int
    fold: int | None
    studies: list[int]
    n_crops: int = 0
    n_slices: dict[str, int] = field(default_factory=dict)  # series type -> detector slices
    problems: list[str] = field(default_factory=list)  # only on the way to the driver, not in the manifest
    channels: int = 3


@dataclass
class Manifest:
    """Which shards a run's examples are in, and which studies and fold each holds."""

    root: str
    chunks: list[ChunkEntry]
    channels: int = 3

    def to_json(self) -> str:
        return json.dumps({"channels": self.channels,
                           "chunks": [{k: v for k, v in asdict(c).items() if k != "problems"} for c in self.chunks]},
                          indent=1)

    @classmethod
    def read(cls, root: str) -> Manifest:
        raw = json.loads(storage.read_bytes(storage.join(root, MANIFEST_FILE)))
        return cls(root, [ChunkEntry(**c) for c in raw["chunks"]], int(raw["channels"]))

    def write(self) -> None:
        storage.write_bytes(storage.join(self.root, MANIFEST_FILE), self.to_json().encode())

    def chunks_for(self, folds: set[int] | None, exclude: int | None = None) -> list[ChunkEntry]:
        """The chunks of ``folds`` (None: of every fold), less fold ``exclude``; chunks of studies
        without a fold are never trained or validated on."""
        return [c for c in self.chunks if c.fold is not None and (folds is None or c.fold in folds)
                and c.fold != exclude]


def chunk_studies(study_folds: dict[int, int | None], per_chunk: int = STUDIES_PER_CHUNK) -> list[tuple[int | None, list[int]]]:
    """(fold, study ids) of each chunk: the studies of one fold (None: no fold) in groups of at
    most ``per_chunk``, so that a trial reads exactly its folds' chunks."""
    if per_chunk < 1:
        raise ValueError(f"per_chunk must be at least 1, got {per_chunk}")
    by_fold: dict[int | None, list[int]] = {}
    for study, fold in sorted(study_folds.items()):
        by_fold.setdefault(fold, []).append(int(study))
    out = []
    for fold in sorted(by_fold, key=lambda f: (f is None, f if f is not None else 0)):
        studies = by_fold[fold]
        out += [(fold, studies[i:i + per_chunk]) for i in range(0, len(studies), per_chunk)]
    return out


# ---------------------------------------------------------------------------------------------
# Packing: variable-sized detector slices as a few flat arrays of one .npz
# ---------------------------------------------------------------------------------------------


def pack_samples(samples: list[DetectorSample]) -> dict[str, np.ndarray]:
    """Detector samples as flat arrays (images and boxes concatenated, with their offsets)."""
    shapes = np.array([s.image.shape for s in samples], dtype=np.int64).reshape(-1, 2)
    n_boxes = np.array([len(s.class_ids) for s in samples], dtype=np.int64)
    return {
        "ids": np.array([(s.study_id, s.series_id, s.instance_number) for s in samples], dtype=np.int64).reshape(-1, 3),
        "shapes": shapes,
        "pixels": (np.concatenate([s.image.ravel() for s in samples]) if samples else np.zeros(0)).astype(np.uint8),
        "spacing": np.array([s.pixel_spacing for s in samples], dtype=np.float64).reshape(-1, 2),
        "n_boxes": n_boxes,
        "class_ids": (np.concatenate([s.class_ids for s in samples]) if samples else np.zeros(0)).astype(np.int64),
        "points": (np.concatenate([s.points for s in samples]) if samples else np.zeros((0, 2))).astype(np.float64).reshape(-1, 2),
    }


def unpack_samples(arrays: dict[str, np.ndarray]) -> list[DetectorSample]:
    """The inverse of :func:`pack_samples`."""
    pixel_ends = np.cumsum(arrays["shapes"].prod(axis=1))
    box_ends = np.cumsum(arrays["n_boxes"])
    out = []
    for i, (study, series, instance) in enumerate(arrays["ids"]):
        p0 = pixel_ends[i - 1] if i else 0
        b0 = box_ends[i - 1] if i else 0
        out.append(DetectorSample(
            study_id=int(study), series_id=int(series), instance_number=int(instance),
            image=arrays["pixels"][p0:pixel_ends[i]].reshape(arrays["shapes"][i]).copy(),
            pixel_spacing=(float(arrays["spacing"][i, 0]), float(arrays["spacing"][i, 1])),
            class_ids=arrays["class_ids"][b0:box_ends[i]].copy(), points=arrays["points"][b0:box_ends[i]].copy()))
    return out


def npz_bytes(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    """Arrays as the bytes of an .npz file (``compressed``: deflate, worth it for uint8 slices)."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (local or a URL), read whole."""
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def read_points(root: str, chunks: list[ChunkEntry]) -> pd.DataFrame:
    """The labelled points of ``chunks``' crops, in chunk order, with each row's ``chunk`` and
    ``row`` (its index in the chunk's crops)."""
    frames = []
    for entry in chunks:
        frame = pd.read_parquet(io.BytesIO(storage.read_bytes(points_file(root, entry.chunk))))
        frame["chunk"], frame["row"] = entry.chunk, np.arange(len(frame))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["chunk", "row", "study_id"])


def remove_examples(root: str) -> None:
    """Delete a run's example shards (when the run has published: they can be large)."""
    fs, path = storage.filesystem_for(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------------------------------------
# Reading lazily: a few decoded chunks at a time
# ---------------------------------------------------------------------------------------------


class ShardCache:
    """The last ``capacity`` shard files decoded (least recently used evicted): a trial holds a
    few chunks of examples, not all of them. One per process (a DataLoader worker has its own)."""

    def __init__(self, load: Callable[[int], object], capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.load, self.capacity = load, capacity
        self.entries: OrderedDict[int, object] = OrderedDict()
        self.loads = 0  # decoded files so far (tests and benchmarks read it)

    def get(self, chunk: int):
        if chunk in self.entries:
            self.entries.move_to_end(chunk)
            return self.entries[chunk]
        value = self.load(chunk)
        self.loads += 1
        self.entries[chunk] = value
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value

    def __getstate__(self):  # a copy sent to another process starts empty
        return {"load": self.load, "capacity": self.capacity, "entries": OrderedDict(), "loads": 0}


class ShardedCrops:
    """Scorer crops of some chunks, read lazily (a :class:`~lumbar_ray.training.crop_data.CropDataset`
    row source): row i is ``points.iloc[i]``, its crop loaded with its chunk on first use."""

    has_neighbours = True

    def __init__(self, root: str, points: pd.DataFrame, channels: int, cache_chunks: int = 4, crop_px: int = 32):
        self.root = root
        self.points = points.reset_index(drop=True)
        self.row_chunk = self.points["chunk"].to_numpy(dtype=np.int64)
        self.row_in_chunk = self.points["row"].to_numpy(dtype=np.int64)
        self.shape = (len(self.points), int(channels), crop_px, crop_px)
        self.cache = ShardCache(self._load, cache_chunks)

    def _load(self, chunk: int) -> dict[str, np.ndarray]:
        return read_npz(crops_file(self.root, chunk))

    @property
    def blocks(self) -> np.ndarray:
        """Each row's chunk: rows of one chunk are cheap to read together."""
        return self.row_chunk

    def __len__(self) -> int:
        return len(self.points)

    def crop(self, i: int, offset: int = 0) -> np.ndarray:
        """Row i's crop (offset 0), or its neighbour on slice k-1 / k+1 (offset -1 / +1)."""
        arrays = self.cache.get(int(self.row_chunk[i]))
        j = int(self.row_in_chunk[i])
        return arrays["crops"][j] if offset == 0 else arrays["neighbours"][j, (offset + 1) // 2]

    def batches(self, size: int):
        """The crops in row order, ``size`` at a time (float32 arrays), one chunk read at a time."""
        start = 0
        while start < len(self):
            stop = min(start + size, len(self))
            # rows of a batch may span chunks: stack them one by one
            yield np.stack([self.crop(i) for i in range(start, stop)])
            start = stop


class ShardedSamples:
    """Detector slices of one series type from some chunks, read lazily: a sequence that
    :class:`~lumbar_ray.training.detector_data.DetectorDataset` takes as its samples."""

    def __init__(self, root: str, series_type: str, chunks: list[ChunkEntry], cache_chunks: int = 4):
        self.root, self.series_type = root, series_type
        # (chunk, position in the chunk) of each sample, from the manifest's counts: a chunk's
        # slices are read and decoded when first used
        self.index: list[tuple[int, int]] = [(c.chunk, j) for c in chunks for j in range(c.n_slices.get(series_type, 0))]
        self.cache = ShardCache(self._load, cache_chunks)

    def _load(self, chunk: int) -> list[DetectorSample]:
        return unpack_samples(read_npz(slices_file(self.root, self.series_type, chunk)))

    @property
    def blocks(self) -> np.ndarray:
        return np.array([c for c, _ in self.index], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> DetectorSample:
        chunk, j = self.index[i]
        return self.cache.get(chunk)[j]

    def __iter__(self):
        return (self[i] for i in range(len(self)))
