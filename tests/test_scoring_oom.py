"""Per-study catches are narrow, and out of memory retries in smaller batches (issue #17, item 4).

In-process (no Ray): the detector and DeepScoreNet calls are monkeypatched to raise
``torch.cuda.OutOfMemoryError`` (constructible on a CPU) above a batch size, or a bug's error.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.dicom.errors import NotDicomError
from lumbar_ray.errors import StorageUnavailableError
from lumbar_ray.scoring.study import ModelBundle, halving_on_oom, is_study_failure, score_in_process

PROBS = ["normal_mild", "moderate", "severe"]


def _oom():
    import torch

    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="module")
def oom_inputs(tmp_path_factory):
    """(data root, one study id, CPU bundle of an untrained registry, the clean in-process result)."""
    from registries import untrained_registry

    from lumbar_ray.synth import writer as synth

    root = tmp_path_factory.mktemp("oom")
    synth.synthesize(str(root / "data"), n_studies=1, seed=41, split="test", size="small")
    bundle = ModelBundle.from_registry(untrained_registry(root), device="cpu")
    ids = sorted(os.listdir(root / "data" / "test_images"))
    return str(root / "data"), ids, bundle, score_in_process(bundle, str(root / "data"), ids)


def test_bad_study_errors_are_recorded_and_bugs_are_not():
    import torch

    recorded = [NotDicomError("x.dcm", "not DICOM"), FileNotFoundError("gone"), StorageUnavailableError("down"),
                ValueError("degenerate orientation"), IndexError("slice 9 of 4"), ZeroDivisionError(), MemoryError(),
                torch.cuda.OutOfMemoryError("oom")]
    bugs = [TypeError("bad call"), AttributeError("x"), KeyError("k"), NameError("n"), AssertionError(),
            RuntimeError("shape mismatch")]
    assert [e for e in recorded if not is_study_failure(e)] == []
    assert [e for e in bugs if is_study_failure(e)] == []


def test_halving_stops_at_one_and_only_on_out_of_memory():
    sizes = []

    def call(size):
        sizes.append(size)
        if size > 3:
            raise MemoryError
        return size

    assert halving_on_oom(call, 32, "t") == 2 and sizes == [32, 16, 8, 4, 2]

    def failing(exc):
        def call(size):
            sizes.append(size)
            raise exc
        return call

    sizes.clear()
    with pytest.raises(MemoryError):
        halving_on_oom(failing(MemoryError()), 5, "t")
    assert sizes == [5, 2, 1]
    sizes.clear()
    with pytest.raises(ValueError):
        halving_on_oom(failing(ValueError("bad")), 8, "t")
    assert sizes == [8]  # not retried


def _oom_above(limit: int, real, sizes: list[int]):
    """A stand-in for ``real`` (called with a ``batch_size`` keyword) that records each batch size
    in ``sizes`` and runs out of memory above ``limit``."""

    def call(*args, batch_size, **kwargs):
        sizes.append(batch_size)
        if batch_size > limit:
            raise _oom()
        return real(*args, batch_size=batch_size, **kwargs)

    return call


def _rows(result):
    preds, errors = result
    return preds.set_index("row_id").sort_index(), errors


@pytest.mark.slow  # several CPU passes of the detectors over a study
def test_detection_out_of_memory_retries_in_smaller_batches_with_equal_results(oom_inputs, monkeypatch):
    from lumbar_ray.models import detector_inference

    root, ids, bundle, clean = oom_inputs
    sizes = []
    monkeypatch.setattr(detector_inference, "detect_series",
                        _oom_above(4, detector_inference.detect_series, sizes))
    preds, errors = _rows(score_in_process(bundle, root, ids))
    expected, expected_errors = _rows(clean)
    assert sizes[:4] == [32, 16, 8, 4] and set(sizes) == {32, 16, 8, 4}
    np.testing.assert_allclose(preds[PROBS].to_numpy(), expected[PROBS].to_numpy(), atol=1e-6)
    assert preds["flags"].equals(expected["flags"]) and len(errors) == len(expected_errors)


@pytest.mark.slow  # several CPU passes of the detectors over a study
def test_detection_out_of_memory_in_batches_of_one_is_a_recorded_study_error(oom_inputs, monkeypatch):
    from lumbar_ray.models import detector_inference

    root, ids, bundle, _ = oom_inputs
    sizes = []
    monkeypatch.setattr(detector_inference, "detect_series", _oom_above(0, None, sizes))  # every batch size
    preds, errors = score_in_process(bundle, root, ids)
    assert preds.empty  # no prior-filled rows as if the series were bad
    assert sorted(errors["study_id"]) == ids and set(errors["error_type"]) == {"OutOfMemoryError"}
    assert set(errors["stage"]) == {"detect"} and sizes == [32, 16, 8, 4, 2, 1] * len(ids)


@pytest.mark.slow  # several CPU passes of the detectors over a study
def test_grading_out_of_memory_retries_then_is_recorded(oom_inputs, monkeypatch):
    from lumbar_ray.models import deepscorenet

    root, ids, bundle, clean = oom_inputs
    sizes = []
    monkeypatch.setattr(deepscorenet, "predict_proba", _oom_above(2, deepscorenet.predict_proba, sizes))
    preds, _ = _rows(score_in_process(bundle, root, ids))
    np.testing.assert_allclose(preds[PROBS].to_numpy(), _rows(clean)[0][PROBS].to_numpy(), atol=1e-6)
    assert sizes[:5] == [32, 16, 8, 4, 2]

    monkeypatch.setattr(deepscorenet, "predict_proba", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    preds, errors = score_in_process(bundle, root, ids)
    assert preds.empty and sorted(errors["study_id"]) == ids
    assert set(zip(errors["stage"], errors["error_type"])) == {("score", "MemoryError")}


@pytest.mark.slow  # several CPU passes of the detectors over a study
def test_a_bad_series_is_recorded_but_a_bug_propagates(oom_inputs, monkeypatch):
    from lumbar_ray.models import detector_inference

    root, ids, bundle, _ = oom_inputs
    monkeypatch.setattr(detector_inference, "detect_series",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError("zero-length orientation")))
    preds, errors = score_in_process(bundle, root, ids)
    assert sorted(preds["study_id"].unique()) == ids  # prior rows, flagged, with the reason recorded
    assert preds["flags"].str.contains("detect_failed").all()
    assert (errors["error_type"] == "ValueError").sum() >= len(ids)

    monkeypatch.setattr(detector_inference, "detect_series",
                        lambda *a, **k: (_ for _ in ()).throw(TypeError("unexpected keyword")))
    with pytest.raises(TypeError, match="unexpected keyword"):
        score_in_process(bundle, root, ids)


def test_pipeline_stages_record_bad_studies_and_raise_bugs(monkeypatch):
    from types import SimpleNamespace

    from lumbar_ray.scoring import pipeline

    stage = object.__new__(pipeline.DetectStage)
    stage.bundle, stage.slice_batch = SimpleNamespace(version="v1"), 32

    def batch():
        item = pipeline.StudyItem("7", study=SimpleNamespace(study_id="7"))
        return {"study_id": np.array(["7"]), "item": pipeline.object_array([item])}

    monkeypatch.setattr(pipeline, "detect_study", lambda *a, **k: (_ for _ in ()).throw(_oom()))
    item = stage(batch())["item"][0]
    assert item.error["error_type"] == "OutOfMemoryError" and item.error["retryable"] is False
    monkeypatch.setattr(pipeline, "detect_study", lambda *a, **k: (_ for _ in ()).throw(AttributeError("typo")))
    with pytest.raises(AttributeError):
        stage(batch())
    monkeypatch.setattr(pipeline, "read_study", lambda *a, **k: (_ for _ in ()).throw(TypeError("bug")))
    with pytest.raises(TypeError):
        pipeline.read_study_row({"study_id": 1}, "root", "test", None)

    scorer = object.__new__(pipeline.ScoreStage)
    scorer.bundle, scorer.run_id = SimpleNamespace(version="v1", priors={}, temperatures={}), "r"
    monkeypatch.setattr(pipeline, "grade_crops", lambda *a, **k: (_ for _ in ()).throw(_oom()))
    detected = SimpleNamespace(crops=np.zeros((2, 3, 32, 32), np.float32))
    item = pipeline.StudyItem("8", detected=detected)
    out = scorer({"study_id": np.array(["8"]), "item": pipeline.object_array([item])})["item"][0]
    assert out.predictions is None and out.errors["error_type"].tolist() == ["OutOfMemoryError"]
    assert out.errors["stage"].tolist() == ["score"] and isinstance(out.errors, pd.DataFrame)
    # crops are 32 x 32 whatever the study: out of memory grading them is not the study's fault,
    # so the row is retryable and the next run of the same command scores the study
    assert out.errors["retryable"].tolist() == [True]
