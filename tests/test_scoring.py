"""Bulk scoring on Ray Data, end to end on small synthetic studies (CPU, 2 cores)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lumbar_ray.outputs.store import part_paths, read_errors, read_predictions
from lumbar_ray.config import ScoreConfig
from lumbar_ray.scoring.pipeline import run_scoring
from lumbar_ray.targets import TARGETS

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]


def _score(root, registry, out, **kw):
    return run_scoring(ScoreConfig(input=str(root), models=str(registry), out=str(out), split="test",
                                   flush_studies=2, **kw))


def _test_ids(root):
    from lumbar_ray.dicom.read import list_studies

    return list_studies(str(root), "test")


def test_pipeline_end_to_end_and_equal_to_in_process_loop(ray_runtime, synthetic_root, trained, tmp_path):
    out = tmp_path / "scores"
    summary = _score(synthetic_root, trained.registry, out)
    ids = _test_ids(synthetic_root)
    preds = read_predictions(str(out))
    assert summary.n_scored == len(ids) and summary.n_failed == 0
    assert sorted(preds["study_id"].unique()) == sorted(ids)
    assert (preds.groupby("study_id").size() == len(TARGETS)).all()
    assert preds["row_id"].is_unique
    np.testing.assert_allclose(preds[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0, atol=1e-5)
    assert (preds["model_version"] == trained.version).all()

    # The same models and studies through a plain in-process loop give the same probabilities.
    from lumbar_ray.scoring.study import ModelBundle, score_in_process

    bundle = ModelBundle.from_registry(f"{trained.registry}@{trained.version}", device="cpu")
    # One torch thread, as in the actors (Ray sets their OMP_NUM_THREADS to their 1 CPU): the
    # convolutions' float sums depend on how threads split them, which moves a detected point by
    # ~1e-5 px and a probability by up to ~1e-5 — not a difference between the two paths.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, _ = score_in_process(bundle, str(synthetic_root), ids, split="test")
    finally:
        torch.set_num_threads(threads)
    merged = preds.merge(reference, on="row_id", suffixes=("", "_ref"))
    assert len(merged) == len(reference) == len(preds)
    for col in ("normal_mild", "moderate", "severe"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_ref"], atol=1e-5)
    assert (merged["detected"] == merged["detected_ref"]).all()
    # Undetected targets carry the model's stored prior, flagged.
    undetected = preds[~preds["detected"]]
    if len(undetected):
        assert undetected["confidence"].isna().all()

    # Rerun on the same output: nothing new, nothing doubled.
    again = _score(synthetic_root, trained.registry, out)
    assert again.n_scored == 0 and again.n_skipped_done == len(ids)
    assert len(read_predictions(str(out))) == len(preds)


def test_stage_bundles_load_only_their_part_and_score_the_same(synthetic_root, trained):
    """The detector actors load no DeepScoreNet and the scorer actors no detector (nor
    Ultralytics): together they give what the whole bundle gives."""
    from lumbar_ray.dicom.read import read_study
    from lumbar_ray.scoring.study import ModelBundle, detect_study, grade_crops

    spec = f"{trained.registry}@{trained.version}"
    whole = ModelBundle.from_registry(spec, device="cpu")
    detect_part = ModelBundle.from_registry(spec, device="cpu", parts=("detectors",))
    score_part = ModelBundle.from_registry(spec, device="cpu", parts=("scorer",))
    assert detect_part.scorer is None and set(detect_part.detectors) == set(whole.detectors)
    assert score_part.detectors == {} and score_part.scorer is not None
    assert (detect_part.channels, detect_part.crop_mm) == (whole.channels, whole.crop_mm)
    assert score_part.priors == whole.priors and score_part.version == whole.version

    study = read_study(str(synthetic_root), _test_ids(synthetic_root)[0], split="test")
    expected = detect_study(whole, study)
    got = detect_study(detect_part, study)
    assert [h.detected for h in got.hits] == [h.detected for h in expected.hits]
    np.testing.assert_array_equal(got.crops, expected.crops)
    assert len(got.crops), "the tiny test models should detect something in a test study"
    np.testing.assert_array_equal(grade_crops(score_part, got.crops), grade_crops(whole, expected.crops))
    # Profiling (bench_stages --models) times each step and changes nothing.
    timings: dict[str, float] = {}
    profiled = detect_study(detect_part, study, timings=timings)
    np.testing.assert_array_equal(profiled.crops, expected.crops)
    assert {"preprocess", "forward", "candidates", "boxes", "select + crop"} <= set(timings)
    assert all(seconds >= 0 for seconds in timings.values())
    with pytest.raises(RuntimeError, match="without its scorer"):
        grade_crops(detect_part, got.crops)
    with pytest.raises(RuntimeError, match="without its detectors"):
        detect_study(score_part, study)
    assert (whole.parts, detect_part.parts, score_part.parts) == (("detectors", "scorer"), ("detectors",), ("scorer",))
    with pytest.raises(ValueError, match="parts"):
        ModelBundle.from_registry(spec, parts=("scorer", "tokenizer"))

    # In a fresh process (as in a scorer actor), loading the scorer imports no Ultralytics.
    code = ("import sys; from lumbar_ray.scoring.study import ModelBundle; "
            f"ModelBundle.from_registry({spec!r}, device='cpu', parts=('scorer',)); "
            "print('ultralytics' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_dataset_settings_reach_this_dataset_only(ray_runtime):
    import ray

    from lumbar_ray.scoring.pipeline import build_dataset

    before = ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    capped = build_dataset(ScoreConfig(input="x", models="m", out="o", buffer_mb=512), ["1", "2"], "r", None)
    assert capped.context.execution_options.resource_limits.object_store_memory == 512 * 2**20
    default = build_dataset(ScoreConfig(input="x", models="m", out="o", buffer_mb=0), ["1"], "r", None)
    assert default.context.execution_options.resource_limits.object_store_memory == before
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == before
    # StudyItems travel as pickled objects on purpose (no "Failed to convert column" warning)
    assert capped.context.enable_fallback_to_arrow_object_ext_type is True


def test_bad_input_never_crashes_and_nothing_is_lost(ray_runtime, synthetic_root, trained, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(synthetic_root, root)
    ids = _test_ids(root)
    images = root / "test_images"
    series_of = {s: sorted(p for p in (images / s).iterdir()) for s in ids}
    # 1: garbage and empty files inside a series
    (series_of[ids[0]][0] / "999.dcm").write_bytes(b"this is not DICOM")
    (series_of[ids[0]][1] / "998.dcm").write_bytes(b"")
    # 2: a truncated slice
    victim = sorted(series_of[ids[1]][0].glob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:400])
    # 3: a whole series missing
    shutil.rmtree(series_of[ids[2]][2])
    # 4: an absurd declared image size in every slice of one series
    import pydicom

    for path in series_of[ids[3]][0].glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.Rows = 60000
        ds.save_as(path)
    # 5: a study folder with nothing readable at all
    for series in series_of[ids[4]]:
        shutil.rmtree(series)
    (images / ids[4] / "junk.txt").write_text("nothing here")

    out = tmp_path / "scores"
    summary = _score(root, trained.registry, out)
    preds, errors = read_predictions(str(out)), read_errors(str(out))
    scored, errored = set(preds["study_id"]), set(errors["study_id"])
    assert set(ids) == scored | errored, "every input study ends up in predictions or errors"
    assert ids[4] not in scored and ids[4] in errored  # nothing readable: an error row with the reason
    for sid in ids[:4]:  # partially bad: rows were still produced, flagged, with the reasons recorded
        assert sid in scored and sid in errored
        assert (preds.loc[preds["study_id"] == sid, "flags"] != "").all()
    assert summary.n_failed == 1
    reasons = " ".join(errors["message"].astype(str))
    assert "Axial T2" in reasons or "Sagittal" in reasons  # the missing series is named
    assert {"read"} <= set(errors["stage"])
    assert (preds.groupby("study_id").size() == len(TARGETS)).all()


def test_scoring_from_and_to_s3_equals_local(ray_runtime, synthetic_root, trained, tmp_path, s3_env):
    import fsspec

    from lumbar_ray.storage import filesystem_for

    fs, _ = filesystem_for(f"s3://{s3_env.bucket}/x")
    prefix = f"{s3_env.bucket}/rsna"
    fs.put(str(synthetic_root / "test_images"), f"{prefix}/test_images", recursive=True)
    fs.put_file(str(synthetic_root / "test_series_descriptions.csv"), f"{prefix}/test_series_descriptions.csv")
    s3_out = f"s3://{s3_env.bucket}/scores"
    # Ray workers inherit the driver's environment only through the runtime env: pass the endpoint.
    remote = _score(f"s3://{prefix}", trained.registry, s3_out)
    local = _score(synthetic_root, trained.registry, tmp_path / "local")
    assert remote.n_scored == local.n_scored == len(_test_ids(synthetic_root))
    a = read_predictions(s3_out).sort_values("row_id").reset_index(drop=True)
    b = read_predictions(str(tmp_path / "local")).sort_values("row_id").reset_index(drop=True)
    assert list(a["row_id"]) == list(b["row_id"])
    np.testing.assert_allclose(a[["normal_mild", "moderate", "severe"]], b[["normal_mild", "moderate", "severe"]],
                               atol=1e-6)
    assert fsspec  # imported for the s3 protocol registration


def test_second_run_on_an_output_in_use_is_refused(ray_runtime, synthetic_root, trained, tmp_path, capsys):
    """Two runs on one output would score the same studies twice (and on 2 CPUs their actor pools
    can wait for each other for ever): the second one is refused before it scores anything."""
    from lumbar_ray.scoring import job as score_job
    from lumbar_ray.scoring.output_lock import OutputBusy, OutputLock

    out = tmp_path / "scores"
    with OutputLock(out, "first-run"):
        with pytest.raises(OutputBusy, match="first-run"):
            _score(synthetic_root, trained.registry, out)
        args = score_job.get_args_parser().parse_args(["--input", str(synthetic_root), "--models", str(trained.registry),
                                                       "--out", str(out), "--split", "test"])
        assert score_job.main(args) == score_job.EXIT_OUTPUT_BUSY
        assert "scoring run 'first-run'" in capsys.readouterr().err
    assert not part_paths(str(out))


def test_killed_run_keeps_what_it_wrote_and_rerun_adds_no_duplicates(synthetic_root, trained, tmp_path):
    out = tmp_path / "scores"
    cmd = [sys.executable, str(REPO / "jobs" / "score.py"), "--input", str(synthetic_root), "--models",
           str(trained.registry), "--out", str(out), "--split", "test", "--flush-studies", "1", "--scorer-batch-studies", "1",
           # one study a read, so that studies reach the output one by one and the kill can land
           # between them (with 4 a read, all 6 can arrive in one burst)
           "--read-batch-studies", "1", "--num-cpus", "2"]
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    ids = _test_ids(synthetic_root)
    logs = []
    killed = False
    # A run that dies on start-up (before scoring anything: e.g. a Ray port taken by a neighbour
    # on a shared machine, or Ray's fixed 30 s wait for its raylet under a heavy load) is retried
    # up to four times; its logs go into the failure message if all fail.
    for attempt in range(5):
        log_path = tmp_path / f"score-{attempt}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=log_file,
                                    stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 300
                while time.time() < deadline and proc.poll() is None:
                    if part_paths(str(out)):
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                        break
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        logs.append(f"attempt {attempt}: rc {proc.returncode}\n" + log_path.read_text(errors="replace")[-3000:])
        if killed or part_paths(str(out)):
            break
    assert killed, "the run ended before it could be killed:\n" + "\n".join(logs)
    before = read_predictions(str(out))
    n_before = before["study_id"].nunique()
    assert 1 <= n_before < len(ids), f"{n_before} of {len(ids)} studies were written before the kill"
    assert (before.groupby("study_id").size() == len(TARGETS)).all()  # whole studies only
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = read_predictions(str(out))
    assert sorted(after["study_id"].unique()) == sorted(ids)
    assert after["row_id"].is_unique, "a rerun must not duplicate rows"
    kept = after[after["study_id"].isin(before["study_id"])]
    pd.testing.assert_frame_equal(kept.sort_values("row_id").reset_index(drop=True),
                                  before.sort_values("row_id").reset_index(drop=True))
