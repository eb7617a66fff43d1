"""A study that kills its worker process is recorded, and the run goes on (issue #17, item 3).

The crash is injected from the tests (``crash_on_studies`` in conftest.py, a Ray worker setup
hook): detecting the poison study ends its process with ``os._exit``. Its batch is tried a bounded
number of times, dropped, and its studies scored one at a time: the poison study gets one
WorkerCrashed row, its batch-mates their rows, equal to a run without the crash.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lumbar_ray.config import ScoreConfig
from lumbar_ray.outputs.store import read_errors, read_predictions
from lumbar_ray.scoring.pipeline import WORKER_CRASHED, actor_crash_bounds
from lumbar_ray.targets import TARGETS

PROBS = ["normal_mild", "moderate", "severe"]


def test_crash_retries_and_actor_restarts_are_bounded():
    cfg = ScoreConfig(input="i", models="m", out="o", crash_retries=2)
    assert actor_crash_bounds(cfg, 10) == {"max_task_retries": 2, "max_restarts": 30}
    # Ray Data's defaults are -1 (for ever); never those, even with no retries asked for.
    assert actor_crash_bounds(ScoreConfig(input="i", models="m", out="o", crash_retries=0), 0) == {
        "max_task_retries": 0, "max_restarts": 1}


@pytest.fixture(scope="module")
def crash_inputs(tmp_path_factory):
    """(data root with 4 small synthetic test studies, untrained registry spec, study ids)."""
    from registries import untrained_registry

    from lumbar_ray.synth import writer as synth

    root = tmp_path_factory.mktemp("crash")
    synth.synthesize(str(root / "data"), n_studies=4, seed=51, split="test", size="small")
    return root / "data", untrained_registry(root), sorted(os.listdir(root / "data" / "test_images"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_study_that_kills_its_worker_is_recorded_and_the_others_are_scored(
        ray_runtime_crashing_studies, crash_inputs, tmp_path, capsys):
    from lumbar_ray.scoring import job as score_job

    _, markers = ray_runtime_crashing_studies
    data, models, study_ids = crash_inputs
    poison = study_ids[1]  # shares its read, detect and score batches with study_ids[0]

    def score(out) -> int:
        return score_job.main(score_job.get_args_parser().parse_args(
            ["--input", str(data), "--models", models, "--out", str(out), "--split", "test",
             "--read-batch-studies", "2", "--detector-batch-studies", "2", "--scorer-batch-studies", "2",
             "--flush-studies", "2", "--crash-retries", "1"]))

    (markers / "poison").write_text(poison + "\n")
    assert score(tmp_path / "clean") == 0  # not armed: no crash
    clean = read_predictions(tmp_path / "clean").set_index("row_id").sort_index()
    assert len(clean) == len(study_ids) * len(TARGETS)

    (markers / "armed").touch()
    try:
        capsys.readouterr()
        status = score(tmp_path / "crash")
    finally:
        (markers / "armed").unlink()
    out = capsys.readouterr()
    # A permanent failure, like a corrupt study: the run ends, exits 0 and names the study.
    assert status == 0
    assert "crashed: 1 studies killed their worker process" in out.err and poison in out.err
    assert "failed: 1" in out.out
    # Bounded: 2 tries of its batch in the pipeline, then 2 of the study alone (crash_retries 1).
    crashes = [f for f in os.listdir(markers) if f.startswith(f"crash-{poison}-")]
    assert len(crashes) == 4, crashes

    errors = read_errors(tmp_path / "crash")
    crashed = errors[errors["error_type"] == WORKER_CRASHED]
    assert list(crashed["study_id"]) == [poison]
    assert crashed["stage"].tolist() == ["detect"] and not crashed["retryable"].any()
    preds = read_predictions(tmp_path / "crash")
    assert poison not in set(preds["study_id"])
    others = [s for s in study_ids if s != poison]
    assert sorted(preds["study_id"].unique()) == others
    assert (preds.groupby("study_id").size() == len(TARGETS)).all() and preds["row_id"].is_unique
    preds = preds.set_index("row_id").sort_index()
    expected = clean[clean["study_id"] != poison]
    np.testing.assert_allclose(preds[PROBS].to_numpy(), expected[PROBS].to_numpy(), atol=1e-6)
    for column in ("flags", "detected", "series_id", "instance_number", "x", "y"):
        assert preds[column].equals(expected[column]), column
    # Recorded, so the next run of the same command skips it instead of crashing again.
    assert score(tmp_path / "crash") == 0
    assert "scoring 0" in capsys.readouterr().out
