"""The GPU path, from the same config as the CPU one: training trials on the GPU and the scoring
pipeline's actors on the GPU (the on-device preprocessing is tested on CPU and CUDA in
test_detector.py). Skipped where there is no CUDA device (CI); run on a GPU machine with
``pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_training_then_gpu_pipeline_equals_in_process_loop(synthetic_root, tmp_path):
    """Train 2 folds x 1 epoch with trials on the GPU (a quarter GPU each, so they share it),
    then score with both actor pools on the GPU: the Ray pipeline equals the in-process loop on
    the same device."""
    from lumbar_ray.config import DetectorConfig, ResourceConfig, ScorerConfig, TrainConfig
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.outputs.store import read_predictions
    from lumbar_ray.config import ScoreConfig
    from lumbar_ray.scoring.pipeline import run_scoring
    from lumbar_ray.models.registry import ModelRegistry
    from lumbar_ray.runtime import ray_session
    from lumbar_ray.scoring.study import ModelBundle, score_in_process
    from lumbar_ray.training.cv import run_training

    registry = tmp_path / "registry"
    cfg = TrainConfig(
        data=str(synthetic_root), registry=str(registry), folds=2, seed=0, final_fit=False,
        scorer=ScorerConfig(epochs=1, batch_size=64), detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8),
        resources=ResourceConfig(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=1.0),
    )
    out = tmp_path / "scores"
    with ray_session(num_cpus=4, num_gpus=1):
        outcome = run_training(cfg)
        assert outcome.trials and all(t.metrics["device"].startswith("cuda") for t in outcome.trials)
        ModelRegistry(str(registry)).set_champion(outcome.version, reason="gpu test")
        summary = run_scoring(ScoreConfig(input=str(synthetic_root), models=str(registry), out=str(out),
                                          split="test", detector_gpus=0.5, scorer_gpus=0.5, flush_studies=2))
    ids = list_studies(str(synthetic_root), "test")
    assert summary.n_scored == len(ids) and summary.n_failed == 0
    preds = read_predictions(str(out))
    bundle = ModelBundle.from_registry(f"{registry}@{outcome.version}", device="cuda")
    reference, _ = score_in_process(bundle, str(synthetic_root), ids, split="test")
    merged = preds.merge(reference, on="row_id", suffixes=("", "_ref"))
    assert len(merged) == len(reference) == len(preds) == 25 * len(ids)
    assert (merged["detected"] == merged["detected_ref"]).all()
    for col in ("normal_mild", "moderate", "severe"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_ref"], atol=1e-5)
