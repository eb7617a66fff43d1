"""`make bench-nodes` / ``python -m lumbar_ray.bench.nodes``: how scoring throughput grows with
Ray nodes — a benchmark, not a test.

For k = 1 .. ``--nodes``, a private Ray cluster of k nodes (``ray.cluster_utils.Cluster``: a head
and k - 1 worker nodes, each a separate raylet with ``--cpus-per-node`` CPUs, all on this machine)
runs the same scoring pipeline (:func:`lumbar_ray.bench.phases.phase_nodes`: the (a) path of
``make bench``) with k detector actors over the same N and ``scale`` x N studies. Ray Data spreads
the actors over the nodes (``tests/test_ray_cluster.py`` checks that they land on both); the table
shows studies/s and the speed-up over one node.

On one machine the nodes share its cores, disk and memory bus, so this measures the framework's
scaling (scheduling across raylets, object transfer between nodes, per-node start-up), not
more hardware: give each node no more CPUs than the machine has cores / ``--nodes``. The
cluster uses a private ``RAY_TMPDIR`` and free ports, so it never touches another Ray instance
on the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from lumbar_ray.bench.phases import fresh_process, phase_nodes
from lumbar_ray.bench.prepare import environment, prepare_data, prepare_models, warm_page_cache
from lumbar_ray.bench.results import Measurement, format_number


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--nodes", type=int, default=2, help="measure 1 .. NODES nodes")
    p.add_argument("--cpus-per-node", type=float, default=1.0)
    p.add_argument("--n", type=int, default=6, help="studies of the small run")
    p.add_argument("--scale", type=int, default=5, help="the large run has scale x N studies")
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--models", default=None, help="REGISTRY[@version] (default: the benchmark's small registry)")
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--data", default=None, help="studies to score (default: synthesized)")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--workdir", default="work/bench")
    p.add_argument("--synth-workers", type=int, default=None)
    p.add_argument("--detector-cpus", type=float, default=0.75, help="CPU per detector actor (one actor per node)")
    p.add_argument("--scorer-cpus", type=float, default=0.25)
    p.add_argument("--slice-batch", type=int, default=32)
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling interval, seconds")
    p.add_argument("--json", default=None, help="also write the measurements as JSON here")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (debugging)")
    return p


def markdown_table(rows: list[dict], caption: str) -> str:
    lines = ["| nodes | CPUs | detector actors | studies | seconds | studies/s | vs 1 node |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["studies"]: r["studies_per_s"] for r in rows if r["nodes"] == 1}
    for r in rows:
        ref = base.get(r["studies"])
        speed = f"{r['studies_per_s'] / ref:.2f}" if ref else "-"
        lines.append(f"| {r['nodes']} | {r['cpus']:g} | {r['detector_pool']} | {r['studies']} | {r['seconds']:.1f} | "
                     f"{r['studies_per_s']:.2f} | {speed} |")
    return "\n".join(lines) + "\n\n" + caption


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    if args.nodes < 1 or args.n < 1 or args.scale < 1:
        raise SystemExit("--nodes, --n and --scale must be >= 1")
    if args.detector_cpus + args.scorer_cpus > args.cpus_per_node:
        raise SystemExit("--detector-cpus + --scorer-cpus must fit one node's --cpus-per-node")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    command = "python -m lumbar_ray.bench.nodes " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # the shared preparation of `make bench` (synthetic data, a small registry)
    prep = argparse.Namespace(**{**vars(args), "num_cpus": None})
    n_big = args.n * args.scale
    root, ids = prepare_data(prep, n_big, echo)
    models = prepare_models(prep, echo)
    id_sets = [ids[: args.n], ids[:n_big]] if n_big > args.n else [ids[: args.n]]
    warm_page_cache(root, args.split, ids)
    rows = []
    scratch = tempfile.mkdtemp(prefix="lumbar-ray-bench-nodes-")
    try:
        for k in range(1, args.nodes + 1):
            # read_cpus = detector_cpus, one study a read: Ray Data then fuses the read into the
            # detector actor (a separate read task would need CPU the nodes do not have left)
            kw = dict(input=root, models=models, split=args.split, read_cpus=args.detector_cpus,
                      read_batch_studies=1, detector_pool=k,
                      detector_cpus=args.detector_cpus, detector_gpus=0.0, scorer_pool=1, scorer_cpus=args.scorer_cpus,
                      scorer_gpus=0.0, slice_batch=args.slice_batch)
            echo(f"[bench-nodes] {k} node(s) x {args.cpus_per_node:g} CPU, {k} detector actor(s): "
                 f"{', '.join(str(len(s)) for s in id_sets)} studies ...")
            out = fresh_process(phase_nodes, k, args.cpus_per_node, kw, id_sets, args.interval, scratch,
                                isolate=not args.no_isolate)
            for r in out["runs"]:
                m = Measurement(**r)
                row = {"nodes": k, "cpus": k * args.cpus_per_node, "detector_pool": k, "studies": m.n_scored,
                       "seconds": m.seconds, "studies_per_s": m.studies_per_s, "failed": m.n_failed}
                rows.append(row)
                echo(f"[bench-nodes]   {m.n_scored} studies in {m.seconds:.1f} s = {m.studies_per_s:.2f} studies/s "
                     f"(load {format_number(m.load_avg_1m, 1)})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    env = environment()
    caption = (f"_{args.size} synthetic studies; k nodes x {args.cpus_per_node:g} CPU on one machine with "
               f"{env['cpus']} CPUs ({env['cpu_model']}); k detector actors x {args.detector_cpus:g} CPU, 1 scorer "
               f"actor x {args.scorer_cpus:g} CPU; wall time of run_scoring incl. actor start-up. Command: "
               f"`{command}`_")
    table = markdown_table(rows, caption)
    echo(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=2))
    return 0


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
