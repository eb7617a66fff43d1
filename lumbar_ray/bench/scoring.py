"""`make bench` / ``python -m lumbar_ray.bench.scoring``: a benchmark, not a test.

Same studies, same models, one run, three ways:

(a) **pipeline** — the Ray Data pipeline (:func:`lumbar_ray.scoring.pipeline.run_scoring`) into a
    temporary output; resources from the flags (default: a local Ray runtime on this machine).
(b) **paper loop** — the source paper's predictor style: one process, one detector forward call
    per slice (batch of 1) and one DeepScoreNet call per crop (batch of 1). It reuses the
    package's functions (:func:`scoring.detect_study` with ``batch_size=1``,
    :func:`deepscorenet.predict_proba` per crop, :func:`scoring.study_rows`): no copy of them
    (:mod:`lumbar_ray.bench.paths`).
(c) **detectors alone** — :func:`lumbar_ray.models.detector_inference.detect_series` over the same slices,
    batched as in the pipeline, volumes preloaded (no reading), no Ray: the ceiling the pipeline can approach.

Each is run for N and ``scale``×N studies (the N studies are the first N of the larger set), in
a fresh process of its own (:mod:`lumbar_ray.bench.phases`), so that one path's memory never
shows up in another's. Peak memory is the RSS of that process and all its descendants (for (a):
the driver, Ray's own processes and its worker/actor processes — a local runtime started by the
benchmark is a child of the driver), sampled with psutil in a background thread
(:mod:`lumbar_ray.bench.memory`). With ``--address`` (an existing cluster) the workers are not
this process's descendants: the memory column then covers the driver side only.

(b) and (c) run with ``--threads`` torch threads, by default as many as the CPUs the pipeline
gives its detector actors (Ray sets each actor's OMP_NUM_THREADS to its CPUs): the same compute
for the same work. On a busy machine more threads than free cores make OpenMP 10-100x slower,
so a default of "all cores" would flatter the pipeline. ``--repeat R`` interleaves R rounds of
(b), (c), (a) and reports each path's median-time round (:mod:`lumbar_ray.bench.results`).

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
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from lumbar_ray.bench.phases import fresh_process, phase_in_process, phase_pipeline
from lumbar_ray.bench.prepare import environment, prepare_data, prepare_models, warm_page_cache
from lumbar_ray.bench.results import (
    PATH_NAMES, PATHS, Measurement, aggregate, format_number, markdown_table, render_report, verdicts,
)
from lumbar_ray.scoring.args import add_resource_args, resource_kwargs


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
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


def score_kwargs(args: argparse.Namespace, root: str, models: str) -> dict:
    """The pipeline's ScoreConfig arguments for these flags; actor GPUs default from --num-gpus."""
    gpus = args.num_gpus or 0
    kw = resource_kwargs(args)
    auto = {"detector_pool": max(1, gpus), "detector_gpus": 0.75 if gpus else 0.0, "scorer_gpus": 0.25 if gpus else 0.0}
    kw.update({name: value for name, value in auto.items() if kw[name] is None})
    return dict(input=root, models=models, split=args.split, **kw)


def table_caption(results: list[Measurement], args: argparse.Namespace, env: dict, command: str, device: str,
                  threads: int) -> str:
    """One line under the table: what was measured, where, and the exact command."""
    b = next((m for m in results if m.path == "b" and m.slices), None)
    shape = f", {b.slices / max(b.n_scored, 1):.0f} slices per study" if b else ""
    kw = score_kwargs(args, "", "")
    hw = f"{env['cpus']} CPUs ({env['cpu_model']})" + (f", {env['gpu']}" if env.get("gpu") else "")
    return (f"_{args.size} synthetic studies{shape}; {hw}; torch {env['torch']}, ray {env['ray']}; (b)/(c) on "
            f"{device} with {threads} torch thread(s); (a) {kw['detector_pool']} detector actor(s) x "
            f"{kw['detector_cpus']:g} CPU / {kw['detector_gpus']:g} GPU, {kw['scorer_pool']} scorer actor(s) x "
            f"{kw['scorer_cpus']:g} CPU / {kw['scorer_gpus']:g} GPU, read tasks of {kw['read_cpus']:g} CPU x "
            f"{kw['read_batch_studies']} studies, slice batch {kw['slice_batch']}"
            f"{f'; median of {args.repeat} interleaved rounds' if args.repeat > 1 else ''}. "
            f"Command: `{command}`_")


def default_threads(args: argparse.Namespace) -> int:
    """Torch threads of (b) and (c): the CPUs the pipeline gives its detector actors, at most the
    machine's CPUs (the same compute for the same work)."""
    kw = score_kwargs(args, "", "")
    return max(1, min(os.cpu_count() or 1, round(kw["detector_pool"] * kw["detector_cpus"])))


def chosen_paths(args: argparse.Namespace) -> list[str]:
    """``--paths`` as a list, the flags checked."""
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - set(PATHS):
        raise SystemExit(f"--paths: choose from {','.join(PATHS)}")
    if args.n < 1 or args.scale < 1 or args.repeat < 1:
        raise SystemExit("--n, --scale and --repeat must be >= 1")
    return paths


def measure_rounds(args: argparse.Namespace, paths: list[str], models: str, root: str, id_sets: list[list[str]],
                   device: str, threads: int, echo: Callable[[str], None]) -> list[Measurement]:
    """Every round of the chosen paths, each phase in a fresh process; one Measurement per path,
    size and round."""
    runs: list[Measurement] = []
    scratch = tempfile.mkdtemp(prefix="lumbar-ray-bench-")
    kw = score_kwargs(args, root, models)
    sizes = ", ".join(str(len(s)) for s in id_sets)
    try:
        # Rounds interleave the paths, so a change in the machine's load hits all of them alike.
        for rnd in range(args.repeat):
            tag = f" (round {rnd + 1}/{args.repeat})" if args.repeat > 1 else ""
            for path in ("b", "c"):
                if path not in paths:
                    continue
                echo(f"[bench] {PATH_NAMES[path]}{tag}: {sizes} studies on {device}, {threads} torch thread(s) ...")
                raw = fresh_process(phase_in_process, path, models, root, args.split, id_sets, device,
                                    args.slice_batch, args.interval, scratch, threads, isolate=not args.no_isolate)
                for m in (Measurement(**r) for r in raw):
                    runs.append(m)
                    echo(f"[bench]   {m.n_scored} studies in {m.seconds:.1f} s = {m.studies_per_s:.2f} studies/s, "
                         f"peak RSS {m.peak_rss_mb:.0f} MB ({m.slices} slices in {m.detector_calls} detector calls, "
                         f"{m.crops} crops in {m.scorer_calls} scorer calls; load {format_number(m.load_avg_1m, 1)})")
            if "a" in paths:
                echo(f"[bench] {PATH_NAMES['a']}{tag}: {sizes} studies; "
                     f"{json.dumps({k: v for k, v in kw.items() if k not in ('input', 'models', 'split')})} ...")
                raw = fresh_process(phase_pipeline, kw, id_sets, args.address, args.num_cpus,
                                    args.num_gpus or None, args.interval, scratch, isolate=not args.no_isolate)
                for m in (Measurement(**r) for r in raw):
                    runs.append(m)
                    echo(f"[bench]   {m.n_scored} studies in {m.seconds:.1f} s = {m.studies_per_s:.2f} studies/s, "
                         f"peak RSS {m.peak_rss_mb:.0f} MB over up to {m.max_processes} processes "
                         f"({', '.join(f'{k} {v:.0f}' for k, v in sorted(m.group_peaks_mb.items()))} MB; "
                         f"load {format_number(m.load_avg_1m, 1)})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return runs


def write_json(path: str, command: str, env: dict, models: str, root: str, results: list[Measurement],
               runs: list[Measurement], n_small: int, n_big: int) -> None:
    """The measurements (aggregated and every round), the verdicts and where they come from, as JSON."""
    Path(path).write_text(json.dumps({
        "command": command, "environment": env, "models": models, "data": root,
        "measurements": [dataclasses.asdict(m) | {"studies_per_s": m.studies_per_s} for m in results],
        "runs": [dataclasses.asdict(m) | {"studies_per_s": m.studies_per_s} for m in runs],
        "verdicts": [dataclasses.asdict(v) for v in verdicts(results, n_small, n_big)],
    }, indent=2, default=str))


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    paths = chosen_paths(args)
    n_small, n_big = args.n, args.n * args.scale
    device = args.device or ("cuda" if args.num_gpus else "cpu")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    command = "python -m lumbar_ray.bench.scoring " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    threads = default_threads(args) if args.threads is None else args.threads
    root, ids = prepare_data(args, n_big, echo)
    models = prepare_models(args, echo)
    id_sets = [ids[:n_small], ids[:n_big]] if n_big > n_small else [ids[:n_small]]
    warmed = warm_page_cache(root, args.split, ids)
    echo(f"[bench] page cache warmed with {warmed / 2**20:.0f} MB of DICOM; models {models}")

    runs = measure_rounds(args, paths, models, root, id_sets, device, threads, echo)
    results = aggregate(runs)

    env = environment()
    caption = table_caption(results, args, env, command, device, threads)
    echo(render_report(results, n_small, n_big, args, env, command, device, models, caption))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results, n_small, n_big, caption) + "\n")
    if args.json:
        write_json(args.json, command, env, models, root, results, runs, n_small, n_big)
    return 0


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
