"""Models checked at load: a registry version whose weights do not fit the architecture its card
declares is refused before any study is scored, naming the file and the mismatch."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from lumbar_ray.config import SCORER, ScoreConfig, detector_job
from lumbar_ray.models.compat import IncompatibleModelError, check_version
from lumbar_ray.models.deepscorenet import SCORER_KIND, DeepScoreNet
from lumbar_ray.models.detector import build_detector, save_detector
from lumbar_ray.models.registry import ModelRegistry, RegistryError
from lumbar_ray.scoring.study import ModelBundle
from lumbar_ray.targets import SAGITTAL_T1, SAGITTAL_T2, SEVERITIES, detector_class_names

T1_JOB = detector_job(SAGITTAL_T1)


@pytest.fixture(scope="module", autouse=True)
def _ultralytics_offline(tmp_path_factory):
    """A private Ultralytics config dir for this test process (if nothing imported it yet)."""
    if "ultralytics" not in sys.modules:
        from lumbar_ray.models import ultralytics_env

        ultralytics_env.configure(tmp_path_factory.mktemp("ultralytics"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


def scorer_bytes(model: DeepScoreNet, **override) -> bytes:
    buffer = io.BytesIO()
    torch.save({"kind": SCORER_KIND, "state_dict": model.state_dict(), "in_channels": model.in_channels,
                "channels": "repeat", "crop_mm": None, "crop_px": 32, **override}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weight files: the right ones (a Sagittal T1 detector, DeepScoreNet) and tampered ones."""
    d = tmp_path_factory.mktemp("weights")
    save_detector(build_detector(SAGITTAL_T1, seed=0), d / "t1.pt")
    # Trained for Sagittal T2 (5 classes) but labelled as the Sagittal T1 detector.
    wrong = build_detector(SAGITTAL_T2, seed=0)
    wrong.series_type = SAGITTAL_T1
    save_detector(wrong, d / "t1_with_5_classes.pt")
    (d / "scorer.pt").write_bytes(scorer_bytes(DeepScoreNet(keras_init=False)))
    (d / "scorer_4_classes.pt").write_bytes(scorer_bytes(DeepScoreNet(num_classes=4, keras_init=False)))
    (d / "scorer_1_channel.pt").write_bytes(scorer_bytes(DeepScoreNet(in_channels=1, keras_init=False),
                                                         in_channels=3))
    return d


def publish(tmp_path, weights, *, detector: str | None = "t1.pt", scorer="scorer.pt", version="v1") -> ModelRegistry:
    """A registry version of one detector and the scorer; the card records each file's true
    sha256 (a re-published version), so only the architecture check can refuse it."""
    registry = ModelRegistry(str(tmp_path / "registry"))
    files = {f"{SCORER}.pt": weights / scorer}
    if detector is not None:  # None: a scorer-only version, when the detector is not what is tested
        files[f"{T1_JOB}.pt"] = weights / detector
    card = {"models": {job: f"{job}.pt" for job in (T1_JOB, SCORER) if f"{job}.pt" in files},
            "input_spec": {"scorer": {"in_channels": 3, "classes": list(SEVERITIES)},
                           "detectors": {T1_JOB: {"series_type": SAGITTAL_T1,
                                                  "classes": detector_class_names(SAGITTAL_T1)}}}}
    registry.publish(version, files, card)
    registry.verify(version)  # the checksums are right
    return registry


def test_a_fitting_version_passes(tmp_path, weights):
    registry = publish(tmp_path, weights)
    assert check_version(registry, "v1") == [f"{T1_JOB}.pt", f"{SCORER}.pt"]
    bundle = ModelBundle.from_registry(f"{registry.root}@v1", device="cpu", cache_dir=str(tmp_path / "cache"))
    assert set(bundle.detectors) == {SAGITTAL_T1} and bundle.scorer is not None


def test_detector_with_the_wrong_class_count_is_refused(tmp_path, weights):
    registry = publish(tmp_path, weights, detector="t1_with_5_classes.pt")
    with pytest.raises(IncompatibleModelError) as info:
        check_version(registry, "v1")
    message = str(info.value)
    assert f"versions/v1/{T1_JOB}.pt: not the Sagittal T1 detector the card declares" in message
    assert "5 classes, expected 10 (the Sagittal T1 targets)" in message
    assert "shape [5, " in message and "vs [10, " in message
    assert isinstance(info.value, RegistryError)
    with pytest.raises(IncompatibleModelError, match="5 classes, expected 10"):
        ModelBundle.from_registry(f"{registry.root}@v1", device="cpu", parts=("detectors",),
                                  cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("scorer, expected", [
    ("scorer_4_classes.pt", ["4 classes, expected 3", "head.6.weight: shape [4, 128] vs [3, 128] expected",
                             "2,787,780 parameters, expected 2,787,651"]),
    ("scorer_1_channel.pt", ["stem.0.weight: shape [32, 1, 3, 3] vs [32, 3, 3, 3] expected"]),
    ("t1.pt", ["not a DeepScoreNet: format (kind) None, expected 'deepscorenet'"]),
])
def test_scorer_that_does_not_fit_is_refused(tmp_path, weights, scorer, expected):
    registry = publish(tmp_path, weights, detector=None, scorer=scorer)
    with pytest.raises(IncompatibleModelError) as info:
        check_version(registry, "v1")
    assert f"versions/v1/{SCORER}.pt: " in str(info.value)
    for part in expected:
        assert part in str(info.value)
    # Every stage loads the scorer's file (the crop settings ride on it), so each refuses it.
    with pytest.raises(IncompatibleModelError, match=f"{SCORER}.pt"):
        ModelBundle.from_registry(f"{registry.root}@v1", device="cpu", parts=("scorer",),
                                  cache_dir=str(tmp_path / "cache"))


def test_scoring_run_refuses_before_writing(tmp_path, weights, monkeypatch):
    """run_scoring checks the version on the driver, before the output lock and any study."""
    from lumbar_ray.scoring import pipeline

    registry = publish(tmp_path, weights, detector="t1_with_5_classes.pt")
    monkeypatch.setattr(pipeline.ray, "is_initialized", lambda: True)  # nothing reaches Ray
    out = tmp_path / "scores"
    cfg = ScoreConfig(input=str(tmp_path / "no-data"), models=f"{registry.root}@v1", out=str(out))
    with pytest.raises(IncompatibleModelError, match=f"{T1_JOB}.pt: .*5 classes, expected 10"):
        pipeline.run_scoring(cfg, echo=lambda line: None)
    assert not out.exists()
