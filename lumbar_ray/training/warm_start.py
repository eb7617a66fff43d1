"""Warm starts (`train --init-from REGISTRY[@VERSION]`): every model of a run starts from the
weights of a registry version instead of random ones, so scheduled retraining refines the
champion rather than starting over.

The driver reads each job's weights file once (checked against the version's manifest, like
scoring does), checks that it fits the run (same series type for a detector; same crop
channels and size for DeepScoreNet), and hands the bytes to the trials through the object
store; each worker loop loads them into its freshly built model before it resumes from its own
checkpoint (a resumed trial keeps its progress). A version that lacks a job's weights, or whose
weights do not fit, is refused before any trial starts, with one line saying why.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from lumbar_ray.config import SCORER, TrainConfig, series_type_of_job
from lumbar_ray.models.registry import ModelRegistry, RegistryError, parse_model_spec
from lumbar_ray.training.artifacts import weights_file

# `--init-from champion`: the champion of the registry the run publishes into.
CHAMPION_OF_OUT = "champion"


@dataclass(frozen=True)
class WarmStart:
    registry: str  # the registry's URL
    version: str  # resolved: never 'champion' or 'latest'
    weights: dict[str, bytes]  # job -> its weights file, as the registry holds it

    def card(self) -> dict[str, str]:
        """What the new version's model card records."""
        return {"registry": self.registry, "version": self.version}


def init_from_spec(init_from: str, out_registry: str) -> tuple[str, str | None]:
    """(registry, version or None for its champion) of an ``--init-from`` value."""
    if init_from == CHAMPION_OF_OUT:
        return out_registry, None
    return parse_model_spec(init_from)


def load_warm_start(cfg: TrainConfig) -> WarmStart:
    """The weights of every job of ``cfg`` from the version ``cfg.init_from`` names; raises
    :class:`RegistryError` when the version is unknown or a job's weights are missing or do not fit."""
    assert cfg.init_from, "load_warm_start needs cfg.init_from"
    root, version = init_from_spec(cfg.init_from, cfg.registry)
    registry = ModelRegistry(root)
    version = registry.resolve(version)
    files = registry.manifest(version).get("files", [])
    weights: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="lumbar-ray-init-") as scratch:
        for job in cfg.jobs():
            name = weights_file(job)
            if name not in files:
                raise RegistryError(f"--init-from {registry.url()}@{version}: the version has no {name} "
                                    f"to start {job} from; train that model from scratch (leave out --init-from)")
            weights[job] = registry.fetch(version, name, scratch).read_bytes()
    warm = WarmStart(registry.url(), version, weights)
    for job, data in warm.weights.items():
        check_fits(job, load_weights(data), cfg, f"{warm.registry}@{warm.version}")
    return warm


def load_weights(data: bytes) -> dict[str, Any]:
    """A weights file's dict (tensors and plain values only)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def check_fits(job: str, ckpt: Mapping[str, Any], cfg: TrainConfig, source: str) -> None:
    """Refuse weights that this run's model cannot start from."""
    if job == SCORER:
        wanted = {"channels": cfg.scorer.channels, "crop_mm": cfg.scorer.crop_mm}
        have = {k: ckpt.get(k) for k in wanted}
        if have != wanted:
            raise RegistryError(f"--init-from {source}: its DeepScoreNet was trained on crops {have}, "
                                f"this run cuts {wanted}; use the same --channels/--crop-mm or leave out --init-from")
        return
    series_type = series_type_of_job(job)
    if ckpt.get("series_type") not in (None, series_type):
        raise RegistryError(f"--init-from {source}: {weights_file(job)} is a {ckpt.get('series_type')} detector, "
                            f"not a {series_type} one")


def start_from(model: torch.nn.Module, data: bytes | None) -> None:
    """Load a warm start's weights into a freshly built model (nothing when ``data`` is None).
    Strict: a weights file of another architecture fails here, inside the trial, with both shapes."""
    if data is not None:
        model.load_state_dict(load_weights(data)["state_dict"], strict=True)
