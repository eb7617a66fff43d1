"""The scoring pipeline's resource flags (``--read-cpus`` … ``--buffer-mb``): one definition for
`lumbar-ray score` / jobs/score.py and `make bench`, so that the two cannot drift apart."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from lumbar_ray.config import ScoreConfig

# (ScoreConfig field, argparse type, help): one flag each.
RESOURCE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("read_cpus", float, "CPUs per read/decode task"),
    ("read_batch_studies", int, "studies per read task"),
    ("detector_pool", int, "detector actors"),
    ("detector_cpus", float, "CPUs per detector actor"),
    ("detector_gpus", float, "GPUs per detector actor (0 = CPU)"),
    ("detector_batch_studies", int, "studies per detector call"),
    ("scorer_pool", int, "DeepScoreNet actors"),
    ("scorer_cpus", float, "CPUs per DeepScoreNet actor"),
    ("scorer_gpus", float, "GPUs per DeepScoreNet actor (0 = CPU)"),
    ("scorer_batch_studies", int, "studies per DeepScoreNet call (their crops in one pass)"),
    ("slice_batch", int, "slices per detector forward pass"),
    ("flush_studies", int, "studies per Parquet part file"),
    ("buffer_mb", float, "object-store MiB for blocks between stages (0 = Ray Data's default share)"),
)
RESOURCE_FIELDS = tuple(name for name, _, _ in RESOURCE_FLAGS)


def add_resource_args(parser, defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None) -> None:
    """Add ``--read-cpus`` … ``--buffer-mb`` to an argparse parser or group; defaults are
    ScoreConfig's unless ``defaults`` overrides them (e.g. None = decided later from --num-gpus)."""
    base = ScoreConfig(input="", models="", out="")
    defaults, helps = dict(defaults or {}), dict(helps or {})
    for name, kind, text in RESOURCE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults.get(name, getattr(base, name)),
                            help=helps.get(name, text))


def resource_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The resource settings of parsed arguments, as ScoreConfig keyword arguments."""
    return {name: getattr(args, name) for name in RESOURCE_FIELDS}
