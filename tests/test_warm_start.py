"""Warm starts (`train --init-from`): which versions a run may start from, that the weights reach
every model, and that retraining never starts from a version that saw its holdout studies."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from lumbar_ray.config import SCORER, DetectorConfig, ScorerConfig, TrainConfig, detector_job
from lumbar_ray.models.deepscorenet import DeepScoreNet
from lumbar_ray.models.detector import build_detector
from lumbar_ray.models.registry import ModelRegistry, RegistryError
from lumbar_ray.targets import SAGITTAL_T1, SERIES_TYPES
from lumbar_ray.training.retrain import fair_init_from
from lumbar_ray.training.warm_start import load_warm_start, start_from
from registries import untrained_registry

# untrained_registry's DeepScoreNet cuts 32-pixel crops with one slice repeated
FITTING_SCORER = ScorerConfig(crop_mm=None, channels="repeat")


def config(registry, init_from: str | None, **kwargs) -> TrainConfig:
    return TrainConfig(data="unused", registry=str(registry), init_from=init_from,
                       scorer=kwargs.pop("scorer", FITTING_SCORER), **kwargs)


def test_every_job_gets_its_weights_from_the_resolved_version(tmp_path):
    spec = untrained_registry(tmp_path / "src")
    warm = load_warm_start(config(tmp_path / "out", spec))
    assert warm.version == "v1" and warm.registry.endswith("src/registry")
    assert set(warm.weights) == {detector_job(s) for s in SERIES_TYPES} | {SCORER}
    source = ModelRegistry(spec.rsplit("@", 1)[0])
    for job, data in warm.weights.items():
        assert data == Path(source.version_path("v1", f"{job}.pt")).read_bytes()
    assert warm.card() == {"registry": warm.registry, "version": "v1"}


def test_champion_of_the_out_registry_and_refusals(tmp_path):
    spec = untrained_registry(tmp_path / "src")
    registry = spec.rsplit("@", 1)[0]
    with pytest.raises(RegistryError, match="has no champion"):
        load_warm_start(config(registry, "champion"))
    ModelRegistry(registry).set_champion("v1", reason="test")
    assert load_warm_start(config(registry, "champion")).version == "v1"
    with pytest.raises(RegistryError, match="no version 'v9'"):
        load_warm_start(config(registry, f"{registry}@v9"))
    # weights cut for other crops than this run's
    with pytest.raises(RegistryError, match="trained on crops"):
        load_warm_start(config(registry, spec, scorer=ScorerConfig(crop_mm=32.0)))


def test_a_version_without_a_jobs_weights_is_refused(tmp_path):
    spec = untrained_registry(tmp_path / "src")
    source = ModelRegistry(spec.rsplit("@", 1)[0])
    only_scorer = ModelRegistry(str(tmp_path / "scorer-only"))
    weights = tmp_path / "scorer.pt"
    weights.write_bytes(Path(source.version_path("v1", "scorer.pt")).read_bytes())
    only_scorer.publish("v2", {"scorer.pt": weights}, {})
    assert set(load_warm_start(config(tmp_path, f"{only_scorer.root}@v2", models=("scorer",))).weights) == {SCORER}
    with pytest.raises(RegistryError, match="has no detector_sagittal_t1.pt"):
        load_warm_start(config(tmp_path, f"{only_scorer.root}@v2"))


def test_start_from_loads_the_weights_and_refuses_another_architecture(tmp_path):
    warm = load_warm_start(config(tmp_path / "out", untrained_registry(tmp_path / "src")))
    net = DeepScoreNet(keras_init=False)
    start_from(net, warm.weights[SCORER])
    saved = torch.load(io.BytesIO(warm.weights[SCORER]), weights_only=True)["state_dict"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    detector = build_detector(SAGITTAL_T1, imgsz=64, seed=123)
    job = detector_job(SAGITTAL_T1)
    start_from(detector, warm.weights[job])
    saved = torch.load(io.BytesIO(warm.weights[job]), weights_only=True)["state_dict"]
    assert all(torch.equal(detector.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(RuntimeError):
        start_from(build_detector(SAGITTAL_T1, imgsz=64, seed=0), warm.weights[SCORER])
    untouched = DeepScoreNet(keras_init=False)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    start_from(untouched, None)
    assert all(torch.equal(untouched.state_dict()[k], v) for k, v in before.items())


def test_retrain_starts_only_from_versions_that_held_out_the_same_studies(tmp_path):
    spec = untrained_registry(tmp_path / "src")
    registry = spec.rsplit("@", 1)[0]
    said: list[str] = []
    rule = (0.2, "salt")
    cfg = config(registry, "champion", holdout_rule=rule)
    assert fair_init_from(cfg, [3, 4], said.append) is None  # no champion yet
    assert "no champion" in said[-1]
    ModelRegistry(registry).set_champion("v1", reason="test")
    # v1's card records no holdout rule and excluded nothing: it may have seen studies 3 and 4
    assert fair_init_from(cfg, [3, 4], said.append) is None
    assert "2 of the 2 holdout studies" in said[-1]
    assert fair_init_from(config(registry, None, holdout_rule=rule), [3, 4], said.append) is None

    def version_with(name: str, card_config: dict) -> None:
        source = ModelRegistry(registry)
        files = {f: source.version_path("v1", f) for f in source.manifest("v1")["files"]}
        source.publish(name, files, {**{k: v for k, v in source.manifest("v1").items()
                                       if k not in ("files", "sha256", "version")}, "config": card_config})

    version_with("v2", {"holdout_rule": list(rule), "exclude_studies": []})
    version_with("v3", {"holdout_rule": None, "exclude_studies": [3, 4, 9]})
    version_with("v4", {"holdout_rule": [0.3, "salt"], "exclude_studies": [3]})
    assert fair_init_from(config(registry, f"{registry}@v2", holdout_rule=rule), [3, 4], said.append).endswith("@v2")
    assert fair_init_from(config(registry, f"{registry}@v3", holdout_rule=rule), [3, 4], said.append).endswith("@v3")
    assert fair_init_from(config(registry, f"{registry}@v4", holdout_rule=rule), [3, 4], said.append) is None
    assert "1 of the 2 holdout studies" in said[-1]


@pytest.mark.slow
@pytest.mark.ray
def test_training_warm_started_from_the_champion_starts_from_its_weights(ray_runtime, synthetic_root, trained,
                                                                         tmp_path):
    """With a zero learning rate the shipped weights are the start version's: proof the weights
    reached every trial (BatchNorm statistics still move, so only learned parameters compare)."""
    from lumbar_ray.training.cv import run_training

    champion = ModelRegistry(trained.registry).champion()["version"]
    out = tmp_path / "registry"
    cfg = TrainConfig(data=str(synthetic_root), registry=str(out), folds=2, seed=1, final_fit=False,
                      init_from=f"{trained.registry}@champion",
                      scorer=ScorerConfig(epochs=1, batch_size=64, lr=0.0),
                      detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8, lr=0.0, series_types=(SAGITTAL_T1,)))
    outcome = run_training(cfg)
    manifest = ModelRegistry(str(out)).manifest(outcome.version)
    assert manifest["init_from"] == {"registry": ModelRegistry(trained.registry).url(), "version": champion}
    for job in (SCORER, detector_job(SAGITTAL_T1)):
        start = torch.load(Path(trained.registry, "versions", champion, f"{job}.pt"), weights_only=True)["state_dict"]
        shipped = torch.load(Path(out, "versions", outcome.version, f"{job}.pt"), weights_only=True)["state_dict"]
        learned = [k for k, v in start.items() if v.dtype.is_floating_point and "running" not in k]
        assert learned and all(torch.equal(shipped[k], start[k]) for k in learned), job
