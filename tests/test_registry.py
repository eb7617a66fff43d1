import json

import pytest

from lumbar_ray.models.registry import (
    ChecksumMismatchError,
    ModelRegistry,
    RegistryError,
    new_version_id,
    parse_model_spec,
)


def _publish(registry: ModelRegistry, tmp_path, version: str, payload: bytes = b"weights-v1"):
    weights = tmp_path / f"{version}-scorer.pt"
    weights.write_bytes(payload)
    table = tmp_path / f"{version}-folds.parquet"
    table.write_bytes(b"not-a-weight")
    return registry.publish(version, {"scorer.pt": weights, "folds.parquet": table}, {"metrics": {"score": 0.5}})


def test_publish_records_sha256_of_weights_only(tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    manifest = _publish(registry, tmp_path, "v1")
    assert set(manifest["sha256"]) == {"scorer.pt"}
    assert manifest["files"] == ["folds.parquet", "scorer.pt"]
    on_disk = json.loads((tmp_path / "reg/versions/v1/manifest.json").read_text())
    assert on_disk["sha256"]["scorer.pt"] == manifest["sha256"]["scorer.pt"]
    assert registry.versions() == ["v1"]


def test_fetch_verifies_and_refuses_tampered_weights(tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    _publish(registry, tmp_path, "v1")
    got = registry.fetch("v1", "scorer.pt", tmp_path / "dl")
    assert got.read_bytes() == b"weights-v1"
    registry.verify("v1")
    (tmp_path / "reg/versions/v1/scorer.pt").write_bytes(b"weights-v1 but changed")
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        registry.fetch("v1", "scorer.pt", tmp_path / "dl2")
    with pytest.raises(ChecksumMismatchError):
        registry.verify("v1")


def test_unfinished_version_without_manifest_is_not_listed(tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    (tmp_path / "reg/versions/v0").mkdir(parents=True)
    (tmp_path / "reg/versions/v0/scorer.pt").write_bytes(b"half an upload")
    _publish(registry, tmp_path, "v1")
    assert registry.versions() == ["v1"]
    with pytest.raises(RegistryError):
        registry.resolve("v0")


def test_champion_pointer_and_resolution(tmp_path):
    registry = ModelRegistry(str(tmp_path / "reg"))
    with pytest.raises(RegistryError, match="no champion"):
        registry.resolve(None)
    _publish(registry, tmp_path, "v1")
    _publish(registry, tmp_path, "v2", b"weights-v2")
    assert registry.resolve("latest") == "v2"
    registry.set_champion("v1", reason="test")
    assert registry.resolve(None) == "v1"
    assert registry.resolve("champion") == "v1"
    assert registry.champion()["reason"] == "test"
    with pytest.raises(RegistryError):
        registry.set_champion("v9", reason="unknown version")
    assert registry.resolve(None) == "v1"
    # no temporary files are left beside the pointer
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["champion.json", "versions"]


def test_parse_model_spec_and_version_ids():
    assert parse_model_spec("s3://bucket/models@v1") == ("s3://bucket/models", "v1")
    assert parse_model_spec("/models") == ("/models", None)
    assert parse_model_spec("/models@champion") == ("/models", "champion")
    with pytest.raises(RegistryError):
        parse_model_spec("/models@")
    a, b = new_version_id(), new_version_id()
    assert a != b and a.startswith("v")
