"""``python -m lumbar_ray.bench.stages``: what one study costs each scoring stage on one CPU
core — a benchmark, not a test. The inputs of the scale arithmetic in docs/RESULTS.md.

Synthesizes (once) ``--studies`` full-size studies (about 75 DICOM files, 19 MB a study, like the
RSNA set's 74.6 files and 17.7 MB), or takes the first ``--studies`` of ``--data``, then times,
in this process with ``--threads`` torch threads, the models on ``--device``:

- read + decode: :func:`lumbar_ray.dicom.read.read_study` over every study, page cache warm;
- detection: :func:`lumbar_ray.models.detector.detect_series` over every series of every study at
  ``--imgsz`` (YOLOv8n built from ``yolov8n.yaml``: untrained weights cost the same compute; the
  confidence threshold is high, as a trained model's boxes are few), as trained
  and as scoring loads it (:func:`lumbar_ray.models.detector.prepare_for_inference`), and the
  preprocessing (normalisation + letterbox) alone;
- grading: :func:`lumbar_ray.models.deepscorenet.predict_proba` of DeepScoreNet (as scoring loads it) on 25
  crops a study;
- with ``--models``: a trained bundle's :func:`lumbar_ray.scoring.study.detect_study` step by step
  (preprocess, forward, candidates — each class's best box a slice —, boxes, selection + crops;
  the device synchronised at each step) and
  the grading of its real crops. The as-scored YOLOv8n gets the same step split.
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
    p.add_argument("--device", default="cpu", help="torch device of the models (cpu, cuda)")
    p.add_argument("--models", default=None,
                   help="REGISTRY[@version]: also profile that bundle's trained detectors step by step "
                        "(scoring.detect_study: its detections, selection and crops are the real ones)")
    p.add_argument("--repeat", type=int, default=3, help="passes over the studies per timing")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--workdir", default="work/bench")
    p.add_argument("--data", default=None,
                   help="a data root (Kaggle layout) to take the first --studies test studies from, instead of "
                        "synthesizing them under --workdir")
    return p


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    import numpy as np
    import torch

    from lumbar_ray.synth import writer as synth
    from lumbar_ray.models import ultralytics_env

    ultralytics_env.configure()
    from lumbar_ray.models.detector import build_detector, detect_series, prepare_for_inference, preprocess_volume
    from lumbar_ray.dicom.read import list_studies, read_study
    from lumbar_ray.models.deepscorenet import DeepScoreNet, predict_proba
    from lumbar_ray.models.deepscorenet import prepare_for_inference as prepare_scorer_for_inference
    from lumbar_ray.targets import SERIES_TYPES

    torch.set_num_threads(args.threads)
    if args.data:
        root = Path(args.data)
    else:
        root = Path(args.workdir) / f"stages-{args.size}-seed{args.seed}-n{args.studies}"
        if not (root / "test_series_descriptions.csv").exists():
            synth.synthesize(str(root), n_studies=args.studies, seed=args.seed, split="test", size=args.size, workers=1)
    ids = list_studies(str(root), split="test")[: args.studies]
    if not ids:
        raise SystemExit(f"{root} holds no test studies")
    dcm = [f for s in ids for f in (root / "test_images" / str(s)).rglob("*.dcm")]
    files = len(dcm)
    mb = sum(f.stat().st_size for f in dcm) / 2**20
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

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def per_pass(fn) -> float:
        """Seconds per call of ``fn`` after one warm-up call, the device synchronised around."""
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        sync()
        return (time.perf_counter() - t0) / args.repeat

    def steps(timings: dict[str, float], label: str) -> None:
        """One row per profiled step: ms a study (the rate column is studies/s of that step alone)."""
        for step, seconds in timings.items():
            per_study = seconds / args.repeat / len(ids)
            rows.append((f"  {label}: {step}", 1e3 * per_study, "ms a study", 1 / per_study if per_study else float("inf")))

    for imgsz in args.imgsz or [256]:
        trained = {t: build_detector(t, imgsz=imgsz).to(device).eval() for t in SERIES_TYPES}
        prepared = {t: prepare_for_inference(copy.deepcopy(m)) for t, m in trained.items()}
        for label, detectors in (("as trained: BatchNorm, NCHW", trained), ("as scored: fused, channels-last", prepared)):
            detect_series(detectors[series[0].series_type], series[0], imgsz=imgsz, device=device)  # warm-up
            det_s = timed(lambda x: detect_series(detectors[x.series_type], x, imgsz=imgsz, conf=0.5, device=device))
            rows.append((f"YOLOv8n detection at {imgsz} px ({label})", n_slices / det_s, "slices/s", len(ids) / det_s))
        split: dict[str, float] = {}
        timed(lambda x: detect_series(prepared[x.series_type], x, imgsz=imgsz, conf=0.5, device=device, timings=split))
        steps(split, f"as scored, {imgsz} px, device synchronised at each step")
        pre_s = timed(lambda x: preprocess_volume(x.volume, imgsz))
        rows.append((f"normalisation + letterbox to {imgsz} px (NumPy/OpenCV, the CPU path)", n_slices / pre_s,
                     "slices/s", len(ids) / pre_s))
    net = prepare_scorer_for_inference(DeepScoreNet().to(device).eval())  # as scoring loads it
    crops = np.random.default_rng(0).random((25 * len(ids), 3, 32, 32), dtype=np.float32)
    score_s = per_pass(lambda: predict_proba(net, crops, batch_size=len(crops), device=device))
    rows.append(("DeepScoreNet, 25 crops a study", len(crops) / score_s, "crops/s", len(ids) / score_s))
    if args.models:
        from lumbar_ray.scoring.study import ModelBundle, detect_study, grade_crops

        bundle = ModelBundle.from_registry(args.models, device=str(device))
        # The total without the profile's syncs, then the steps in passes of their own.
        study_s = per_pass(lambda: [detect_study(bundle, st) for st in studies])
        rows.append((f"detect_study with {bundle.version} (trained, as scored)", n_slices / study_s, "slices/s",
                     len(ids) / study_s))
        split = {}
        for _ in range(args.repeat):
            found = [detect_study(bundle, st, timings=split) for st in studies]
        steps(split, "of which")
        real = np.concatenate([d.crops for d in found])
        if len(real):
            grade_s = per_pass(lambda: grade_crops(bundle, real))
            rows.append((f"grade_crops: its {len(real) / len(ids):.1f} crops a study", len(real) / grade_s, "crops/s",
                         len(ids) / grade_s))
    echo(f"{len(ids)} {args.size} studies: {files / len(ids):.1f} files and {mb / len(ids):.1f} MB a study, "
         f"{n_slices / len(ids):.0f} slices; device {device}, {args.threads} torch thread(s)")
    echo("| stage | rate | per study |\n|---|---:|---:|")
    for name, rate, unit, per_study in rows:
        echo(f"| {name} | {rate:.0f} {unit} | {per_study:.2f} studies/s |" if unit != "ms a study"
             else f"| {name} | {rate:.1f} {unit} | {per_study:.1f} studies/s |")
    return 0


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
