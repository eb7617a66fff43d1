"""Do a registry version's weight files fit the architecture its card declares?

A weight file whose sha256 matches its manifest can still be the wrong model: a detector trained
for another series type (5 classes where the targets table has 10), a checkpoint of another
format, a DeepScoreNet with another head. Loaded as is, such a file either fails inside every
scoring actor or, worse, scores studies with wrong results. These checks compare each file with
what the card and the targets table declare (format, series type, class count and names, every
state-dict key and shape, DeepScoreNet's parameter count) and raise
:class:`IncompatibleModelError` naming the file and the first mismatches. The scoring driver runs
:func:`check_version` before any study is scored; :class:`lumbar_ray.scoring.study.ModelBundle`
runs the per-file checks on what it loads.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from typing import Any

from lumbar_ray.config import SCORER, series_type_of_job
from lumbar_ray.models.registry import ModelRegistry, RegistryError
from lumbar_ray.targets import SEVERITIES, detector_class_names

__all__ = [
    "IncompatibleModelError",
    "check_detector_checkpoint",
    "check_scorer_payload",
    "check_version",
    "read_weights",
    "state_dict_mismatches",
]

_LISTED = 3  # keys named per kind of mismatch; the message says how many there are


class IncompatibleModelError(RegistryError):
    """A weight file of a registry version does not fit the architecture its card declares."""


def _some(values: list[str]) -> str:
    more = f", +{len(values) - _LISTED} more" if len(values) > _LISTED else ""
    return ", ".join(values[:_LISTED]) + more


def state_dict_mismatches(expected: Mapping[str, Any], loaded: Mapping[str, Any]) -> list[str]:
    """How ``loaded`` (a state dict) differs from ``expected`` (the reference model's state
    dict): missing keys, unexpected keys, and each key whose shape differs (loaded vs expected)."""
    problems = []
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing keys ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
    for key, ref in expected.items():
        if key in loaded:
            got = tuple(getattr(loaded[key], "shape", ()))
            if got != tuple(ref.shape):
                problems.append(f"{key}: shape {list(got)} vs {list(ref.shape)} expected")
    return problems


def _refuse(file: str, what: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:_LISTED + 2]
        more = f"; +{len(problems) - len(shown)} more mismatches" if len(problems) > len(shown) else ""
        raise IncompatibleModelError(f"{file}: {what}: " + "; ".join(shown) + more)


def read_weights(path, file: str | None = None) -> dict[str, Any]:
    """A weight file as saved by training (tensors and plain values: ``weights_only=True``);
    IncompatibleModelError when it is not one. ``file`` names it in the message."""
    import torch  # heavy: only where weights are read

    file = file or str(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of anything else, a truncated file, not torch at all
        raise IncompatibleModelError(f"{file}: not a weights file that loads with torch.load(weights_only=True): "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(payload, Mapping) or not isinstance(payload.get("state_dict"), Mapping):
        raise IncompatibleModelError(f"{file}: format: expected a dict with a state_dict, got {type(payload).__name__}")
    return dict(payload)


def check_detector_checkpoint(ckpt: Mapping[str, Any], file: str, series_type: str,
                              declared: Mapping[str, Any] | None = None) -> None:
    """Refuse a detector checkpoint that is not the one for ``series_type``: format, series
    type, class count and names (the targets table's, and the card's ``declared``
    ``input_spec.detectors[job]`` if given), and every state-dict key and shape against the
    model its own YAML builds with the targets table's class count."""
    # heavy: torch and Ultralytics, only where a detector is checked
    from lumbar_ray.models.detector import CHECKPOINT_FORMAT, import_ultralytics

    if ckpt.get("format") != CHECKPOINT_FORMAT:
        _refuse(file, f"not a {series_type} detector", [f"format {ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"])
    names = detector_class_names(series_type)
    problems = []
    if ckpt.get("series_type") != series_type:
        problems.append(f"series type {ckpt.get('series_type')!r}, expected {series_type!r}")
    if ckpt.get("nc") != len(names):
        problems.append(f"{ckpt.get('nc')} classes, expected {len(names)} (the {series_type} targets)")
    elif {int(k): str(v) for k, v in (ckpt.get("names") or {}).items()} != names:
        problems.append(f"class names differ from the targets table's ({names[0]!r}, ...)")
    declared_classes = (declared or {}).get("classes")
    if declared_classes is not None and {int(k): str(v) for k, v in declared_classes.items()} != names:
        problems.append(f"the card declares {len(declared_classes)} classes that differ from the targets table's")
    DetectionModel, _, _, _ = import_ultralytics()
    try:
        reference = DetectionModel(copy.deepcopy(ckpt["yaml"]), ch=3, nc=len(names), verbose=False)
    except Exception as exc:  # no YAML, or one Ultralytics cannot build
        problems.append(f"its architecture (yaml) does not build: {type(exc).__name__}: {exc}")
    else:
        problems += state_dict_mismatches(reference.state_dict(), ckpt["state_dict"])
    _refuse(file, f"not the {series_type} detector the card declares", problems)


def check_scorer_payload(payload: Mapping[str, Any], file: str, declared: Mapping[str, Any] | None = None) -> None:
    """Refuse a DeepScoreNet file that is not the declared one: format (``kind``), input channels
    (the card's ``input_spec.scorer.in_channels`` if given), the 3 severity classes, every
    state-dict key and shape, and the parameter count (2,787,651 at 3 input channels)."""
    # heavy: torch, only where a scorer is checked
    from lumbar_ray.models.deepscorenet import NUM_CLASSES, SCORER_KIND, DeepScoreNet, count_parameters

    if payload.get("kind") != SCORER_KIND:
        _refuse(file, "not a DeepScoreNet", [f"format (kind) {payload.get('kind')!r}, expected {SCORER_KIND!r}"])
    problems = []
    in_channels = payload.get("in_channels")
    declared = declared or {}
    if not isinstance(in_channels, int) or in_channels < 1:
        _refuse(file, "not a DeepScoreNet", [f"in_channels {in_channels!r}"])
    if declared.get("in_channels") is not None and declared["in_channels"] != in_channels:
        problems.append(f"{in_channels} input channels, the card declares {declared['in_channels']}")
    if declared.get("classes") is not None and list(declared["classes"]) != list(SEVERITIES):
        problems.append(f"the card declares classes {list(declared['classes'])}, expected {list(SEVERITIES)}")
    state = payload["state_dict"]
    head = state.get("head.6.weight")
    if head is not None and tuple(head.shape)[:1] != (NUM_CLASSES,):
        problems.append(f"{tuple(head.shape)[0]} classes, expected {NUM_CLASSES} ({', '.join(SEVERITIES)})")
    reference = DeepScoreNet(in_channels=in_channels, keras_init=False)
    problems += state_dict_mismatches(reference.state_dict(), state)
    expected_count = count_parameters(reference).keras_total
    count = sum(int(v.numel()) for k, v in state.items() if not k.endswith("num_batches_tracked") and hasattr(v, "numel"))
    if count != expected_count:
        problems.append(f"{count:,} parameters, expected {expected_count:,}")
    _refuse(file, "not the DeepScoreNet the card declares", problems)


def check_version(registry: ModelRegistry, version: str) -> list[str]:
    """Fetch every weight file of ``version`` (sha256 checked) and check it against the card
    (see the module doc); returns the checked files' names. IncompatibleModelError on the first
    file that does not fit, or when the card names no scorer or a model this code does not know."""
    manifest = registry.manifest(version)
    models = manifest.get("models") or {}
    if SCORER not in models:
        raise IncompatibleModelError(f"registry version {version} has no scorer (models: {sorted(models)})")
    spec = manifest.get("input_spec") or {}
    with tempfile.TemporaryDirectory(prefix="lumbar-ray-check-") as local:
        for job, name in sorted(models.items()):
            file = registry.url("versions", version, name)
            payload = read_weights(registry.fetch(version, name, local), file)
            if job == SCORER:
                check_scorer_payload(payload, file, spec.get("scorer"))
                continue
            try:
                series_type = series_type_of_job(job)
            except KeyError:
                raise IncompatibleModelError(f"{file}: the card lists it as model {job!r}, which this code "
                                             "does not know") from None
            check_detector_checkpoint(payload, file, series_type, (spec.get("detectors") or {}).get(job))
    return sorted(models.values())
