"""`make bench-train`: one epoch of every model (the three detectors and DeepScoreNet), cross-
validated on N and then scale x N small synthetic studies, each size in a fresh process with its
own Ray runtime. Prints, for each size, the peak resident memory of the driver and of all Ray
processes summed, the largest single processes (each at its own peak: the driver, raylet, a
training worker, a cutting task), examples/s of the cutting and of each model's trials, and last the line
``memory N→10N: +X%`` (the total's growth; the streamed examples aim at <= +20 %).

What runs is what ``lumbar-ray train`` runs up to its trials (folds, examples cut into shards,
one Tune trial per (model, fold)), without the metrics and the publishing after them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lumbar_ray.bench.memory import MemorySampler, psutil
from lumbar_ray.bench.phases import fresh_process
from lumbar_ray.bench.prepare import prepare_data
from lumbar_ray.config import SCORER, DetectorConfig, ResourceConfig, ScorerConfig, TrainConfig, series_type_of_job
from lumbar_ray.runtime import ray_session

# the memory target of issue 16: the total peak grows by at most this much from N to 10 N studies
PROCESSES_SHOWN = 6  # the largest processes printed per size
MEMORY_TARGET = 0.20


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lumbar_ray.bench.training", add_help=add_help,
        description="Benchmark: one epoch of every model on N and scale x N small synthetic studies "
                    "(peak memory of the driver and of the Ray processes, examples/s).")
    p.add_argument("--n", type=int, default=20, help="studies of the small run")
    p.add_argument("--scale", type=int, default=10, help="the large run has scale x N studies")
    p.add_argument("--folds", type=int, default=2, help="CV folds (one trial per model and fold; no final fit)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every model")
    p.add_argument("--imgsz", type=int, default=64, help="the detectors' input size")
    p.add_argument("--collapse-retries", type=int, default=0,
                   help="retries of a detector fold that finds nothing (default 0: after one epoch every fold "
                        "may, and a retry would train the epoch twice)")
    p.add_argument("--val-cache-mb", type=int, default=None,
                   help="MiB of validation studies a detector trial keeps between rounds (default: the product's)")
    p.add_argument("--size", choices=("small", "full"), default="small", help="synthetic study size")
    p.add_argument("--data", default=None, help="a labelled Kaggle-layout root instead of synthetic studies")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--workdir", default="work/bench", help="synthetic studies (kept) and each run's storage")
    p.add_argument("--synth-workers", type=int, default=None, help="processes for synthesis (default: CPUs)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of each run's local Ray runtime (default: all)")
    p.add_argument("--interval", type=float, default=0.2, help="memory sampling interval, seconds")
    p.add_argument("--json", default=None, help="also write the measurements as JSON here")
    p.add_argument("--no-isolate", action="store_true", help="run both sizes in this process (debugging)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings the benchmark cannot run, with the reason."""
    if args.n < args.folds:
        raise SystemExit(f"--n {args.n}: every one of the {args.folds} folds needs a study")
    if args.scale < 1 or args.folds < 2 or args.epochs < 1 or args.imgsz < 32:
        raise SystemExit("--scale >= 1, --folds >= 2, --epochs >= 1 and --imgsz >= 32, please")


@dataclass
class TrialRate:
    job: str
    fold: int
    examples: int  # training examples of the trial (before the scorer's oversampling), per epoch
    seconds: float  # the trial's wall time: start-up, its epochs and its validation

    @property
    def per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class SizeRun:
    """One size's measurements."""

    n_studies: int
    cut_s: float
    cut_examples: int  # crops + detector slices written
    train_s: float
    trials: list[TrialRate]
    driver_peak_mb: float
    ray_peak_mb: float  # all Ray processes (GCS, raylet, workers) summed, at their own peak
    total_peak_mb: float  # driver + Ray processes
    problems: int
    jobs: list[str] = field(default_factory=list)
    # per process title (driver, raylet, ray::<task or actor>): the largest RSS one such process reached
    process_peaks_mb: dict[str, float] = field(default_factory=dict)

    @property
    def trained_examples(self) -> int:
        return sum(t.examples for t in self.trials)


class SplitSampler(MemorySampler):
    """:class:`MemorySampler` that also keeps the peak of everything but this (driver) process."""

    def __init__(self, interval_s: float):
        super().__init__(interval_s)
        self.others_peak_bytes = 0

    def sample(self) -> int:
        total = super().sample()
        if psutil is not None:
            self.others_peak_bytes = max(self.others_peak_bytes, total - psutil.Process().memory_info().rss)
        return total


def trial_examples(chunks, job: str, fold: int) -> int:
    """Training examples of ``job``'s trial on ``fold``: its model's examples in the other folds'
    chunks (:class:`lumbar_ray.training.shards.ChunkEntry`)."""
    kept = [c for c in chunks if c.fold is not None and c.fold != fold]
    if job == SCORER:
        return sum(c.n_crops for c in kept)
    return sum(c.n_slices.get(series_type_of_job(job), 0) for c in kept)


def memory_growth(small: SizeRun, big: SizeRun) -> float:
    """The total peak's relative growth from the small run to the big one."""
    return big.total_peak_mb / small.total_peak_mb - 1.0


def train_config(data: str, workdir: str, n_studies: int, excluded: list[int], args: argparse.Namespace) -> TrainConfig:
    run = f"bench-train-n{n_studies}"
    return TrainConfig(
        data=data, registry=str(Path(workdir) / "registry"), folds=args.folds, seed=args.seed, final_fit=False,
        storage_path=str(Path(workdir) / "runs"), run_name=run, exclude_studies=tuple(excluded),
        scorer=ScorerConfig(epochs=args.epochs),
        detector=DetectorConfig(epochs=args.epochs, imgsz=args.imgsz, collapse_retries=args.collapse_retries,
                                **({} if args.val_cache_mb is None else {"val_cache_mb": args.val_cache_mb})),
        resources=ResourceConfig())


def phase_train(cfg_dict: dict, n_studies: int, num_cpus: int | None, interval_s: float) -> dict:
    """One size, in this (fresh) process: a Ray runtime, the folds, the examples cut into shards,
    one trial per (model, fold); the memory of this process and its Ray processes sampled all
    along. The shards and the trials' storage are removed after."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    # heavy: torch, ray; only this phase's process trains
    from lumbar_ray.training.cv import labelled_studies, run_paths
    from lumbar_ray.training.examples import cut_examples
    from lumbar_ray.training.shards import examples_dir, remove_examples
    from lumbar_ray.training.trials import run_trials

    cfg = TrainConfig.from_dict(cfg_dict)
    paths = run_paths(cfg)
    with ray_session(num_cpus=num_cpus):
        with SplitSampler(interval_s) as mem:
            data = labelled_studies(cfg, echo=lambda m: None)
            t0 = time.perf_counter()
            examples = cut_examples(cfg, data.points, data.folds, examples_dir(paths.storage, paths.version),
                                    with_slices=True)
            t1 = time.perf_counter()
            trials = run_trials(cfg, data.folds, examples.root, paths.version, paths.storage, paths.artifacts)
            t2 = time.perf_counter()
        remove_examples(examples.root)
    rates = [TrialRate(t.job, t.fold, trial_examples(examples.chunks, t.job, t.fold), t.finished - t.started)
             for t in sorted(trials, key=lambda t: (t.job, t.fold))]
    run = SizeRun(n_studies, t1 - t0, examples.n_crops + sum(examples.n_slices.values()), t2 - t1, rates,
                  mem.group_peaks.get("driver", 0) / 2**20, mem.others_peak_bytes / 2**20, mem.peak_mb,
                  len(examples.problems), cfg.jobs(), {t: b / 2**20 for t, b in mem.title_peaks.items()})
    return asdict(run)


def size_run(raw: dict) -> SizeRun:
    return SizeRun(**{**raw, "trials": [TrialRate(**t) for t in raw["trials"]]})


def size_lines(run: SizeRun) -> list[str]:
    """The printed lines of one size."""
    lines = [f"N={run.n_studies} studies: driver peak {run.driver_peak_mb:.0f} MB, Ray processes peak "
             f"{run.ray_peak_mb:.0f} MB (summed), total peak {run.total_peak_mb:.0f} MB",
             f"  cut {run.cut_examples} examples in {run.cut_s:.1f} s ({run.cut_examples / max(run.cut_s, 1e-9):.1f} "
             f"examples/s){f'; {run.problems} problems' if run.problems else ''}; trials "
             f"{run.train_s:.1f} s ({run.trained_examples / max(run.train_s, 1e-9):.1f} examples/s over all trials)"]
    if run.process_peaks_mb:
        largest = sorted(run.process_peaks_mb.items(), key=lambda kv: -kv[1])[:PROCESSES_SHOWN]
        lines.append("  largest single processes, each at its own peak: "
                     + ", ".join(f"{title} {mb:.0f} MB" for title, mb in largest))
    for job in run.jobs:
        own = [t for t in run.trials if t.job == job]
        examples, seconds = sum(t.examples for t in own), sum(t.seconds for t in own)
        lines.append(f"  {job}: {examples} examples in {len(own)} trials, "
                     f"{examples / seconds if seconds > 0 else float('nan'):.1f} examples/s per trial "
                     f"(start-up and validation included)")
    return lines


def largest_worker(run: SizeRun) -> tuple[str, float] | None:
    """The Ray worker process (task or actor) with the largest own peak."""
    workers = [(t, mb) for t, mb in run.process_peaks_mb.items() if t.startswith("ray::")]
    return max(workers, key=lambda kv: kv[1]) if workers else None


def growth_line(small: SizeRun, big: SizeRun) -> str:
    growth = memory_growth(small, big)
    verdict = "within" if growth <= MEMORY_TARGET else "over"
    small_worker, big_worker = largest_worker(small), largest_worker(big)
    worker = (f", largest Ray process {small_worker[1]:.0f} → {big_worker[1]:.0f} MB ({big_worker[0]})"
              if small_worker and big_worker else "")
    return (f"memory {small.n_studies}→{big.n_studies}: {growth * 100:+.1f}% "
            f"({verdict} the {MEMORY_TARGET * 100:.0f} % target; total peak {small.total_peak_mb:.0f} → "
            f"{big.total_peak_mb:.0f} MB, driver {small.driver_peak_mb:.0f} → {big.driver_peak_mb:.0f} MB{worker})")


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    check_args(args)
    n_small, n_big = args.n, args.n * args.scale
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.split = "train"  # prepare_data's split: labelled studies
    root, ids = prepare_data(args, n_big, echo)
    runs = []
    for n in sorted({n_small, n_big}):
        # one root for both sizes: the small run leaves the other studies out; each size's
        # checkpoints and artefacts in a folder of its own, removed after
        storage = workdir / f"train-n{n}"
        shutil.rmtree(storage, ignore_errors=True)
        cfg = train_config(root, str(storage), n, [int(s) for s in ids[n:]], args)
        echo(f"[bench] one epoch of {', '.join(cfg.jobs())} on {n} studies ({args.folds} folds)...")
        raw = fresh_process(phase_train, cfg.to_dict(), n, args.num_cpus, args.interval, isolate=not args.no_isolate)
        shutil.rmtree(storage, ignore_errors=True)
        runs.append(size_run(raw))
        for line in size_lines(runs[-1]):
            echo(line)
    # again, together: Ray's worker logs interleave with the lines printed after each size
    echo("[bench] summary")
    for run in runs:
        for line in size_lines(run):
            echo(line)
    if len(runs) == 2:
        echo(growth_line(runs[0], runs[1]))
    if args.json:
        command = "python -m lumbar_ray.bench.training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "data": root,
                                               "runs": [asdict(r) for r in runs]}, indent=2))
    return 0


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    # run as the imported module, not as __main__: the spawned phase process imports phase_train by
    # its module's name (bench.phases.fresh_process)
    sys.exit(importlib.import_module("lumbar_ray.bench.training").run())
