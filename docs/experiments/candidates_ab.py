"""Detection with Ultralytics' NMS vs each class's best box a slice (what scoring now keeps),
side by side in one process: the same trained detectors, the same preloaded studies, one torch
thread, alternating rounds; prints each way's median and best rate and the detections it makes.

Usage: python docs/experiments/candidates_ab.py --data DATA_ROOT --models REGISTRY[@version]
       [--split test] [--studies 16] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--studies", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()

    import torch

    from lumbar_ray.scoring import study as scoring
    from lumbar_ray.models.detector_inference import detect_series
    from lumbar_ray.dicom.read import list_studies, load_descriptions, read_study

    torch.set_num_threads(1)
    bundle = scoring.ModelBundle.from_registry(args.models, parts=("detectors",))
    descriptions = load_descriptions(args.data, args.split)
    ids = list_studies(args.data, split=args.split)[: args.studies]
    studies = [read_study(args.data, s, split=args.split, descriptions=descriptions) for s in ids]

    def run(way: str) -> tuple[float, int]:
        t0, found = time.perf_counter(), 0
        for study in studies:
            for series_type, series in study.series.items():
                found += len(detect_series(bundle.detectors[series_type], series, conf=bundle.detector_conf,
                                           candidates=way))
        return time.perf_counter() - t0, found

    ways = ("nms", "best")
    for way in ways:
        run(way)  # warm-up
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    found = {}
    for _ in range(args.rounds):
        for way in ways:
            s, found[way] = run(way)
            seconds[way].append(s)
    for way in ways:
        print(f"{way}: median {len(studies) / statistics.median(seconds[way]):.2f}, best "
              f"{len(studies) / min(seconds[way]):.2f} studies/s; {found[way]} detections in {len(studies)} studies")


if __name__ == "__main__":
    main()
