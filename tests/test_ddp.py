"""Data-parallel training (`--workers-per-trial 2`, gloo on CPU) end to end: every trial runs two
DDP workers, the version is published, and its models score a study."""

from __future__ import annotations

import pytest

from lumbar_ray.config import SCORER, DetectorConfig, ResourceConfig, ScorerConfig, TrainConfig, detector_job
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.targets import SAGITTAL_T1

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_two_ddp_workers_per_trial_train_publish_and_score(ray_runtime, synthetic_root, tmp_path):
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.scoring.study import ModelBundle, score_in_process
    from lumbar_ray.training.cv import run_training

    registry = tmp_path / "registry"
    cfg = TrainConfig(data=str(synthetic_root), registry=str(registry), folds=2, seed=0, final_fit=False,
                      scorer=ScorerConfig(epochs=1, batch_size=64),
                      detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8, series_types=(SAGITTAL_T1,)),
                      resources=ResourceConfig(workers_per_trial=2, cpus_per_worker=1.0))
    outcome = run_training(cfg)
    jobs = {SCORER, detector_job(SAGITTAL_T1)}
    assert {(t.job, t.fold) for t in outcome.trials} == {(j, f) for j in jobs for f in (0, 1)}
    assert all(t.metrics["world_size"] == 2 for t in outcome.trials), [t.metrics.get("world_size") for t in outcome.trials]
    manifest = ModelRegistry(str(registry)).manifest(outcome.version)
    assert manifest["config"]["resources"]["workers_per_trial"] == 2
    # out-of-fold rows for every validation study of both folds: rank 0 validated each fold whole
    assert set(outcome.metric_table["model"]) >= {"deepscorenet_at_labelled_points", "deepscorenet_end_to_end",
                                                  "baseline_weighted_prior"}
    test_study = list_studies(str(synthetic_root), split="test")[0]
    bundle = ModelBundle.from_registry(f"{registry}@{outcome.version}")
    predictions, errors = score_in_process(bundle, str(synthetic_root), [test_study], split="test")
    assert len(predictions) == 25 and len(errors) == 0
