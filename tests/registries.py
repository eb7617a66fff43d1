"""Tiny model registries for tests of pointers, locks and decisions (the weights are placeholders)."""

from __future__ import annotations

from lumbar_ray.models.registry import ModelRegistry


def registry_with_versions(root, *versions) -> ModelRegistry:
    """A registry at ``root`` holding ``versions``, each with one placeholder weight file."""
    registry = ModelRegistry(str(root))
    for version in versions:
        weights = root.parent / f"{root.name}-{version}.pt"
        weights.write_bytes(version.encode())
        registry.publish(version, {"scorer.pt": weights}, {"metrics": {}})
    return registry


def untrained_registry(root, card: dict | None = None) -> str:
    """``REGISTRY@v1`` of untrained models (seeded) under ``root``: three detectors and DeepScoreNet
    whose files fit the card, so scoring runs every stage in seconds without a trained fixture.
    Untrained detectors score every box far below the usual threshold: the card takes them all
    (conf 1e-9), so every row depends on the pixels read. ``card``: more model-card entries."""
    import torch

    from lumbar_ray.config import SCORER, detector_job
    from lumbar_ray.models.deepscorenet import SCORER_KIND, DeepScoreNet
    from lumbar_ray.models.detector import build_detector, save_detector
    from lumbar_ray.targets import SERIES_TYPES, SEVERITIES, detector_class_names

    weights = root / "weights"
    weights.mkdir(parents=True)
    files, models, detectors = {}, {}, {}
    for series_type in SERIES_TYPES:
        job = detector_job(series_type)
        save_detector(build_detector(series_type, imgsz=64, seed=0), weights / f"{job}.pt")
        files[f"{job}.pt"], models[job] = weights / f"{job}.pt", f"{job}.pt"
        detectors[job] = {"series_type": series_type, "classes": detector_class_names(series_type)}
    torch.manual_seed(0)
    scorer = DeepScoreNet(keras_init=False)
    torch.save({"kind": SCORER_KIND, "state_dict": scorer.state_dict(), "in_channels": scorer.in_channels,
                "channels": "repeat", "crop_mm": None, "crop_px": 32}, weights / "scorer.pt")
    files[f"{SCORER}.pt"], models[SCORER] = weights / "scorer.pt", f"{SCORER}.pt"
    registry = ModelRegistry(str(root / "registry"))
    registry.publish("v1", files, {"models": models, "input_spec": {
        "scorer": {"in_channels": 3, "classes": list(SEVERITIES)}, "detectors": detectors},
        "config": {"detector": {"conf": 1e-9}}, **(card or {})})
    return f"{registry.root}@v1"
