"""What `make bench` and `make bench-nodes` set up before measuring: the studies (synthesized once
and reused), a small model registry (built once), a warm page cache, and the machine's description."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from lumbar_ray.bench.phases import fresh_process, phase_build_registry
from lumbar_ray.config import DetectorConfig
from lumbar_ray.dicom.read import list_studies
from lumbar_ray.models.registry import ModelRegistry, parse_model_spec
from lumbar_ray.synth import writer as synth

try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with ray[default]
    psutil = None


def prepare_data(args: argparse.Namespace, n_total: int, echo: Callable[[str], None]) -> tuple[str, list[str]]:
    """The data root and the first ``n_total`` study ids of ``--split``: ``--data``, or synthetic
    studies under ``--workdir`` (synthesized on the first run, reused after)."""
    if args.data:
        root = args.data
    else:
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


def prepare_models(args: argparse.Namespace, echo: Callable[[str], None]) -> str:
    """``REGISTRY@version`` to benchmark: ``--models`` resolved, or the champion of a small registry
    under ``--workdir`` (trained in a fresh process on the first run, reused after)."""
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
    spec = fresh_process(phase_build_registry, str(Path(args.workdir).resolve()), registry, imgsz, args.seed,
                         args.num_cpus, 8, 1, isolate=not args.no_isolate)
    echo(f"[bench] registry {spec} built in {time.perf_counter() - t0:.0f} s")
    return spec


def warm_page_cache(root: str, split: str, ids: Sequence[str]) -> int:
    """Read every file of the studies once, so every path sees a warm page cache; returns bytes read."""
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
    """The machine and library versions the report names."""
    # heavy: ray and torch, for their versions and the GPU's name; the CLIs' --help stays fast
    import ray
    import torch

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
