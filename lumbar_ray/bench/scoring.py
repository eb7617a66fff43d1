"""`make bench` / ``python -m lumbar_ray.bench.scoring``: a benchmark, not a test.

Same studies, same models, one run, three ways:

(a) **pipeline** — the Ray Data pipeline (:func:`lumbar_ray.scoring.pipeline.run_scoring`) into a
    temporary output; resources from the flags (default: a local Ray runtime on this machine).
(b) **paper loop** — the source paper's predictor style: one process, one detector forward call
    per slice (batch of 1) and one DeepScoreNet call per crop (batch of 1). It reuses the
    package's functions (:func:`scoring.detect_study` with ``batch_size=1``,
    :func:`scorer.predict_proba` per crop, :func:`scoring.study_rows`): no copy of them.
(c) **detectors alone** — :func:`detector.detect_series` over the same slices, batched as in the
    pipeline, volumes preloaded (no reading), no Ray: the ceiling the pipeline can approach.

Each is run for N and ``scale``×N studies (the N studies are the first N of the larger set), in
a fresh process of its own, so that one path's memory never shows up in another's. Peak memory
is the RSS of that process and all its descendants (for (a): the driver, Ray's own processes and
its worker/actor processes — a local runtime started by the benchmark is a child of the driver),
sampled with psutil in a background thread. With ``--address`` (an existing cluster) the workers
are not this process's descendants: the memory column then covers the driver side only.

(b) and (c) run with ``--threads`` torch threads, by default as many as the CPUs the pipeline
gives its detector actors (Ray sets each actor's OMP_NUM_THREADS to its CPUs): the same compute
for the same work. On a busy machine more threads than free cores make OpenMP 10-100x slower
(measured here: 2 threads under a load of 10 on 2 cores, 235 -> 3 slices/s), so a default of
"all cores" would flatter the pipeline. ``--repeat R`` interleaves R rounds of (b), (c), (a)
and reports each path's median-time round.

What the timings include (printed with the results):
- (a) ``run_scoring`` wall time: listing, reading, both actor pools' start-up and model loading
  (Ray Data starts actors per run), detection, grading, Parquet writes. Excluded: ``ray.init``
  and one warm-up run on one study before the timed runs. The marginal rate
  ``(10N - N) / (t(10N) - t(N))`` removes the per-run fixed cost.
- (b), (c): the loop only; model loading and one warm-up study are excluded. (b) includes reading
  the DICOMs and writing one Parquet file; (c) includes volume normalisation, letterboxing,
  the forward passes and the candidate boxes, and excludes reading.
- Every file is read once before any timing, so all three see a warm page cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Targets of the issue "make bench — a benchmark, not a test".
TARGET_A_OVER_B = 5.0
TARGET_A_OVER_C = 0.8
# Memory counts as flat in N when the peak at scale×N is at most this much above the peak at N.
FLAT_MEMORY_TOLERANCE = 0.15

PATHS = ("a", "b", "c")
PATH_NAMES = {
    "a": "(a) Ray pipeline",
    "b": "(b) paper loop, batch 1",
    "c": "(c) detectors alone",
}


# ------------------------------------------------------------------------------------------ memory


def _psutil():
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with ray[default]
        return None
    return psutil


class MemorySampler:
    """Peak resident memory of this process and all its descendants, sampled every
    ``interval_s`` seconds in a daemon thread (``with MemorySampler() as m: ...; m.peak_mb``).

    The sum of RSS counts pages shared between processes (the torch libraries mapped by every
    actor, Ray's object store) once per process: an upper bound on what the machine spends.
    ``gpu=True`` also samples the device-wide used memory of the visible NVIDIA GPUs (NVML).
    """

    def __init__(self, interval_s: float = 0.2, gpu: bool = False):
        self.interval_s = float(interval_s)
        self.psutil = _psutil()
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.group_peaks: dict[str, int] = {}
        self.max_processes = 0
        self.samples = 0
        self.gpu_peak_bytes: int | None = None
        self._gpu_handles: list = []
        self.peak_breakdown: list[tuple[str, int]] = []  # (process, RSS bytes) at the peak
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if gpu:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._gpu_handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
                self.gpu_peak_bytes = 0
            except Exception as exc:  # no NVML: no GPU memory column
                log.info("no GPU memory sampling: %s", exc)

    @property
    def available(self) -> bool:
        return self.psutil is not None

    @staticmethod
    def _title(proc) -> str:
        """A short name: 'ray::<actor or task>' for Ray workers, else the program's name."""
        try:
            cmd = proc.cmdline()
        except Exception:
            return "?"
        if not cmd:
            return "?"
        if cmd[0].startswith("ray::"):
            return cmd[0].split(" ")[0]
        if any(c.endswith("default_worker.py") for c in cmd):
            return "ray::(starting worker)"
        scripts = [c for c in cmd[1:] if c.endswith(".py")]
        return os.path.basename(scripts[0] if scripts else cmd[0])

    def sample(self) -> int:
        """One sample; returns the summed RSS in bytes."""
        if self.psutil is None:
            return 0
        me = self.psutil.Process()
        try:
            procs = [me, *me.children(recursive=True)]
        except self.psutil.Error:
            procs = [me]
        total = 0
        groups: dict[str, int] = {}
        parts: list[tuple[str, int]] = []
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except self.psutil.Error:
                continue
            total += rss
            title = "driver" if proc.pid == me.pid else self._title(proc)
            kind = "driver" if title == "driver" else ("workers" if title.startswith("ray::") else "other")
            groups[kind] = groups.get(kind, 0) + rss
            parts.append((title, rss))
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_breakdown = sorted(parts, key=lambda p: -p[1])
        self.max_processes = max(self.max_processes, len(procs))
        for kind, value in groups.items():
            self.group_peaks[kind] = max(self.group_peaks.get(kind, 0), value)
        if self._gpu_handles:
            import pynvml

            used = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._gpu_handles)
            self.gpu_peak_bytes = max(self.gpu_peak_bytes or 0, used)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.baseline_bytes = self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def baseline_mb(self) -> float:
        return self.baseline_bytes / 2**20


# ------------------------------------------------------------------------------------------ (b)


class CallCounter:
    """Counts forward calls and items of modules (forward pre-hooks); ``remove()`` detaches."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.max_batch: dict[str, int] = {}
        self._handles: list = []

    def watch(self, name: str, module) -> "CallCounter":
        def hook(_module, args):
            n = int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 1
            self.calls[name] = self.calls.get(name, 0) + 1
            self.items[name] = self.items.get(name, 0) + n
            self.max_batch[name] = max(self.max_batch.get(name, 0), n)

        self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def watch_bundle(bundle, counter: CallCounter | None = None) -> CallCounter:
    """Count the detector (all series types together) and DeepScoreNet forward calls of a bundle."""
    from lumbar_ray.models.detector import unwrap_model

    counter = counter or CallCounter()
    for detector in bundle.detectors.values():
        counter.watch("detector", unwrap_model(detector))
    counter.watch("scorer", bundle.scorer)
    return counter


def per_crop_proba(model, crops: np.ndarray, device="cpu") -> np.ndarray:
    """DeepScoreNet probabilities with one forward call per crop (batch of 1), as the paper's
    predictor does; the package's :func:`scorer.predict_proba` on each crop."""
    from lumbar_ray.models.deepscorenet import NUM_CLASSES, predict_proba

    parts = [predict_proba(model, crops[i : i + 1], batch_size=1, device=device) for i in range(len(crops))]
    return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def paper_style_predict(bundle, study):
    """One study the paper's way: every slice of each series through its detector one at a time
    (:func:`scoring.detect_study` with ``batch_size=1``: one forward call per slice), then one
    DeepScoreNet call per detected crop. Returns ``(DetectedStudy, probs)``."""
    from lumbar_ray.scoring import study as scoring

    detected = scoring.detect_study(bundle, study, batch_size=1)
    return detected, per_crop_proba(bundle.scorer, detected.crops, device=bundle.device)


def batched_predict(bundle, study, slice_batch: int = 32):
    """The same study the pipeline's way (all slices of a series in batches, all crops at once)."""
    from lumbar_ray.scoring import study as scoring

    detected = scoring.detect_study(bundle, study, batch_size=slice_batch)
    return detected, scoring.grade_crops(bundle, detected.crops)


def paper_style_loop(bundle, root: str, study_ids: Sequence[str], split: str = "test", run_id: str = "bench-paper",
                     out_parquet: str | None = None) -> tuple[int, int]:
    """(b): read each study, predict it the paper's way, make its 25 rows; write one Parquet file
    at the end when ``out_parquet`` is given. Returns ``(n_scored, n_failed)``."""
    import pandas as pd

    from lumbar_ray.scoring import study as scoring
    from lumbar_ray.dicom.read import load_descriptions, read_study

    descriptions = load_descriptions(root, split)
    now = pd.Timestamp.now(tz="UTC")
    frames = []
    failed = 0
    for study_id in study_ids:
        try:
            study = read_study(root, study_id, split=split, descriptions=descriptions)
            scoring.require_readable(study)
            detected, probs = paper_style_predict(bundle, study)
        except Exception as exc:  # counted, not raised: the other paths record and go on too
            log.warning("paper loop: study %s failed: %s", study_id, exc)
            failed += 1
            continue
        frames.append(scoring.study_rows(detected, probs, bundle.version, bundle.priors, run_id, now))
    if out_parquet and frames:
        pd.concat(frames, ignore_index=True).to_parquet(out_parquet, index=False)
    return len(frames), failed


# ------------------------------------------------------------------------------------------ (c)


def detectors_alone(bundle, studies: Sequence, slice_batch: int = 32) -> int:
    """(c): every series of every preloaded study through its detector, batched as in the
    pipeline (:func:`detector.detect_series`). Returns the number of slices."""
    from lumbar_ray.models.detector import detect_series

    n = 0
    for study in studies:
        for series_type, series in study.series.items():
            model = bundle.detectors.get(series_type)
            if model is None:
                continue
            detect_series(model, series, conf=bundle.detector_conf, device=bundle.device, batch_size=slice_batch)
            n += series.n_slices
    return n


# ------------------------------------------------------------------------------------------ results


@dataclass
class Measurement:
    path: str  # "a" | "b" | "c"
    n: int  # studies asked for
    seconds: float
    n_scored: int
    n_failed: int = 0
    peak_rss_mb: float = float("nan")
    baseline_rss_mb: float = float("nan")
    group_peaks_mb: dict[str, float] = field(default_factory=dict)
    peak_processes: list = field(default_factory=list)  # [(process, RSS MB)] at the peak
    max_processes: int = 0
    memory_samples: int = 0
    gpu_peak_mb: float | None = None
    detector_calls: int | None = None
    slices: int | None = None
    scorer_calls: int | None = None
    crops: int | None = None
    max_detector_batch: int | None = None
    max_scorer_batch: int | None = None
    torch_threads: int | None = None
    load_avg_1m: float | None = None  # the machine's 1-minute load average at the end of the run
    # (a): seconds of the warm-up run on one study in the same Ray runtime (~ the per-run start-up)
    warmup_run_s: float | None = None
    repeats: int = 1  # rounds aggregated into this row
    seconds_min: float | None = None
    seconds_max: float | None = None

    @property
    def studies_per_s(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else float("nan")


def _load_avg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def _memory_fields(sampler: MemorySampler) -> dict[str, Any]:
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


def _ratio(x: float, y: float) -> float:
    return x / y if y and np.isfinite(x) and np.isfinite(y) else float("nan")


def _rate(results: list[Measurement], path: str, n: int) -> float:
    for m in results:
        if m.path == path and m.n == n:
            return m.studies_per_s
    return float("nan")


def _find(results: list[Measurement], path: str, n: int) -> Measurement | None:
    return next((m for m in results if m.path == path and m.n == n), None)


def marginal_rate(results: list[Measurement], path: str, n_small: int, n_big: int) -> float:
    """Studies/s between the two sizes: ``(scored(big) - scored(small)) / (t(big) - t(small))``
    (the per-run fixed cost cancels)."""
    small, big = _find(results, path, n_small), _find(results, path, n_big)
    if small is None or big is None or big.seconds <= small.seconds:
        return float("nan")
    return (big.n_scored - small.n_scored) / (big.seconds - small.seconds)


def aggregate(runs: list[Measurement]) -> list[Measurement]:
    """One row per (path, n): the round with the median time (the lower middle one for an even
    count), with the highest memory peak of all rounds and the time spread."""
    groups: dict[tuple[str, int], list[Measurement]] = {}
    for m in runs:
        groups.setdefault((m.path, m.n), []).append(m)
    out = []
    for (path, n), group in groups.items():
        ordered = sorted(group, key=lambda m: m.seconds)
        median = ordered[(len(ordered) - 1) // 2]
        peak = max(group, key=lambda m: m.peak_rss_mb if np.isfinite(m.peak_rss_mb) else -1.0)
        gpu = [m.gpu_peak_mb for m in group if m.gpu_peak_mb is not None]
        out.append(dataclasses.replace(
            median, repeats=len(group), seconds_min=ordered[0].seconds, seconds_max=ordered[-1].seconds,
            peak_rss_mb=peak.peak_rss_mb, group_peaks_mb=peak.group_peaks_mb, peak_processes=peak.peak_processes,
            max_processes=max(m.max_processes for m in group), gpu_peak_mb=max(gpu) if gpu else None,
            load_avg_1m=max((m.load_avg_1m for m in group if m.load_avg_1m is not None), default=None)))
    return sorted(out, key=lambda m: (PATHS.index(m.path), m.n))


@dataclass
class Verdict:
    name: str
    measured: str
    met: bool | None  # None: not measured
    why: str = ""


def verdicts(results: list[Measurement], n_small: int, n_big: int) -> list[Verdict]:
    """The issue's targets, judged at the larger size (fixed costs amortised as far as this run
    allows), end to end; the marginal rates are printed beside them, never used to pass."""
    out: list[Verdict] = []
    a, b, c = (_rate(results, p, n_big) for p in PATHS)
    a_marg, c_marg = marginal_rate(results, "a", n_small, n_big), marginal_rate(results, "c", n_small, n_big)
    ab, ac = _ratio(a, b), _ratio(a, c)
    batching = _ratio(c, b)  # what batching the detector alone buys over the paper loop
    if np.isfinite(ab):
        why = ""
        if ab < TARGET_A_OVER_B:
            if np.isfinite(batching) and batching < TARGET_A_OVER_B:
                why = (f"batching alone buys only c/b = {batching:.2f}x over the per-slice loop on this device, so a "
                       f"pipeline at the detector ceiling (a = c) stays under a/b = {TARGET_A_OVER_B:g}; only more "
                       f"hardware (more detector actors/GPUs than the loop uses) closes that gap")
            else:
                why = f"the detectors batched are {batching:.2f}x the paper loop, but the pipeline is far below them (see a/c)"
        out.append(Verdict(f"a/b >= {TARGET_A_OVER_B:g} at {n_big} studies", f"{ab:.3f}", ab >= TARGET_A_OVER_B, why))
    else:
        out.append(Verdict(f"a/b >= {TARGET_A_OVER_B:g}", "n/a", None, "not measured"))
    if np.isfinite(ac):
        why = ""
        if ac < TARGET_A_OVER_C:
            ma, mc = _find(results, "a", n_big), _find(results, "c", n_big)
            fixed = _fixed_cost(results, "a", n_big, a_marg)
            why = f"(a) took {ma.seconds:.0f} s where the detectors alone took {mc.seconds:.0f} s"
            if np.isfinite(fixed):
                why += (f"; (a) carries a fixed per-run cost of ~{fixed:.0f} s (actor start-up, torch import, model "
                        f"loading, Ray Data planning) that {n_big} studies do not amortise; past it, marginal a/c = "
                        f"{_ratio(a_marg, c_marg):.2f}")
            else:
                why += "; the per-run start-up (actors importing torch and loading models) is not amortised"
            if ma.warmup_run_s:
                why += f"; a run on one study takes {ma.warmup_run_s:.0f} s"
        out.append(Verdict(f"a/c >= {TARGET_A_OVER_C:g} at {n_big} studies", f"{ac:.3f}", ac >= TARGET_A_OVER_C, why))
    else:
        out.append(Verdict(f"a/c >= {TARGET_A_OVER_C:g}", "n/a", None, "not measured"))
    for path in ("a", "b"):
        small, big = _find(results, path, n_small), _find(results, path, n_big)
        name = f"memory flat in N, {PATH_NAMES[path]}"
        if small is None or big is None or not np.isfinite(small.peak_rss_mb) or not np.isfinite(big.peak_rss_mb):
            out.append(Verdict(name, "n/a", None, "not measured"))
            continue
        growth = big.peak_rss_mb / small.peak_rss_mb - 1.0
        met = growth <= FLAT_MEMORY_TOLERANCE
        out.append(Verdict(name, f"{small.peak_rss_mb:.0f} -> {big.peak_rss_mb:.0f} MB ({growth:+.0%})", met,
                           "" if met else f"peak grows by more than {FLAT_MEMORY_TOLERANCE:.0%} from {n_small} to "
                                          f"{n_big} studies"))
    return out


def _fixed_cost(results: list[Measurement], path: str, n: int, marginal: float) -> float:
    m = _find(results, path, n)
    if m is None or not np.isfinite(marginal) or marginal <= 0:
        return float("nan")
    return m.seconds - m.n_scored / marginal


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}"


def markdown_table(results: list[Measurement], n_small: int, n_big: int, caption: str = "") -> str:
    """The results as a markdown table (one row per path and size) plus the targets; ``caption``
    (machine, command) goes under it."""
    lines = ["| path | studies | seconds | studies/s | vs (b) | vs (c) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    gpu = any(m.gpu_peak_mb is not None for m in results)
    if gpu:
        lines[0] += " peak GPU (MB) |"
        lines[1] += "---:|"
    for path in PATHS:
        for n in sorted({n_small, n_big}):
            m = _find(results, path, n)
            if m is None:
                continue
            b, c = _rate(results, "b", n), _rate(results, "c", n)
            spread = f" ({m.seconds_min:.1f}..{m.seconds_max:.1f})" if m.repeats > 1 else ""
            row = (f"| {PATH_NAMES[path]} | {m.n_scored}{'' if not m.n_failed else f' (+{m.n_failed} failed)'} | "
                   f"{m.seconds:.1f}{spread} | {m.studies_per_s:.2f} | {_fmt(_ratio(m.studies_per_s, b))} | "
                   f"{_fmt(_ratio(m.studies_per_s, c))} | {_fmt(m.peak_rss_mb, 0)} |")
            if gpu:
                row += f" {_fmt(m.gpu_peak_mb, 0)} |"
            lines.append(row)
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    for v in verdicts(results, n_small, n_big):
        lines.append(f"| {v.name} | {v.measured} | {'n/a' if v.met is None else ('yes' if v.met else '**no**')} |")
    if caption:
        lines += ["", caption]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ phases
# Each phase runs in a fresh (spawned) process: its own memory, its own torch threads.


def _phase_setup(device: str | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


def phase_build_registry(workdir: str, registry: str, imgsz: int, seed: int, num_cpus: int | None,
                         train_studies: int, epochs: int) -> str:
    """A small, quickly trained registry (accuracy irrelevant, speed realistic): `lumbar-ray synth`
    of small training studies + `lumbar-ray train --folds 2 --epochs E --no-final-fit --champion`."""
    _phase_setup()
    from lumbar_ray.synth import writer as synth
    from lumbar_ray.config import DetectorConfig, ResourceConfig, ScorerConfig, TrainConfig
    from lumbar_ray.models.registry import ModelRegistry
    from lumbar_ray.runtime import ray_session
    from lumbar_ray.training.cv import run_training

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
    import torch

    if threads:
        torch.set_num_threads(int(threads))

    from lumbar_ray.scoring import study as scoring
    from lumbar_ray.dicom.read import load_descriptions, read_study

    bundle = scoring.ModelBundle.from_registry(models, device=device)
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
        m = Measurement(path, len(ids), seconds, n_scored, failed, **_memory_fields(mem),
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
    import ray

    from lumbar_ray.scoring.pipeline import ScoreConfig, run_scoring
    from lumbar_ray.runtime import ray_session

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
            _wait_for_actor_exit()
            if tag == "warmup":
                warmup_s = seconds
                continue
            m = Measurement("a", len(ids), seconds, summary.n_scored, summary.n_failed, **_memory_fields(mem),
                            warmup_run_s=warmup_s)
            out.append(dataclasses.asdict(m))
    return out


def phase_nodes_entry(*args, **kwargs) -> dict:
    """:func:`lumbar_ray.bench.nodes.phase_nodes`, reachable by :func:`_fresh_process`."""
    from lumbar_ray.bench.nodes import phase_nodes

    return phase_nodes(*args, **kwargs)


def _wait_for_actor_exit(timeout_s: float = 30.0) -> None:
    """Ray Data ends a run's actors asynchronously: wait until their processes are gone, so one
    run's actors never count in the next run's memory."""
    psutil = _psutil()
    if psutil is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        titles = [MemorySampler._title(p) for p in psutil.Process().children(recursive=True)]
        if not any(t.startswith("ray::MapWorker") for t in titles):
            return
        time.sleep(0.25)


def _fresh_process(fn_name: str, *args, isolate: bool = True, **kwargs):
    """Run ``lumbar_ray.bench.scoring.<fn_name>(*args, **kwargs)`` in a fresh spawned process."""
    import importlib

    module = importlib.import_module("lumbar_ray.bench.scoring")  # not __main__: picklable by name
    fn = getattr(module, fn_name)
    if not isolate:
        return fn(*args, **kwargs)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


# ------------------------------------------------------------------------------------------ CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from lumbar_ray.scoring.pipeline import add_resource_args

    p = argparse.ArgumentParser(
        prog="python -m lumbar_ray.bench.scoring", add_help=add_help,
        description="Benchmark: (a) the Ray pipeline vs (b) the paper-style per-slice loop vs (c) the detectors "
                    "alone, for N and scale x N studies (throughput and peak memory).")
    p.add_argument("--n", type=int, default=4, help="studies of the small run")
    p.add_argument("--scale", type=int, default=10, help="the large run has scale x N studies")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="synthetic study size: small (128 px) or full (sagittal 320-448 px, axial 256-384 px)")
    p.add_argument("--models", default=None,
                   help="REGISTRY[@version] to benchmark (default: build a small one under --workdir, ~3 min on 2 CPUs)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="detector input size of the registry built when --models is not given "
                        "(default: 128 for --size small, the training default for --size full)")
    p.add_argument("--data", default=None,
                   help="data root (Kaggle layout) holding at least scale x N studies of --split "
                        "(default: synthesize them under --workdir)")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--workdir", default="work/bench",
                   help="where synthetic data and the built registry are kept for reuse (scores go to temp dirs)")
    p.add_argument("--synth-workers", type=int, default=None, help="processes for synthesis (default: CPUs)")
    p.add_argument("--paths", default="a,b,c", help="which of a,b,c to run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of (b) and (c) (default: the CPUs the pipeline gives its detector actors, "
                        "detector-pool x detector-cpus, at most the machine's CPUs)")
    p.add_argument("--device", default=None, help="torch device of (b) and (c) (default: cuda with --num-gpus > 0, else cpu)")
    g = p.add_argument_group("Ray resources of (a) (default: a local runtime on this machine)")
    g.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a new local runtime)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local runtime (default: all)")
    g.add_argument("--num-gpus", type=int, default=0, help="GPUs of the local runtime; > 0 puts the actors on GPUs")
    add_resource_args(g, defaults={"detector_pool": None, "detector_gpus": None, "scorer_gpus": None},
                      helps={"detector_pool": "detector actors (default: max(1, --num-gpus))",
                             "detector_gpus": "GPU per detector actor (default: 0.75 with GPUs, else 0)",
                             "scorer_gpus": "GPU per scorer actor (default: 0.25 with GPUs, else 0)",
                             "slice_batch": "slices per detector forward, (a) and (c)"})
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of (b), (c), (a), interleaved; the table shows each path's median-time round and "
                        "the highest memory peak of all rounds")
    p.add_argument("--interval", type=float, default=0.2, help="memory sampling interval, seconds")
    p.add_argument("--json", default=None, help="also write the measurements as JSON here")
    p.add_argument("--markdown", default=None, help="also write the markdown table here")
    p.add_argument("--no-isolate", action="store_true", help="run every phase in this process (debugging)")
    return p


def _score_kwargs(args: argparse.Namespace, root: str, models: str) -> dict:
    from lumbar_ray.scoring.pipeline import resource_kwargs

    gpus = args.num_gpus or 0
    kw = resource_kwargs(args)
    auto = {"detector_pool": max(1, gpus), "detector_gpus": 0.75 if gpus else 0.0, "scorer_gpus": 0.25 if gpus else 0.0}
    kw.update({name: value for name, value in auto.items() if kw[name] is None})
    return dict(input=root, models=models, split=args.split, **kw)


def _prepare_data(args: argparse.Namespace, n_total: int, echo) -> tuple[str, list[str]]:
    from lumbar_ray.dicom.read import list_studies

    if args.data:
        root = args.data
    else:
        from lumbar_ray.synth import writer as synth

        root = str(Path(args.workdir).resolve() / f"{args.split}-{args.size}-seed{args.seed}-n{n_total}")
        stamp = Path(root) / ".bench-complete"
        if not stamp.exists():
            shutil.rmtree(root, ignore_errors=True)
            workers = args.synth_workers or os.cpu_count() or 1
            t0 = time.perf_counter()
            synth.synthesize(root, n_studies=n_total, seed=args.seed, split=args.split, size=args.size, workers=workers)
            stamp.write_text("ok\n")
            echo(f"[bench] synthesized {n_total} {args.size} {args.split} studies in {time.perf_counter() - t0:.0f} s: {root}")
        else:
            echo(f"[bench] reusing {n_total} synthetic {args.size} studies: {root}")
    ids = [str(s) for s in list_studies(root, split=args.split)]
    if len(ids) < n_total:
        raise SystemExit(f"{root} holds {len(ids)} {args.split} studies; the benchmark needs {n_total}")
    return root, ids[:n_total]


def _prepare_models(args: argparse.Namespace, echo) -> str:
    from lumbar_ray.config import DetectorConfig
    from lumbar_ray.models.registry import ModelRegistry, parse_model_spec

    if args.models:
        root, version = parse_model_spec(args.models)
        return f"{root}@{ModelRegistry(root).resolve(version)}"
    imgsz = args.imgsz or (128 if args.size == "small" else DetectorConfig.imgsz)
    registry = str(Path(args.workdir).resolve() / f"models-imgsz{imgsz}-seed{args.seed}")
    reg = ModelRegistry(registry)
    try:
        champion = reg.champion()
    except Exception:
        champion = None
    if champion:
        echo(f"[bench] reusing registry {registry}@{champion['version']}")
        return f"{registry}@{champion['version']}"
    echo(f"[bench] building a small registry (imgsz {imgsz}, 1 epoch, 2 folds: speed is realistic, accuracy is "
         f"not) in {registry}; this takes a few minutes on 2 CPUs")
    t0 = time.perf_counter()
    spec = _fresh_process("phase_build_registry", str(Path(args.workdir).resolve()), registry, imgsz, args.seed,
                          args.num_cpus, 8, 1, isolate=not args.no_isolate)
    echo(f"[bench] registry {spec} built in {time.perf_counter() - t0:.0f} s")
    return spec


def _warm_page_cache(root: str, split: str, ids: Sequence[str]) -> int:
    total = 0
    base = Path(root) / f"{split}_images"
    if not base.is_dir():  # object storage: nothing to warm
        return 0
    for s in ids:
        for f in (base / s).rglob("*"):
            if f.is_file():
                total += len(f.read_bytes())
    return total


def environment() -> dict[str, Any]:
    import platform

    import ray
    import torch

    psutil = _psutil()
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "psutil": getattr(psutil, "__version__", None), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "cpu_model": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - set(PATHS):
        raise SystemExit(f"--paths: choose from {','.join(PATHS)}")
    if args.n < 1 or args.scale < 1 or args.repeat < 1:
        raise SystemExit("--n, --scale and --repeat must be >= 1")
    n_small, n_big = args.n, args.n * args.scale
    device = args.device or ("cuda" if args.num_gpus else "cpu")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    command = "python -m lumbar_ray.bench.scoring " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    threads = args.threads
    if threads is None:
        kw_probe = _score_kwargs(args, "", "")
        threads = max(1, min(os.cpu_count() or 1, round(kw_probe["detector_pool"] * kw_probe["detector_cpus"])))
    root, ids = _prepare_data(args, n_big, echo)
    models = _prepare_models(args, echo)
    id_sets = [ids[:n_small], ids[:n_big]] if n_big > n_small else [ids[:n_small]]
    warmed = _warm_page_cache(root, args.split, ids)
    echo(f"[bench] page cache warmed with {warmed / 2**20:.0f} MB of DICOM; models {models}")

    runs: list[Measurement] = []
    scratch = tempfile.mkdtemp(prefix="lumbar-ray-bench-")
    kw = _score_kwargs(args, root, models)
    try:
        # Rounds interleave the paths, so a change in the machine's load hits all of them alike.
        for rnd in range(args.repeat):
            tag = f" (round {rnd + 1}/{args.repeat})" if args.repeat > 1 else ""
            for path in ("b", "c"):
                if path not in paths:
                    continue
                echo(f"[bench] {PATH_NAMES[path]}{tag}: {', '.join(str(len(s)) for s in id_sets)} studies on "
                     f"{device}, {threads} torch thread(s) ...")
                raw = _fresh_process("phase_in_process", path, models, root, args.split, id_sets, device,
                                     args.slice_batch, args.interval, scratch, threads, isolate=not args.no_isolate)
                for m in (Measurement(**r) for r in raw):
                    runs.append(m)
                    echo(f"[bench]   {m.n_scored} studies in {m.seconds:.1f} s = {m.studies_per_s:.2f} studies/s, "
                         f"peak RSS {m.peak_rss_mb:.0f} MB ({m.slices} slices in {m.detector_calls} detector calls, "
                         f"{m.crops} crops in {m.scorer_calls} scorer calls; load {_fmt(m.load_avg_1m, 1)})")
            if "a" in paths:
                echo(f"[bench] {PATH_NAMES['a']}{tag}: {', '.join(str(len(s)) for s in id_sets)} studies; "
                     f"{json.dumps({k: v for k, v in kw.items() if k not in ('input', 'models', 'split')})} ...")
                raw = _fresh_process("phase_pipeline", kw, id_sets, args.address, args.num_cpus,
                                     args.num_gpus or None, args.interval, scratch, isolate=not args.no_isolate)
                for m in (Measurement(**r) for r in raw):
                    runs.append(m)
                    echo(f"[bench]   {m.n_scored} studies in {m.seconds:.1f} s = {m.studies_per_s:.2f} studies/s, "
                         f"peak RSS {m.peak_rss_mb:.0f} MB over up to {m.max_processes} processes "
                         f"({', '.join(f'{k} {v:.0f}' for k, v in sorted(m.group_peaks_mb.items()))} MB; "
                         f"load {_fmt(m.load_avg_1m, 1)})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = aggregate(runs)

    env = environment()
    caption = table_caption(results, args, env, command, device, threads)
    report = render_report(results, n_small, n_big, args, env, command, device, models, caption)
    echo(report)
    table = markdown_table(results, n_small, n_big, caption)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command, "environment": env, "models": models, "data": root,
            "measurements": [dataclasses.asdict(m) | {"studies_per_s": m.studies_per_s} for m in results],
            "runs": [dataclasses.asdict(m) | {"studies_per_s": m.studies_per_s} for m in runs],
            "verdicts": [dataclasses.asdict(v) for v in verdicts(results, n_small, n_big)],
        }, indent=2, default=str))
    return 0


def table_caption(results: list[Measurement], args: argparse.Namespace, env: dict, command: str, device: str,
                  threads: int) -> str:
    """One line under the table: what was measured, where, and the exact command."""
    b = next((m for m in results if m.path == "b" and m.slices), None)
    shape = f", {b.slices / max(b.n_scored, 1):.0f} slices per study" if b else ""
    kw = _score_kwargs(args, "", "")
    hw = f"{env['cpus']} CPUs ({env['cpu_model']})" + (f", {env['gpu']}" if env.get("gpu") else "")
    return (f"_{args.size} synthetic studies{shape}; {hw}; torch {env['torch']}, ray {env['ray']}; (b)/(c) on "
            f"{device} with {threads} torch thread(s); (a) {kw['detector_pool']} detector actor(s) x "
            f"{kw['detector_cpus']:g} CPU / {kw['detector_gpus']:g} GPU, {kw['scorer_pool']} scorer actor(s) x "
            f"{kw['scorer_cpus']:g} CPU / {kw['scorer_gpus']:g} GPU, read tasks of {kw['read_cpus']:g} CPU x "
            f"{kw['read_batch_studies']} studies, slice batch {kw['slice_batch']}"
            f"{f'; median of {args.repeat} interleaved rounds' if args.repeat > 1 else ''}. "
            f"Command: `{command}`_")


def render_report(results: list[Measurement], n_small: int, n_big: int, args: argparse.Namespace, env: dict,
                  command: str, device: str, models: str, caption: str = "") -> str:
    lines = ["", "=" * 100, "lumbar-ray benchmark", "=" * 100]
    lines.append(f"machine: {env['cpus']} CPUs ({env['cpu_model']}){', GPU ' + env['gpu'] if env.get('gpu') else ''}; "
                 f"python {env['python']}, torch {env['torch']}, ray {env['ray']}, psutil {env['psutil']}")
    lines.append(f"studies: synthetic '{args.size}' size (or --data), N = {n_small} and {n_big}; models {models}")
    b = _find(results, "b", n_big) or _find(results, "b", n_small)
    if b is not None and b.detector_calls:
        per = b.n_scored or 1
        lines.append(f"(b) check: {b.slices} slices in {b.detector_calls} detector calls (max batch "
                     f"{b.max_detector_batch}), {b.crops} crops in {b.scorer_calls} scorer calls (max batch "
                     f"{b.max_scorer_batch}); {b.slices / per:.1f} slices and {b.crops / per:.1f} crops per study; "
                     f"torch threads {b.torch_threads} on {device}")
    lines.append("included in the timings: (a) run_scoring wall time incl. actor start-up + model loading per run "
                 "(ray.init and one warm-up run excluded); (b) reading + per-slice detection + per-crop grading + "
                 "rows + one Parquet (model loading and a warm-up study excluded); (c) detect_series on preloaded "
                 "volumes (normalise, letterbox, forward, candidate boxes). Memory: peak summed RSS of the phase's process tree "
                 "(fresh process per path; (a) includes Ray's own processes and actors; shared library pages count "
                 "once per process). Ray gives each actor as many torch threads as CPUs it requests (at least 1).")
    a_big = _find(results, "a", n_big)
    if a_big is not None and a_big.peak_processes:
        counts: dict[str, list[float]] = {}
        for title, mb in a_big.peak_processes:
            counts.setdefault(title, []).append(mb)
        top = sorted(counts.items(), key=lambda kv: -sum(kv[1]))[:6]
        lines.append(f"(a) at its memory peak ({n_big} studies, {len(a_big.peak_processes)} processes): " + ", ".join(
            f"{title}{f' x{len(v)}' if len(v) > 1 else ''} {sum(v):.0f} MB" for title, v in top))
    loads = [m.load_avg_1m for m in results if m.load_avg_1m is not None]
    if loads:
        busy = max(loads) > 1.5 * (env["cpus"] or 1)
        lines.append(f"machine load (1-min average at the end of each run): {min(loads):.1f} .. {max(loads):.1f} on "
                     f"{env['cpus']} CPUs" + (" -- WARNING: other work competed for the CPUs; rerun on a quiet "
                                              "machine before quoting these numbers" if busy else ""))
    for path in PATHS:
        rate = marginal_rate(results, path, n_small, n_big)
        if np.isfinite(rate):
            fixed = _fixed_cost(results, path, n_big, rate)
            lines.append(f"marginal rate {PATH_NAMES[path]}: {rate:.2f} studies/s (fixed cost per run ~{fixed:.1f} s)")
    warm = [m.warmup_run_s for m in results if m.path == "a" and m.warmup_run_s]
    if warm:
        lines.append(f"(a) per-run start-up: a run on ONE study took {warm[0]:.1f} s (actor start-up, torch import, "
                     f"model loading, Ray Data planning; the untimed warm-up run of the round)")
    a_m, b_m, c_m = (marginal_rate(results, p, n_small, n_big) for p in PATHS)
    if np.isfinite(a_m):
        lines.append(f"marginal a/b = {_fmt(_ratio(a_m, b_m))}, marginal a/c = {_fmt(_ratio(a_m, c_m))} "
                     f"(informative only: the targets below are judged end to end)")
    lines.append("")
    lines.append(markdown_table(results, n_small, n_big, caption))
    lines.append("")
    for v in verdicts(results, n_small, n_big):
        state = "not measured" if v.met is None else ("MET" if v.met else "MISSED")
        lines.append(f"{state:>12}: {v.name}: {v.measured}" + (f" -- {v.why}" if v.why else ""))
    lines.append("")
    lines.append(f"command: {command}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
