"""``python -m lumbar_ray.bench.stages``: what one study costs each scoring stage on one CPU
core — a benchmark, not a test. The inputs of the scale arithmetic in docs/RESULTS.md.

Synthesizes (once) ``--studies`` full-size studies (about 75 DICOM files, 19 MB a study, like the
RSNA set's 74.6 files and 17.7 MB), or takes the first ``--studies`` of ``--data``, then times,
in this process with ``--threads`` torch threads, the models on ``--device``:

- read + decode: :func:`lumbar_ray.dicom.read.read_study` over every study, page cache warm;
- detection: :func:`lumbar_ray.models.detector_inference.detect_series` over every series of every study at
  ``--imgsz`` (YOLOv8n built from ``yolov8n.yaml``: untrained weights cost the same compute; the
  confidence threshold is high, as a trained model's boxes are few), as trained
  and as scoring loads it (:func:`lumbar_ray.models.detector.prepare_detector_for_inference`), and the
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lumbar_ray.dicom.read import list_studies, read_study
from lumbar_ray.models.deepscorenet import DeepScoreNet, predict_proba, prepare_scorer_for_inference
from lumbar_ray.models.detector import build_detector, prepare_detector_for_inference
from lumbar_ray.models.detector_inference import detect_series
from lumbar_ray.models.detector_preprocess import preprocess_volume
from lumbar_ray.scoring.study import ModelBundle, detect_study, grade_crops
from lumbar_ray.synth import writer as synth
from lumbar_ray.targets import SERIES_TYPES

STEP_UNIT = "ms a study"  # the unit of the rows of one profiled step


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


@dataclass
class StageTimer:
    """Times stages over the same studies, ``repeat`` passes a timing, and collects the table's
    rows: ``(stage, rate, unit, studies/s)``."""

    studies: list
    repeat: int
    device: torch.device
    rows: list[tuple[str, float, str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.series = [x for st in self.studies for x in st.all_series()]
        self.n_slices = sum(x.volume.shape[0] for x in self.series)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def per_series(self, fn: Callable) -> float:
        """Seconds a pass of ``fn`` over every series (no warm-up, no synchronisation)."""
        t0 = time.perf_counter()
        for _ in range(self.repeat):
            for x in self.series:
                fn(x)
        return (time.perf_counter() - t0) / self.repeat

    def per_pass(self, fn: Callable) -> float:
        """Seconds per call of ``fn`` after one warm-up call, the device synchronised around."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.repeat):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / self.repeat

    def add(self, stage: str, count: float, unit: str, seconds: float) -> None:
        """A row for ``count`` units of work done in ``seconds`` over all the studies."""
        self.rows.append((stage, count / seconds, unit, len(self.studies) / seconds))

    def add_steps(self, timings: dict[str, float], label: str) -> None:
        """One row per profiled step: ms a study (the rate column is studies/s of that step alone)."""
        for step, seconds in timings.items():
            per_study = seconds / self.repeat / len(self.studies)
            self.rows.append((f"  {label}: {step}", 1e3 * per_study, STEP_UNIT,
                              1 / per_study if per_study else float("inf")))


def study_root(args: argparse.Namespace) -> Path:
    """``--data``, or ``--studies`` synthetic test studies under ``--workdir`` (synthesized once)."""
    if args.data:
        return Path(args.data)
    root = Path(args.workdir) / f"stages-{args.size}-seed{args.seed}-n{args.studies}"
    if not (root / "test_series_descriptions.csv").exists():
        synth.synthesize(str(root), n_studies=args.studies, seed=args.seed, split="test", size=args.size, workers=1)
    return root


def time_reading(root: Path, ids: list, repeat: int) -> float:
    """Seconds a pass of read_study over the studies (the page cache warmed by the caller)."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        for s in ids:
            read_study(str(root), s, "test")
    return (time.perf_counter() - t0) / repeat


def time_detection(timer: StageTimer, imgsz: int) -> None:
    """YOLOv8n as trained and as scored at ``imgsz``, the as-scored one step by step, and the
    preprocessing alone."""
    device, series = timer.device, timer.series
    trained = {t: build_detector(t, imgsz=imgsz).to(device).eval() for t in SERIES_TYPES}
    prepared = {t: prepare_detector_for_inference(copy.deepcopy(m)) for t, m in trained.items()}
    for label, detectors in (("as trained: BatchNorm, NCHW", trained), ("as scored: fused, channels-last", prepared)):
        detect_series(detectors[series[0].series_type], series[0], imgsz=imgsz, device=device)  # warm-up
        det_s = timer.per_series(lambda x: detect_series(detectors[x.series_type], x, imgsz=imgsz, conf=0.5,
                                                         device=device))
        timer.add(f"YOLOv8n detection at {imgsz} px ({label})", timer.n_slices, "slices/s", det_s)
    split: dict[str, float] = {}
    timer.per_series(lambda x: detect_series(prepared[x.series_type], x, imgsz=imgsz, conf=0.5, device=device,
                                             timings=split))
    timer.add_steps(split, f"as scored, {imgsz} px, device synchronised at each step")
    pre_s = timer.per_series(lambda x: preprocess_volume(x.volume, imgsz))
    timer.add(f"normalisation + letterbox to {imgsz} px (NumPy/OpenCV, the CPU path)", timer.n_slices, "slices/s",
              pre_s)


def time_grading(timer: StageTimer) -> None:
    """DeepScoreNet, as scoring loads it, on 25 random crops a study."""
    net = prepare_scorer_for_inference(DeepScoreNet().to(timer.device).eval())
    crops = np.random.default_rng(0).random((25 * len(timer.studies), 3, 32, 32), dtype=np.float32)
    score_s = timer.per_pass(lambda: predict_proba(net, crops, batch_size=len(crops), device=timer.device))
    timer.add("DeepScoreNet, 25 crops a study", len(crops), "crops/s", score_s)


def time_trained_bundle(timer: StageTimer, models: str) -> None:
    """A trained bundle's detect_study in total, then step by step, and the grading of its real crops."""
    bundle = ModelBundle.from_registry(models, device=str(timer.device))
    # The total without the profile's syncs, then the steps in passes of their own.
    study_s = timer.per_pass(lambda: [detect_study(bundle, st) for st in timer.studies])
    timer.add(f"detect_study with {bundle.version} (trained, as scored)", timer.n_slices, "slices/s", study_s)
    split: dict[str, float] = {}
    for _ in range(timer.repeat):
        found = [detect_study(bundle, st, timings=split) for st in timer.studies]
    timer.add_steps(split, "of which")
    real = np.concatenate([d.crops for d in found])
    if len(real):
        grade_s = timer.per_pass(lambda: grade_crops(bundle, real))
        timer.add(f"grade_crops: its {len(real) / len(timer.studies):.1f} crops a study", len(real), "crops/s", grade_s)


def table_lines(rows: list[tuple[str, float, str, float]]) -> list[str]:
    lines = ["| stage | rate | per study |\n|---|---:|---:|"]
    for name, rate, unit, per_study in rows:
        lines.append(f"| {name} | {rate:.0f} {unit} | {per_study:.2f} studies/s |" if unit != STEP_UNIT
                     else f"| {name} | {rate:.1f} {unit} | {per_study:.1f} studies/s |")
    return lines


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    torch.set_num_threads(args.threads)
    root = study_root(args)
    ids = list_studies(str(root), split="test")[: args.studies]
    if not ids:
        raise SystemExit(f"{root} holds no test studies")
    dcm = [f for s in ids for f in (root / "test_images" / str(s)).rglob("*.dcm")]
    mb = sum(f.stat().st_size for f in dcm) / 2**20
    studies = [read_study(str(root), s, "test") for s in ids]  # warms the page cache
    timer = StageTimer(studies, args.repeat, torch.device(args.device))
    timer.add("read + decode", len(dcm), "files/s", time_reading(root, ids, args.repeat))
    for imgsz in args.imgsz or [256]:
        time_detection(timer, imgsz)
    time_grading(timer)
    if args.models:
        time_trained_bundle(timer, args.models)
    echo(f"{len(ids)} {args.size} studies: {len(dcm) / len(ids):.1f} files and {mb / len(ids):.1f} MB a study, "
         f"{timer.n_slices / len(ids):.0f} slices; device {timer.device}, {args.threads} torch thread(s)")
    for line in table_lines(timer.rows):
        echo(line)
    return 0


def run(argv: list[str] | None = None) -> int:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
