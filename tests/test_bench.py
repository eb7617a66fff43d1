"""The benchmark's pure helpers (no training, no Ray): the paper-style per-slice loop (b) agrees
with the batched package path, it really makes one call per slice and per crop, the memory
sampler sees a process tree, and the verdicts are honest."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from lumbar_ray.bench import nodes as bench_nodes
from lumbar_ray.bench import stages as bench_stages
from lumbar_ray.bench.memory import MemorySampler
from lumbar_ray.bench.paths import (
    CallCounter, batched_predict, detectors_alone, paper_style_predict, per_crop_proba, watch_bundle,
)
from lumbar_ray.bench.phases import fresh_process
from lumbar_ray.bench.prepare import warm_page_cache
from lumbar_ray.bench.results import Measurement, aggregate, marginal_rate, markdown_table, verdicts
from lumbar_ray.bench.scoring import get_args_parser, score_kwargs
from lumbar_ray.config import ScoreConfig
from lumbar_ray.dicom.series import Series, Study
from lumbar_ray.models import ultralytics_env
from lumbar_ray.models.deepscorenet import DeepScoreNet, predict_proba
from lumbar_ray.models.detector import build_detector
from lumbar_ray.models.detector_preprocess import preprocess_slices
from lumbar_ray.scoring.study import ModelBundle, study_rows
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, TARGETS, targets_for_series


@pytest.fixture(scope="module", autouse=True)
def _ultralytics_offline(tmp_path_factory):
    if "ultralytics" not in sys.modules:
        ultralytics_env.configure(tmp_path_factory.mktemp("ultralytics"))
    # One thread: tiny tensors gain nothing from more, and a busy 2-core machine makes OpenMP's
    # spinning threads 10-100x slower. Restored for the other modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ImageDrivenDetector(torch.nn.Module):
    """A stand-in for an eval-mode YOLOv8 DetectionModel ((B, 4 + nc, A) xywh + class scores):
    class c has one box at a fixed canvas position and a confidence that is a function of the
    image under it, so each slice gives its own, well separated scores (no ties to break)."""

    def __init__(self, nc: int, imgsz: int = 64):
        super().__init__()
        self.nc, self.imgsz = nc, imgsz
        self.anchor = [(12.0 + 3.5 * c, 14.0 + 3.0 * c) for c in range(nc)]
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x):
        b = x.shape[0]
        y = torch.zeros(b, 4 + self.nc, self.nc)
        for c, (cx, cy) in enumerate(self.anchor):
            patch = x[:, 0, int(cy) - 2 : int(cy) + 2, int(cx) - 2 : int(cx) + 2]
            y[:, 0, c], y[:, 1, c], y[:, 2, c], y[:, 3, c] = cx, cy, 8.0, 8.0
            y[:, 4 + c, c] = 0.05 + 0.9 * patch.mean(dim=(1, 2)) * self.scale
        return y, {}


def _series(series_type: str, n: int, rows: int, cols: int, seed: int) -> Series:
    rng = np.random.default_rng(seed)
    vol = rng.gamma(2.0, 150.0, (n, rows, cols)).astype(np.float32)
    if series_type == AXIAL_T2:
        orient = np.array([1, 0, 0, 0, 1, 0], float)
        pos = np.array([[0.0, 0.0, -4.0 * k] for k in range(n)])[::-1].copy()
        plane = "axial"
    else:
        orient = np.array([0, 1, 0, 0, 0, -1], float)
        pos = np.array([[4.0 * (n - 1) / 2 - 4.0 * k, 0.0, 0.0] for k in range(n)])
        plane = "sagittal"
    return Series("1", str(100 + seed), series_type, series_type, plane, vol, np.arange(n) + 1, pos, orient,
                  (0.9, 0.9), 4.0, 4.0, [f"{k + 1}.dcm" for k in range(n)])


def _bundle():
    torch.manual_seed(0)
    scorer = DeepScoreNet(in_channels=3)
    # Non-trivial BatchNorm statistics, so eval mode really normalises.
    for m in scorer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    scorer.eval()
    detectors = {t: ImageDrivenDetector(len(targets_for_series(t))).eval() for t in (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)}
    return ModelBundle(version="v-test", detectors=detectors, scorer=scorer, channels="repeat", crop_mm=None,
                       priors={}, device=torch.device("cpu"), detector_conf=0.01)


def _study() -> Study:
    return Study("1", {SAGITTAL_T1: _series(SAGITTAL_T1, 7, 80, 72, 1), SAGITTAL_T2: _series(SAGITTAL_T2, 6, 80, 72, 2),
                       AXIAL_T2: _series(AXIAL_T2, 11, 72, 72, 3)})


def test_paper_loop_equals_batched_package_path():
    bundle, study = _bundle(), _study()
    counter = watch_bundle(bundle)
    paper, paper_probs = paper_style_predict(bundle, study)
    counter.remove()
    batched, batched_probs = batched_predict(bundle, study, slice_batch=32)

    n_slices = sum(s.n_slices for s in study.series.values())
    # (b) is what it claims: one detector call per slice, one DeepScoreNet call per crop.
    assert counter.calls["detector"] == counter.items["detector"] == n_slices
    assert counter.max_batch["detector"] == 1
    # (the fake detectors see no anatomy: their five canal boxes lie 4 mm apart, which the canal
    # rule reads as one disc, so it keeps one level and places none; and the axial slices do not
    # reach every level the sagittal detections place in 3-D. Most targets are still detected,
    # 19 of 25: enough crops for the comparison below to mean something)
    assert counter.calls["scorer"] == counter.items["scorer"] == len(paper.crops) >= 15
    assert counter.max_batch["scorer"] == 1
    # ... and finds, crops and grades exactly what the batched pipeline path does.
    assert [(h.series_id, h.slice_index, h.x, h.y) for h in paper.hits] == \
           [(h.series_id, h.slice_index, h.x, h.y) for h in batched.hits]
    np.testing.assert_allclose([h.confidence for h in paper.hits if h.detected],
                               [h.confidence for h in batched.hits if h.detected], atol=1e-6)
    np.testing.assert_array_equal(paper.crops, batched.crops)
    assert paper_probs.shape == (len(paper.crops), 3)
    np.testing.assert_allclose(paper_probs, batched_probs, atol=1e-5)
    assert not np.allclose(paper_probs, paper_probs[0])  # not a constant model: the check means something
    now = pd.Timestamp.now(tz="UTC")
    a = study_rows(paper, paper_probs, "v", {}, "r", now)
    b = study_rows(batched, batched_probs, "v", {}, "r", now)
    np.testing.assert_allclose(a[["normal_mild", "moderate", "severe"]], b[["normal_mild", "moderate", "severe"]],
                               atol=1e-5)


def test_per_crop_proba_one_call_per_crop_and_empty():
    bundle = _bundle()
    crops = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    counter = CallCounter().watch("scorer", bundle.scorer)
    probs = per_crop_proba(bundle.scorer, crops)
    counter.remove()
    assert counter.calls["scorer"] == 5 and counter.max_batch["scorer"] == 1
    np.testing.assert_allclose(probs, predict_proba(bundle.scorer, crops, batch_size=256), atol=1e-5)
    assert per_crop_proba(bundle.scorer, crops[:0]).shape == (0, 3)


def test_real_yolo_is_batch_invariant_in_eval_mode():
    """The real YOLOv8n graph gives the same outputs one slice at a time as batched."""
    model = build_detector(AXIAL_T2, imgsz=64, seed=0).eval()
    vol = np.random.default_rng(1).uniform(0, 1, (5, 80, 70)).astype(np.float32)
    x, _ = preprocess_slices(vol, 64)
    with torch.no_grad():
        batched = model(x)[0]
        single = torch.cat([model(x[i : i + 1])[0] for i in range(len(x))])
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-4)


def test_detectors_alone_counts_slices_batched():
    bundle, study = _bundle(), _study()
    counter = watch_bundle(bundle)
    n = detectors_alone(bundle, [study, study], slice_batch=32)
    counter.remove()
    assert n == 2 * sum(s.n_slices for s in study.series.values()) == counter.items["detector"]
    assert counter.calls["detector"] == 6  # one call per series: every series fits in one batch
    assert "scorer" not in counter.calls


def test_memory_sampler_sees_self_and_children():
    with MemorySampler(interval_s=0.05) as mem:
        block = np.ones(40_000_000, dtype=np.float64)  # 305 MB, touched
        time.sleep(0.2)
        del block
    assert mem.available and mem.samples >= 2
    assert mem.peak_mb - mem.baseline_mb > 250
    assert mem.group_peaks["driver"] * 2**-20 > 250

    code = "import numpy as np, time; a = np.ones(30_000_000); time.sleep(1.5)"
    with MemorySampler(interval_s=0.05) as tree:
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait(timeout=30)
    assert tree.max_processes >= 2
    assert tree.group_peaks.get("other", 0) * 2**-20 > 200  # the child's 229 MB counted


def test_fresh_process_runs_a_bench_function_in_a_new_process(tmp_path):
    # The phases travel by their module path, as `python -m lumbar_ray.bench.scoring` sends them.
    assert fresh_process(warm_page_cache, str(tmp_path), "test", []) == 0
    assert fresh_process(os.getpid) != os.getpid() == fresh_process(os.getpid, isolate=False)


def _m(path, n, seconds, peak=1000.0):
    return Measurement(path, n, seconds, n, peak_rss_mb=peak)


def test_verdicts_are_honest():
    # a: 4 in 20 s, 40 in 38 s; b: 40 in 80 s; c: 40 in 30 s
    results = [_m("a", 4, 20.0, 1000), _m("a", 40, 38.0, 1050), _m("b", 4, 8.0, 800), _m("b", 40, 80.0, 1100),
               _m("c", 4, 3.0), _m("c", 40, 30.0)]
    assert marginal_rate(results, "a", 4, 40) == pytest.approx(36 / 18)
    v = {x.name.split(" at ")[0].split(",")[0]: x for x in verdicts(results, 4, 40)}
    assert v["a/b >= 5"].met is False and v["a/b >= 5"].measured == "2.105"
    assert "c/b = 2.67" in v["a/b >= 5"].why  # the reason comes from the measurements
    assert v["a/c >= 0.8"].met is False and v["a/c >= 0.8"].measured == "0.789"
    flat = [x for x in verdicts(results, 4, 40) if x.name.startswith("memory")]
    assert [x.met for x in flat] == [True, False]  # +5% is flat, +37.5% is not
    table = markdown_table(results, 4, 40)
    assert table.count("\n| (a) Ray pipeline |") == 2 and "**no**" in table and "| yes |" in table
    # missing paths are reported as not measured, never as met
    partial = verdicts([_m("a", 4, 1.0), _m("a", 40, 5.0)], 4, 40)
    assert [x.met for x in partial[:2]] == [None, None]


def test_args_and_gpu_defaults():
    p = get_args_parser()
    args = p.parse_args([])
    assert (args.n, args.scale, args.size, args.num_gpus) == (4, 10, "small", 0)
    kw = score_kwargs(args, "/data", "/reg@v1")
    assert kw["detector_gpus"] == 0.0 and kw["scorer_gpus"] == 0.0 and kw["detector_pool"] == 1
    gpu = score_kwargs(p.parse_args(["--num-gpus", "2", "--size", "full"]), "/data", "/reg@v1")
    assert gpu["detector_pool"] == 2 and gpu["detector_gpus"] == 0.75 and gpu["scorer_gpus"] == 0.25
    ScoreConfig(out="/o", **gpu)  # every key is a ScoreConfig field


def test_aggregate_takes_the_median_round_and_the_highest_peak():
    runs = [_m("c", 4, 3.0, 900), _m("c", 4, 9.0, 950), _m("c", 4, 4.0, 1200), _m("c", 40, 30.0)]
    rows = aggregate(runs)
    c4 = next(m for m in rows if m.n == 4)
    assert (c4.seconds, c4.repeats, c4.seconds_min, c4.seconds_max, c4.peak_rss_mb) == (4.0, 3, 3.0, 9.0, 1200)
    assert [m.n for m in rows] == [4, 40]
    assert "4.0 (3.0..9.0)" in markdown_table(rows, 4, 40)


def test_node_scaling_table_and_arguments():
    rows = [
        {"nodes": 1, "cpus": 1.0, "detector_pool": 1, "studies": 6, "seconds": 12.0, "studies_per_s": 0.5},
        {"nodes": 2, "cpus": 2.0, "detector_pool": 2, "studies": 6, "seconds": 8.0, "studies_per_s": 0.75},
        {"nodes": 2, "cpus": 2.0, "detector_pool": 2, "studies": 30, "seconds": 20.0, "studies_per_s": 1.5},
    ]
    table = bench_nodes.markdown_table(rows, "_caption_")
    lines = table.splitlines()
    assert lines[2] == "| 1 | 1 | 1 | 6 | 12.0 | 0.50 | 1.00 |"
    assert lines[3] == "| 2 | 2 | 2 | 6 | 8.0 | 0.75 | 1.50 |"
    assert lines[4].endswith("| 1.50 | - |")  # no 1-node run at 30 studies: no ratio invented
    assert table.endswith("_caption_")
    with pytest.raises(SystemExit, match="must fit one node"):
        bench_nodes.main(bench_nodes.get_args_parser().parse_args(["--detector-cpus", "1", "--scorer-cpus", "0.5"]))


def test_stage_costs_report_every_stage(tmp_path):
    lines: list[str] = []
    args = bench_stages.get_args_parser().parse_args(
        ["--studies", "1", "--size", "small", "--repeat", "1", "--imgsz", "64", "--workdir", str(tmp_path)])
    assert bench_stages.main(args, echo=lines.append) == 0
    text = "\n".join(lines)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "studies/s" in line]
    names = [r.split(" | ")[0] for r in rows]
    steps = [n for n in names if n.startswith("|   as scored, 64 px")]
    assert [n for n in names if n not in steps] == [
        "| read + decode", "| YOLOv8n detection at 64 px (as trained: BatchNorm, NCHW)",
        "| YOLOv8n detection at 64 px (as scored: fused, channels-last)",
        "| normalisation + letterbox to 64 px (NumPy/OpenCV, the CPU path)", "| DeepScoreNet, 25 crops a study"]
    # The detection of the models as scored, step by step (boxes only when something is detected).
    assert [n.split(": ")[-1] for n in steps][:3] == ["preprocess", "forward", "candidates"]
    assert names.index(steps[0]) == names.index("| YOLOv8n detection at 64 px (as scored: fused, channels-last)") + 1
    for row in rows:
        rate = float(row.split(" | ")[1].split()[0])
        assert rate > 0
