"""A detector fold that collapses is retried with another seed and recorded; the retry stops
early and ships its best epoch (issue #16, item 3), on Ray with one small detector.

The collapse is injected from the test (a Ray worker setup hook, as in conftest.py): in every
first attempt the detector finds nothing on the studies it is graded on, and in every retry it
finds each labelled target where it is labelled. Validation therefore scores each retry's
rounds alike, so with patience 1 the retry stops after its second round and must ship its first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from lumbar_ray.config import DetectorConfig, ResourceConfig, TrainConfig, detector_job
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.targets import SAGITTAL_T1

pytestmark = [pytest.mark.slow, pytest.mark.ray]

JOB = detector_job(SAGITTAL_T1)


def blind_first_attempts(data_root: str):
    """A ``worker_process_setup_hook``: the graded detections of a trial's first attempt are
    none; a retry's (its run name ends ``-retryN``) are the labelled points themselves."""

    def install() -> None:
        import ray.train

        from lumbar_ray.metrics import labels as label_io
        from lumbar_ray.models.detector_inference import Detection
        from lumbar_ray.targets import TARGET_BY_NAME_LEVEL
        from lumbar_ray.training import detector_validation

        def detect(model, series, **kwargs):
            if "-retry" not in ray.train.get_context().get_experiment_name():
                return []
            coords = label_io.read_coordinates(data_root)
            own = coords[(coords["study_id"].astype(str) == str(series.study_id))
                         & (coords["series_id"].astype(str) == str(series.series_id))]
            found = []
            for row in own.itertuples(index=False):
                target = TARGET_BY_NAME_LEVEL[(row.condition, row.level)]
                if target.series_type == series.series_type and (series.instance_numbers == int(row.instance_number)).any():
                    found.append(Detection(target.detector_class_id, series.index_of_instance(int(row.instance_number)),
                                           int(row.instance_number), float(row.x), float(row.y), 0.9))
            return found

        detector_validation.detect_series = detect

    return install


@pytest.fixture(scope="module")
def ray_blind_first_attempts(synthetic_root):
    import ray

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    # a fresh runtime_env dict (conftest.with_setup_hook says why)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": blind_first_attempts(str(synthetic_root))})
    try:
        yield ray
    finally:
        ray.shutdown()


def test_a_collapsed_fold_is_retried_recorded_and_its_retry_ships_its_best_epoch(
        ray_blind_first_attempts, synthetic_root, tmp_path):
    from lumbar_ray.training.cv import run_training

    registry = tmp_path / "registry"
    cfg = TrainConfig(data=str(synthetic_root), registry=str(registry), folds=2, seed=0, final_fit=True,
                      models=("detector",),
                      detector=DetectorConfig(epochs=3, imgsz=64, batch_size=8, series_types=(SAGITTAL_T1,),
                                              val_every=1, patience=1, collapse_retries=1, final_check_studies=2),
                      resources=ResourceConfig(cpus_per_worker=1.0))
    outcome = run_training(cfg)
    card = ModelRegistry(str(registry)).manifest(outcome.version)["fold_outcomes"][JOB]
    for fold in ("fold0", "fold1"):
        folder = Path(outcome.artifacts) / JOB / fold
        history = json.loads((folder / "history.json").read_text())
        epochs = [(h["attempt"], h["epoch"]) for h in history if "event" not in h]
        # the blind first attempt had no best round to be patient about: it trained all 3 epochs;
        # the retry's second round did not beat its first, and patience 1 stopped it there
        assert epochs == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)], history
        retry = next(h for h in history if h.get("event") == "retry")
        assert retry["seed"] == 1000 and "collapsed" in retry["reason"] and "validation studies" in retry["reason"]
        assert history[-1] == {"event": "shipped", "attempt": 1, "seed": 1000, "collapsed": False}
        weights = torch.load(folder / f"{JOB}.pt", weights_only=True)
        assert weights["extra"]["epoch"] == 0 and weights["extra"]["seed"] == 1000  # the best epoch's weights
        records = pd.read_parquet(folder / "oof.parquet")
        assert records["detected"].all() and set(records["fold"]) == {int(fold[-1])}
        assert card[fold] | {"best_value": None} == {
            "selection_metric": "val_hit_5mm_3d", "best_epoch": 0, "best_value": None, "shipped_epoch": 0,
            "epochs_trained": 2, "stopped_early": True, "collapsed": False, "attempts": 2, "shipped_attempt": 1,
            "seed": 1000, "retry_reasons": card[fold]["retry_reasons"]}
        assert len(card[fold]["retry_reasons"]) == 1 and card[fold]["best_value"] > 0
    # the all-studies fit has no validation fold: a collapse check on its own training studies
    # caught the blind first attempt too, and the retry trained the whole schedule
    final = card["all"]
    assert final["attempts"] == 2 and final["shipped_attempt"] == 1 and not final["collapsed"]
    assert final["best_epoch"] is None and final["shipped_epoch"] == 2 and not final["stopped_early"]
    assert "training studies" in final["retry_reasons"][0]
    assert not (Path(outcome.artifacts) / JOB / "all" / "oof.parquet").exists()
