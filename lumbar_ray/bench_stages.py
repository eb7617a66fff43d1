"""``python -m lumbar_ray.bench_stages``: what one study costs each scoring stage on one CPU
core — a benchmark, not a test. The inputs of the scale arithmetic in the README.

Synthesizes (once) ``--studies`` full-size studies (about 75 DICOM files, 19 MB a study, like the
RSNA set's 74.6 files and 17.7 MB), then times, in this process with ``--threads`` torch threads:

- read + decode: :func:`lumbar_ray.dicom_io.read_study` over every study, page cache warm;
- detection: :func:`lumbar_ray.detector.detect_series` over every series of every study at
  ``--imgsz`` (YOLOv8n built from ``yolov8n.yaml``: untrained weights cost the same compute; the
  confidence threshold is high so NMS does little work, as with a trained model), as trained
  and as scoring loads it (:func:`lumbar_ray.detector.prepare_for_inference`), and the
  preprocessing (normalisation + letterbox) alone;
- grading: :func:`lumbar_ray.scorer.predict_proba` of DeepScoreNet (as scoring loads it) on 25
  crops a study.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--studies", type=int, default=3)
    p.add_argument("--size", choices=("small", "full"), default="full")
    p.add_argument("--imgsz", type=int, action="append", default=None, help="detector input size(s) (default: 256)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeat", type=int, default=3, help="passes over the studies per timing")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--workdir", default="work/bench")
    return p


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    import numpy as np
    import torch

    from lumbar_ray import synth, ultralytics_env

    ultralytics_env.configure()
    from lumbar_ray.detector import build_detector, detect_series, prepare_for_inference, preprocess_volume
    from lumbar_ray.dicom_io import list_studies, read_study
    from lumbar_ray.scorer import DeepScoreNet, predict_proba
    from lumbar_ray.scorer import prepare_for_inference as prepare_scorer_for_inference
    from lumbar_ray.targets import SERIES_TYPES

    torch.set_num_threads(args.threads)
    root = Path(args.workdir) / f"stages-{args.size}-seed{args.seed}-n{args.studies}"
    if not (root / "test_series_descriptions.csv").exists():
        synth.synthesize(str(root), n_studies=args.studies, seed=args.seed, split="test", size=args.size, workers=1)
    ids = list_studies(str(root), split="test")
    files = sum(1 for _ in (root / "test_images").rglob("*.dcm"))
    mb = sum(f.stat().st_size for f in (root / "test_images").rglob("*.dcm")) / 2**20
    studies = [read_study(str(root), s, "test") for s in ids]  # warms the page cache
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        for s in ids:
            read_study(str(root), s, "test")
    read_s = (time.perf_counter() - t0) / args.repeat
    rows = [("read + decode", files / read_s, "files/s", len(ids) / read_s)]
    series = [x for st in studies for x in st.all_series()]
    n_slices = sum(x.volume.shape[0] for x in series)
    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            for x in series:
                fn(x)
        return (time.perf_counter() - t0) / args.repeat

    for imgsz in args.imgsz or [256]:
        trained = {t: build_detector(t, imgsz=imgsz).eval() for t in SERIES_TYPES}
        prepared = {t: prepare_for_inference(copy.deepcopy(m)) for t, m in trained.items()}
        for label, detectors in (("as trained: BatchNorm, NCHW", trained), ("as scored: fused, channels-last", prepared)):
            detect_series(detectors[series[0].series_type], series[0], imgsz=imgsz)  # warm-up
            det_s = timed(lambda x: detect_series(detectors[x.series_type], x, imgsz=imgsz, conf=0.5))
            rows.append((f"YOLOv8n detection at {imgsz} px ({label})", n_slices / det_s, "slices/s", len(ids) / det_s))
        pre_s = timed(lambda x: preprocess_volume(x.volume, imgsz))
        rows.append((f"of which normalisation + letterbox to {imgsz} px (NumPy/OpenCV)", n_slices / pre_s, "slices/s",
                     len(ids) / pre_s))
    net = prepare_scorer_for_inference(DeepScoreNet().eval())  # as scoring loads it
    crops = np.random.default_rng(0).random((25 * len(ids), 3, 32, 32), dtype=np.float32)
    predict_proba(net, crops[:25])
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        predict_proba(net, crops, batch_size=len(crops))
    score_s = (time.perf_counter() - t0) / args.repeat
    rows.append(("DeepScoreNet, 25 crops a study", len(crops) / score_s, "crops/s", len(ids) / score_s))
    echo(f"{len(ids)} {args.size} studies: {files / len(ids):.1f} files and {mb / len(ids):.1f} MB a study, "
         f"{n_slices / len(ids):.0f} slices; {args.threads} torch thread(s)")
    echo("| stage | rate | per study |\n|---|---:|---:|")
    for name, rate, unit, per_study in rows:
        echo(f"| {name} | {rate:.0f} {unit} | {per_study:.2f} studies/s |")
    return 0


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
