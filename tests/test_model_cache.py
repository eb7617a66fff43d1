"""Model cache folders (issue #17, item 8): a bundle's weight files pass through a temp folder of
its own that is gone once the bundle has loaded (or failed to), so no actor, however it ends,
leaves a copy of the weights behind. The Ray side (pipeline actors) is checked after the scoring
run of tests/test_phi.py."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
import torch

from lumbar_ray.config import SCORER
from lumbar_ray.models.compat import IncompatibleModelError
from lumbar_ray.models.deepscorenet import SCORER_KIND, DeepScoreNet
from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.scoring.study import MODEL_CACHE_PREFIX, ModelBundle
from lumbar_ray.targets import SEVERITIES


def scorer_only_registry(root: Path, num_classes: int = len(SEVERITIES)) -> ModelRegistry:
    """A registry with version v1 holding an untrained DeepScoreNet (no detectors: the cache is
    what is tested, not detection); ``num_classes`` other than 3 makes a version that is refused."""
    model = DeepScoreNet(num_classes=num_classes, keras_init=False)
    buffer = io.BytesIO()
    torch.save({"kind": SCORER_KIND, "state_dict": model.state_dict(), "in_channels": model.in_channels,
                "channels": "repeat", "crop_mm": None, "crop_px": 32}, buffer)
    weights = root.parent / f"{root.name}-scorer.pt"
    weights.write_bytes(buffer.getvalue())
    registry = ModelRegistry(str(root))
    registry.publish("v1", {f"{SCORER}.pt": weights},
                     {"models": {SCORER: f"{SCORER}.pt"},
                      "input_spec": {"scorer": {"in_channels": 3, "classes": list(SEVERITIES)}}})
    return registry


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """This test's own temp dir (tempfile's), so that other runs on the machine do not count;
    and a record of every folder a weight file was fetched into, to see the folder was used."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    fetched_into: list[Path] = []
    fetch = ModelRegistry.fetch

    def recording_fetch(self, version, name, dest_dir):
        fetched_into.append(Path(dest_dir))
        return fetch(self, version, name, dest_dir)

    monkeypatch.setattr(ModelRegistry, "fetch", recording_fetch)
    return temp, fetched_into


def test_loading_leaves_no_model_folder_in_the_temp_dir(tmp_path, temp_dir):
    temp, fetched_into = temp_dir
    registry = scorer_only_registry(tmp_path / "registry")
    bundle = ModelBundle.from_registry(f"{registry.root}@v1", device="cpu")
    assert bundle.scorer is not None and bundle.version == "v1"
    # The weights went through a folder of ours in this temp dir ...
    assert fetched_into and all(d.parent.parent == temp and d.parent.name.startswith(MODEL_CACHE_PREFIX)
                                for d in fetched_into), fetched_into
    # ... which is gone, while the loaded model still works.
    assert list(temp.iterdir()) == []
    with torch.no_grad():
        assert bundle.scorer(torch.zeros(1, 3, 32, 32)).shape[-1] == len(SEVERITIES)


def test_a_refused_version_leaves_no_model_folder_either(tmp_path, temp_dir):
    temp, fetched_into = temp_dir
    registry = scorer_only_registry(tmp_path / "registry", num_classes=4)
    with pytest.raises(IncompatibleModelError, match="4 classes, expected 3"):
        ModelBundle.from_registry(f"{registry.root}@v1", device="cpu", parts=("scorer",))
    assert fetched_into and list(temp.iterdir()) == []


def test_a_cache_dir_given_by_the_caller_is_kept(tmp_path, temp_dir):
    temp, _ = temp_dir
    registry = scorer_only_registry(tmp_path / "registry")
    cache = tmp_path / "cache"
    ModelBundle.from_registry(f"{registry.root}@v1", device="cpu", cache_dir=str(cache))
    assert (cache / "v1" / f"{SCORER}.pt").is_file()
    assert list(temp.iterdir()) == []
