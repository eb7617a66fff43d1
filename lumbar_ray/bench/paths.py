"""The in-process ways of scoring that the benchmark measures: (b) the paper-style loop (one
forward call per slice and per crop), the batched predict it is checked against, (c) the
detectors alone; and a forward-call counter that proves how each batches.

The model functions are the package's own (:mod:`lumbar_ray.scoring.study`,
:mod:`lumbar_ray.models.detector_inference`, :mod:`lumbar_ray.models.deepscorenet`): no copy of them.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from lumbar_ray.dicom.read import load_descriptions, read_study
from lumbar_ray.scoring import study as scoring

log = logging.getLogger(__name__)

# The torch model modules are imported inside the functions that use them (heavy: torch): the
# phases import this module, and the pipeline phase's driver, whose memory is measured, must not
# carry torch.


class CallCounter:
    """Counts forward calls and items of modules (forward pre-hooks); ``remove()`` detaches."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.max_batch: dict[str, int] = {}
        self._handles: list = []

    def watch(self, name: str, module) -> "CallCounter":
        def hook(_module, args):
            n = int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 1
            self.calls[name] = self.calls.get(name, 0) + 1
            self.items[name] = self.items.get(name, 0) + n
            self.max_batch[name] = max(self.max_batch.get(name, 0), n)

        self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def watch_bundle(bundle, counter: CallCounter | None = None) -> CallCounter:
    """Count the detector (all series types together) and DeepScoreNet forward calls of a bundle."""
    from lumbar_ray.models.detector import unwrap_model  # heavy: torch (see above)

    counter = counter or CallCounter()
    for detector in bundle.detectors.values():
        counter.watch("detector", unwrap_model(detector))
    counter.watch("scorer", bundle.scorer)
    return counter


def per_crop_proba(model, crops: np.ndarray, device="cpu") -> np.ndarray:
    """DeepScoreNet probabilities with one forward call per crop (batch of 1), as the paper's
    predictor does; the package's :func:`deepscorenet.predict_proba` on each crop."""
    from lumbar_ray.models.deepscorenet import NUM_CLASSES, predict_proba  # heavy: torch (see above)

    parts = [predict_proba(model, crops[i : i + 1], batch_size=1, device=device) for i in range(len(crops))]
    return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def paper_style_predict(bundle, study):
    """One study the paper's way: every slice of each series through its detector one at a time
    (:func:`scoring.detect_study` with ``batch_size=1``: one forward call per slice), then one
    DeepScoreNet call per detected crop. Returns ``(DetectedStudy, probs)``."""
    detected = scoring.detect_study(bundle, study, batch_size=1)
    return detected, per_crop_proba(bundle.scorer, detected.crops, device=bundle.device)


def batched_predict(bundle, study, slice_batch: int = 32):
    """The same study the pipeline's way (all slices of a series in batches, all crops at once)."""
    detected = scoring.detect_study(bundle, study, batch_size=slice_batch)
    return detected, scoring.grade_crops(bundle, detected.crops)


def paper_style_loop(bundle, root: str, study_ids: Sequence[str], split: str = "test", run_id: str = "bench-paper",
                     out_parquet: str | None = None) -> tuple[int, int]:
    """(b): read each study, predict it the paper's way, make its 25 rows; write one Parquet file
    at the end when ``out_parquet`` is given. Returns ``(n_scored, n_failed)``."""
    descriptions = load_descriptions(root, split)
    now = pd.Timestamp.now(tz="UTC")
    frames = []
    failed = 0
    for study_id in study_ids:
        try:
            study = read_study(root, study_id, split=split, descriptions=descriptions)
            scoring.require_readable(study)
            detected, probs = paper_style_predict(bundle, study)
        except Exception as exc:  # counted, not raised: the other paths record and go on too
            log.warning("paper loop: study %s failed: %s", study_id, exc)
            failed += 1
            continue
        frames.append(scoring.study_rows(detected, probs, bundle.version, bundle.priors, run_id, now,
                                         bundle.temperatures))
    if out_parquet and frames:
        pd.concat(frames, ignore_index=True).to_parquet(out_parquet, index=False)
    return len(frames), failed


def detectors_alone(bundle, studies: Sequence, slice_batch: int = 32) -> int:
    """(c): every series of every preloaded study through its detector, batched as in the
    pipeline (:func:`lumbar_ray.models.detector_inference.detect_series`). Returns the number of slices."""
    from lumbar_ray.models.detector_inference import detect_series  # heavy: torch (see above)

    n = 0
    for study in studies:
        for series_type, series in study.series.items():
            model = bundle.detectors.get(series_type)
            if model is None:
                continue
            detect_series(model, series, conf=bundle.detector_conf, device=bundle.device, batch_size=slice_batch)
            n += series.n_slices
    return n
