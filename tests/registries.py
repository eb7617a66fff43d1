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
