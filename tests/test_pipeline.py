"""Pure parts of the scoring pipeline (no Ray)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd

from lumbar_ray.scoring.pipeline import PartFiles, StudyItem, pack_volumes, read_study_row
from lumbar_ray.targets import TARGETS


def test_pack_volumes_is_lossless_or_leaves_the_volume_alone():
    rng = np.random.default_rng(0)
    integral = rng.integers(-1000, 4000, (3, 20, 20)).astype(np.float32)
    fractional = integral + 0.5
    too_wide = integral * 100.0  # beyond int16
    with_nan = integral.copy()
    with_nan[0, 0, 0] = np.nan
    already = integral.astype(np.int16)
    study = SimpleNamespace(series={name: SimpleNamespace(volume=v.copy()) for name, v in
                                    dict(integral=integral, fractional=fractional, too_wide=too_wide,
                                         with_nan=with_nan, already=already, empty=np.zeros((0, 4, 4), np.float32)).items()})
    assert pack_volumes(study) is study
    packed = study.series["integral"].volume
    assert packed.dtype == np.int16 and np.array_equal(packed.astype(np.float32), integral)
    for name in ("fractional", "too_wide", "with_nan", "empty"):
        assert study.series[name].volume.dtype == np.float32, name
    np.testing.assert_array_equal(study.series["fractional"].volume, fractional)
    assert study.series["already"].volume.dtype == np.int16


def test_score_job_and_bench_share_the_resource_flags():
    from lumbar_ray.bench import scoring as bench
    from lumbar_ray.scoring import job as score_job
    from lumbar_ray.config import ScoreConfig
    from lumbar_ray.scoring.args import RESOURCE_FIELDS

    flags = ["--read-cpus", "0.25", "--read-batch-studies", "2", "--detector-pool", "3", "--detector-cpus", "2",
             "--detector-gpus", "0.5", "--detector-batch-studies", "2", "--scorer-pool", "2", "--scorer-cpus", "1",
             "--scorer-gpus", "0.125", "--scorer-batch-studies", "8", "--slice-batch", "16", "--flush-studies", "4",
             "--buffer-mb", "512"]
    expected = dict(read_cpus=0.25, read_batch_studies=2, detector_pool=3, detector_cpus=2.0, detector_gpus=0.5,
                    detector_batch_studies=2, scorer_pool=2, scorer_cpus=1.0, scorer_gpus=0.125, scorer_batch_studies=8,
                    slice_batch=16, flush_studies=4, buffer_mb=512.0)
    assert set(expected) == set(RESOURCE_FIELDS)
    cfg = score_job.config_from_args(score_job.get_args_parser().parse_args(
        ["--input", "in", "--models", "reg", "--out", "out", *flags]))
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert bench.score_kwargs(bench.get_args_parser().parse_args(flags), "in", "reg") == \
        dict(input="in", models="reg", split="test", **expected)
    # unset GPU flags: the bench decides them from --num-gpus, the job keeps ScoreConfig's
    defaults = ScoreConfig(input="", models="", out="")
    on_gpu = bench.score_kwargs(bench.get_args_parser().parse_args(["--num-gpus", "1"]), "in", "reg")
    assert (on_gpu["detector_pool"], on_gpu["detector_gpus"], on_gpu["scorer_gpus"]) == (1, 0.75, 0.25)
    on_cpu = bench.score_kwargs(bench.get_args_parser().parse_args([]), "in", "reg")
    assert (on_cpu["detector_gpus"], on_cpu["scorer_gpus"], on_cpu["read_cpus"]) == (0.0, 0.0, defaults.read_cpus)
    job = score_job.config_from_args(score_job.get_args_parser().parse_args(["--input", "i", "--models", "m", "--out", "o"]))
    assert {k: getattr(job, k) for k in RESOURCE_FIELDS} == {k: getattr(defaults, k) for k in RESOURCE_FIELDS}


def test_a_study_that_cannot_be_read_becomes_an_error_row(tmp_path):
    row = read_study_row({"study_id": 42}, str(tmp_path), "test", None)
    item = row["item"]
    assert row["study_id"] == "42" and item.study is None
    assert item.error["study_id"] == "42" and item.error["stage"] == "read" and item.error["series_id"] is None


def study_rows(study_id: str) -> pd.DataFrame:
    """A study's 25 prediction rows as scoring writes them (every target Normal/Mild, found)."""
    return pd.DataFrame([{"study_id": study_id, "condition": t.condition.slug, "level": t.level,
                          "normal_mild": 1.0, "moderate": 0.0, "severe": 0.0, "detected": True,
                          "confidence": 0.9, "flags": ""} for t in TARGETS])


def test_part_files_count_studies_and_write_them_in_one_part_per_flush():
    written, checks = [], []
    writer = SimpleNamespace(write=lambda preds, errs, **more: written.append((preds, errs, more)))
    lock = SimpleNamespace(check=lambda: checks.append(True))
    parts = PartFiles(writer, lock)
    problem = pd.DataFrame({"study_id": ["x"], "stage": ["read"]})
    parts.add(StudyItem("1", predictions=study_rows("1"), errors=problem.iloc[:0]))
    parts.add(StudyItem("2", predictions=study_rows("2"), errors=problem.assign(study_id="2")))  # with a problem
    parts.add(StudyItem("3", errors=problem.assign(study_id="3")))  # failed as a whole
    assert (parts.n_scored, parts.n_with_errors, parts.n_failed, parts.rows, parts.pending) == (2, 1, 1, 50, 3)
    parts.flush()
    parts.flush()  # nothing pending: no empty part file, no lock check
    assert len(written) == 1 and len(checks) == 1
    preds, errs, more = written[0]
    assert len(preds) == 50 and len(errs) == 2
    # the worklist rows of the scored studies go in the same flush
    assert sorted(more["studies"]["study_id"]) == ["1", "2"]
    assert parts.pending == 0 and not parts.predictions and not parts.errors
