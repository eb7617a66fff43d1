"""Why a CPU scoring actor grades in fixed batches: memory of one long-lived process that grades
calls of ever new crop counts, with whole-call batches vs fixed padded batches.

Each mode runs in a fresh process (one torch thread, DeepScoreNet as scoring loads it, random
weights: the cost and the allocations do not depend on them) and prints the process's private
memory (RssAnon from /proc/self/status) as it goes, and the grading rate.

- ``whole``: each call's crops in one forward pass (what ``grade_crops`` did before):
  every new crop count is a new activation size.
- ``fixed``: ``scoring.grade_crops`` as it is now on a CPU: passes of ``CPU_GRADE_BATCH`` crops,
  the last one zero-padded.

Then, in one process, the grading rate of both ways at the crop counts a scoring actor's calls
have in practice (16 studies a call: ~110 crops with the bench's one-epoch models, ~400 with
all 25 targets detected), alternating, 3 rounds.

Usage: python docs/experiments/scorer_memory.py [--calls 120] [--max-crops 200]
Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def rss_anon_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_mode(mode: str, calls: int, max_crops: int) -> None:
    import time
    from types import SimpleNamespace

    import numpy as np
    import torch

    from lumbar_ray.models.deepscorenet import DeepScoreNet, predict_proba, prepare_scorer_for_inference
    from lumbar_ray.scoring.study import grade_crops

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = prepare_scorer_for_inference(DeepScoreNet())
    bundle = SimpleNamespace(parts=("scorer",), device=torch.device("cpu"), scorer=net, version="x")
    rng = np.random.default_rng(0)
    pool = rng.random((max_crops, 3, 32, 32), dtype=np.float32)
    counts = [1 + (k * 37) % max_crops for k in range(calls)]  # distinct counts in a scrambled order
    start_mb, t0, graded = rss_anon_mb(), time.perf_counter(), 0
    for k, n in enumerate(counts, 1):
        if mode == "whole":
            predict_proba(net, pool[:n], batch_size=n)
        else:
            grade_crops(bundle, pool[:n])
        graded += n
        if k % max(1, calls // 6) == 0 or k == calls:
            print(f"  {mode}: {k:4d} calls, {graded:6d} crops, RssAnon {rss_anon_mb():7.0f} MB", flush=True)
    seconds = time.perf_counter() - t0
    print(f"{mode}: RssAnon {start_mb:.0f} -> {rss_anon_mb():.0f} MB over {calls} calls of 1..{max_crops} crops; "
          f"{graded / seconds:.0f} crops/s", flush=True)


def rates(counts=(110, 400), rounds: int = 3, passes: int = 3) -> None:
    import time
    from types import SimpleNamespace

    import numpy as np
    import torch

    from lumbar_ray.models.deepscorenet import DeepScoreNet, predict_proba, prepare_scorer_for_inference
    from lumbar_ray.scoring.study import grade_crops

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = prepare_scorer_for_inference(DeepScoreNet())
    bundle = SimpleNamespace(parts=("scorer",), device=torch.device("cpu"), scorer=net, version="x")
    pool = np.random.default_rng(1).random((max(counts), 3, 32, 32), dtype=np.float32)
    ways = {"whole": lambda n: predict_proba(net, pool[:n], batch_size=n), "fixed": lambda n: grade_crops(bundle, pool[:n])}
    for n in counts:
        got: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(rounds):
            for way, fn in ways.items():
                fn(n)  # warm-up at this size
                t0 = time.perf_counter()
                for _ in range(passes):
                    fn(n)
                got[way].append(passes * n / (time.perf_counter() - t0))
        print(f"{n} crops a call: " + "; ".join(f"{w} {min(v):.0f}-{max(v):.0f} crops/s" for w, v in got.items()),
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=120)
    p.add_argument("--max-crops", type=int, default=200)
    p.add_argument("--mode", choices=("whole", "fixed", "rates"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode == "rates":
        rates()
        return
    if args.mode:
        run_mode(args.mode, args.calls, args.max_crops)
        return
    for mode in ("whole", "fixed", "rates"):
        subprocess.run([sys.executable, __file__, "--mode", mode, "--calls", str(args.calls),
                        "--max-crops", str(args.max_crops)], check=True)


if __name__ == "__main__":
    main()
