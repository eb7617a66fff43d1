"""`make bench-train` (lumbar_ray/bench/training.py): its arguments, what it counts and how it
prints, without training; and one tiny run end to end (slow)."""

from __future__ import annotations

import pytest

from lumbar_ray.bench.training import (
    MEMORY_TARGET, SizeRun, TrialRate, check_args, get_args_parser, growth_line, main, memory_growth, size_lines,
    train_config, trial_examples,
)
from lumbar_ray.config import SCORER, detector_job
from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T2
from lumbar_ray.training.shards import ChunkEntry


def size_run(n: int, total_mb: float, driver_mb: float = 300.0) -> SizeRun:
    trials = [TrialRate(SCORER, 0, 100, 4.0), TrialRate(SCORER, 1, 60, 2.0)]
    return SizeRun(n, 2.0, 500, 10.0, trials, driver_mb, total_mb - driver_mb, total_mb, 0, [SCORER])


def test_defaults_and_refusals():
    args = get_args_parser().parse_args([])
    assert (args.n, args.scale, args.folds, args.epochs, args.collapse_retries, args.val_cache_mb) == (20, 10, 2, 1, 0, None)
    check_args(args)
    args = get_args_parser().parse_args(["--n", "4", "--scale", "3", "--imgsz", "48", "--num-cpus", "2",
                                         "--val-cache-mb", "0"])
    assert (args.n, args.scale, args.imgsz, args.num_cpus) == (4, 3, 48, 2)
    cfg = train_config("data", "work", 4, [7, 8], args)
    assert cfg.detector.val_cache_mb == 0 and cfg.detector.collapse_retries == 0 and not cfg.final_fit
    assert cfg.exclude_studies == (7, 8) and cfg.detector.imgsz == 48 and cfg.scorer.epochs == 1
    for bad in (["--n", "1"], ["--folds", "1"], ["--scale", "0"], ["--imgsz", "16"]):
        with pytest.raises(SystemExit):
            check_args(get_args_parser().parse_args(bad))


def test_a_trial_counts_the_other_folds_examples_of_its_own_model():
    chunks = [ChunkEntry(0, 0, [1, 2], 10, {SAGITTAL_T2: 4, AXIAL_T2: 7}),
              ChunkEntry(1, 1, [3], 5, {SAGITTAL_T2: 2}),
              ChunkEntry(2, None, [9], 50, {SAGITTAL_T2: 50})]  # studies without a fold: never trained on
    assert trial_examples(chunks, SCORER, 0) == 5
    assert trial_examples(chunks, SCORER, 1) == 10
    assert trial_examples(chunks, detector_job(SAGITTAL_T2), 1) == 4
    assert trial_examples(chunks, detector_job(AXIAL_T2), 0) == 0
    assert trial_examples(chunks, SCORER, -1) == 15  # the fit on all studies


def test_memory_line_and_rates():
    small, big = size_run(20, 1000.0), size_run(200, 1150.0, driver_mb=320.0)
    assert memory_growth(small, big) == pytest.approx(0.15)
    line = growth_line(small, big)
    assert line.startswith("memory 20→200: +15.0%") and "within" in line
    assert "over" in growth_line(small, size_run(200, 1000.0 * (1 + MEMORY_TARGET) + 1))
    lines = size_lines(small)
    assert lines[0].startswith("N=20 studies: driver peak 300 MB, Ray processes peak 700 MB")
    assert lines[1] == "  cut 500 examples in 2.0 s (250.0 examples/s); trials 10.0 s (16.0 examples/s over all trials)"
    assert lines[2].startswith(f"  {SCORER}: 160 examples in 2 trials, 26.7 examples/s per trial")
    assert "largest Ray process" not in line  # no per-process peaks recorded: nothing claimed


def test_per_process_peaks_are_printed_largest_first_and_compared():
    small, big = size_run(20, 1000.0), size_run(200, 1100.0)
    small.process_peaks_mb = {"driver": 300.0, "raylet": 80.0, "ray::RayTrainWorker": 610.0, "ray::cut_chunk": 200.0}
    big.process_peaks_mb = {"driver": 310.0, "raylet": 90.0, "ray::RayTrainWorker": 640.0, "ray::cut_chunk": 700.0}
    line = [x for x in size_lines(small) if "largest single processes" in x][0]
    assert line.endswith("ray::RayTrainWorker 610 MB, driver 300 MB, ray::cut_chunk 200 MB, raylet 80 MB")
    assert growth_line(small, big).endswith("largest Ray process 610 → 700 MB (ray::cut_chunk))")


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_run_end_to_end(ray_runtime, tmp_path):
    # both sizes in this process, on the module's Ray runtime: one Ray start-up, not two (under a
    # heavy load a start-up can time out)
    args = get_args_parser().parse_args(["--n", "2", "--scale", "2", "--imgsz", "64", "--num-cpus", "2",
                                         "--workdir", str(tmp_path), "--json", str(tmp_path / "out.json"),
                                         "--no-isolate"])
    lines = []
    assert main(args, echo=lines.append) == 0
    sizes = [line.split(":")[0] for line in lines if line.startswith("N=")]
    assert sizes == ["N=2 studies", "N=4 studies"] * 2  # after each size, and again in the summary
    assert lines[lines.index("[bench] summary") + 1].startswith("N=2 studies")
    assert lines[-1].startswith("memory 2→4: ") and "largest Ray process" in lines[-1]
    assert any(x.startswith("  largest single processes, each at its own peak: ") and "driver" in x for x in lines)
    assert not list(tmp_path.glob("train-n*"))  # each size's storage removed, shards included
    assert (tmp_path / "out.json").exists()
