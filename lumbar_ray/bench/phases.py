"""The benchmarks' measured phases, each run in a fresh (spawned) process of its own so that one
path's memory and torch threads never show up in another's: (a) the pipeline, (b)/(c) in one
process, (a) on a k-node private cluster, and the build of a small registry.

torch and ray are imported inside the phases (heavy): each phase sets its threads or starts its
runtime first, and the (b)/(c) phases' memory must not carry Ray, nor the (a) driver's torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from lumbar_ray.bench.localcluster import node_args, private_ray_tmpdir
from lumbar_ray.bench.memory import MemorySampler, wait_for_actor_exit
from lumbar_ray.bench.paths import detectors_alone, paper_style_loop, paper_style_predict, watch_bundle
from lumbar_ray.bench.results import Measurement
from lumbar_ray.config import DetectorConfig, ResourceConfig, ScoreConfig, ScorerConfig, TrainConfig
from lumbar_ray.dicom.read import load_descriptions, read_study
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.runtime import ray_session
from lumbar_ray.scoring.study import ModelBundle
from lumbar_ray.synth import writer as synth


def fresh_process(fn: Callable, *args, isolate: bool = True, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh spawned process (in this one with ``isolate=False``).

    ``fn`` travels by reference: it must be a module-level function of an importable module
    (the phases here, never a ``__main__`` one), which the new process imports by its path."""
    if not isolate:
        return fn(*args, **kwargs)
    if fn.__module__ == "__main__":
        raise ValueError(f"{fn.__name__} is defined in __main__: a spawned process cannot import it")
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _phase_setup() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


def _load_avg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def _measured_fields(sampler: MemorySampler) -> dict[str, Any]:
    """The :class:`Measurement` fields a memory sampler (and the machine's load) fill in."""
    return {
        "load_avg_1m": _load_avg(),
        "peak_rss_mb": sampler.peak_mb if sampler.available else float("nan"),
        "baseline_rss_mb": sampler.baseline_mb if sampler.available else float("nan"),
        "group_peaks_mb": {k: v / 2**20 for k, v in sampler.group_peaks.items()},
        "peak_processes": [(t, round(v / 2**20, 1)) for t, v in sampler.peak_breakdown],
        "max_processes": sampler.max_processes,
        "memory_samples": sampler.samples,
        "gpu_peak_mb": None if sampler.gpu_peak_bytes is None else sampler.gpu_peak_bytes / 2**20,
    }


def phase_build_registry(workdir: str, registry: str, imgsz: int, seed: int, num_cpus: int | None,
                         train_studies: int, epochs: int) -> str:
    """A small, quickly trained registry (accuracy irrelevant, speed realistic): `lumbar-ray synth`
    of small training studies + `lumbar-ray train --folds 2 --epochs E --no-final-fit --champion`."""
    _phase_setup()
    from lumbar_ray.training.cv import run_training  # heavy: torch, ray, sklearn; only this phase trains

    data = str(Path(workdir) / f"train-small-seed{seed}-n{train_studies}")
    if not (Path(data) / "train.csv").exists():
        synth.synthesize(data, n_studies=train_studies, seed=seed, split="train", size="small")
    cfg = TrainConfig(data=data, registry=registry, folds=2, seed=seed, final_fit=False,
                      scorer=ScorerConfig(epochs=epochs), detector=DetectorConfig(epochs=epochs, imgsz=imgsz),
                      resources=ResourceConfig())
    with ray_session(num_cpus=num_cpus):
        outcome = run_training(cfg, echo=lambda m: None)
    ModelRegistry(registry).set_champion(outcome.version, reason="lumbar_ray.bench.scoring development registry")
    return f"{registry}@{outcome.version}"


def phase_in_process(path: str, models: str, root: str, split: str, id_sets: list[list[str]], device: str,
                     slice_batch: int, interval_s: float, scratch: str, threads: int | None = None) -> list[dict]:
    """(b) or (c) for each id set, in this (fresh) process; models loaded and one study warmed
    up before any timing."""
    _phase_setup()
    import torch  # heavy: after _phase_setup, and only in this phase's process

    if threads:
        torch.set_num_threads(int(threads))
    bundle = ModelBundle.from_registry(models, device=device)
    descriptions = load_descriptions(root, split)
    warm = read_study(root, id_sets[0][0], split=split, descriptions=descriptions)
    if path == "b":
        paper_style_predict(bundle, warm)
    else:
        detectors_alone(bundle, [warm], slice_batch)
    del warm
    gpu = bundle.device.type == "cuda"
    out = []
    for k, ids in enumerate(id_sets):
        studies = None
        if path == "c":  # preloaded: reading is not part of (c)
            studies = [read_study(root, s, split=split, descriptions=descriptions) for s in ids]
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        counter = watch_bundle(bundle)
        failed = 0
        with MemorySampler(interval_s) as mem:
            t0 = time.perf_counter()
            if path == "b":
                n_scored, failed = paper_style_loop(bundle, root, ids, split, out_parquet=str(Path(scratch) / f"b{k}.parquet"))
            else:
                detectors_alone(bundle, studies, slice_batch)
                n_scored = len(studies)
            if gpu:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        counter.remove()
        m = Measurement(path, len(ids), seconds, n_scored, failed, **_measured_fields(mem),
                        detector_calls=counter.calls.get("detector", 0), slices=counter.items.get("detector", 0),
                        scorer_calls=counter.calls.get("scorer", 0), crops=counter.items.get("scorer", 0),
                        max_detector_batch=counter.max_batch.get("detector"),
                        max_scorer_batch=counter.max_batch.get("scorer"), torch_threads=torch.get_num_threads())
        if gpu:
            m.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        out.append(dataclasses.asdict(m))
        del studies
    return out


def phase_pipeline(score_kwargs: dict, id_sets: list[list[str]], address: str | None, num_cpus: int | None,
                   num_gpus: int | None, interval_s: float, scratch: str, warmup: bool = True) -> list[dict]:
    """(a) for each id set, in one Ray runtime: a warm-up run on one study first (not timed),
    then each set into its own temporary output."""
    _phase_setup()
    import ray  # heavy: only the pipeline phases run Ray

    from lumbar_ray.scoring.pipeline import run_scoring  # heavy: ray

    gpu = bool(num_gpus)
    out = []
    warmup_s = None
    with ray_session(address, num_cpus=num_cpus, num_gpus=num_gpus):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        runs = ([("warmup", id_sets[0][:1])] if warmup else []) + [(f"n{len(ids)}", ids) for ids in id_sets]
        for tag, ids in runs:
            dest = Path(scratch) / f"a-{tag}"
            cfg = ScoreConfig(out=str(dest), study_ids=list(ids), run_id=f"bench-{tag}", **score_kwargs)
            with MemorySampler(interval_s, gpu=gpu) as mem:
                t0 = time.perf_counter()
                summary = run_scoring(cfg, echo=lambda m: None)
                seconds = time.perf_counter() - t0
            shutil.rmtree(dest, ignore_errors=True)
            wait_for_actor_exit()
            if tag == "warmup":
                warmup_s = seconds
                continue
            m = Measurement("a", len(ids), seconds, summary.n_scored, summary.n_failed, **_measured_fields(mem),
                            warmup_run_s=warmup_s)
            out.append(dataclasses.asdict(m))
    return out


def phase_nodes(n_nodes: int, cpus_per_node: float, score_kwargs: dict, id_sets: list[list[str]], interval_s: float,
                scratch: str) -> dict:
    """(a) on ``n_nodes`` nodes: start a private cluster of that many raylets on this machine, run
    :func:`phase_pipeline` on each id set, stop it."""
    from ray.cluster_utils import Cluster  # heavy: ray, as in phase_pipeline

    with private_ray_tmpdir(prefix="lr-nodes-") as temp_dir:
        cluster = Cluster(initialize_head=True,
                          head_node_args=node_args(temp_dir, cpus_per_node, head=True, object_store_mb=300))
        try:
            for _ in range(n_nodes - 1):
                cluster.add_node(**node_args(temp_dir, cpus_per_node, head=False, object_store_mb=300))
            cluster.wait_for_nodes()
            t0 = time.perf_counter()
            runs = phase_pipeline(score_kwargs, id_sets, cluster.address, None, None, interval_s, scratch)
            return {"runs": runs, "phase_s": time.perf_counter() - t0}
        finally:
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
