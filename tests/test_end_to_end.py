"""Out-of-fold end-to-end CV (training/end_to_end.py, training/cv_metrics.py) and scoring a list of
studies as Ray tasks (scoring/on_cluster.py): the pure parts on small frames, the Ray part on the
untrained registry (seconds), the whole hook on the session's `trained` run."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import SCORER
from lumbar_ray.metrics.calibration import apply_temperature
from lumbar_ray.metrics.rsna import long_labels, weighted_prior_from_card
from lumbar_ray.targets import PROBABILITY_COLUMNS, TARGET_COLUMNS, TARGETS
from lumbar_ray.training.cv_metrics import (
    AT_LABELLED_POINTS,
    CALIBRATED,
    END_TO_END,
    ON_END_TO_END,
    ON_LABELLED_POINTS,
    cross_fitted_end_to_end,
    headline_line,
    scorer_metrics,
    shipped_temperatures,
)
from lumbar_ray.training.end_to_end import (
    FRAME_COLUMNS,
    end_to_end_frame,
    fold_priors,
    labelled_predictions,
    missing_for_end_to_end,
)

PROBS = list(PROBABILITY_COLUMNS)


def _labels(n_studies: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"study_id": 100 + s, "column": c, "label": int(rng.choice(3, p=[0.6, 0.25, 0.15]))}
                         for s in range(n_studies) for c in TARGET_COLUMNS])


def _folds(labels: pd.DataFrame, k: int = 2) -> pd.DataFrame:
    studies = sorted(labels["study_id"].unique())
    return pd.DataFrame({"study_id": studies, "fold": [i % k for i in range(len(studies))]})


def _scoring_rows(study_id, detected: set[str], probs: dict[str, list[float]] | None = None) -> pd.DataFrame:
    """What scoring writes for one study: 25 rows, ``detected`` for the given target columns."""
    rows = []
    for t in TARGETS:
        p = (probs or {}).get(t.column, [0.5, 0.3, 0.2])
        rows.append({"study_id": str(study_id), "row_id": t.row_id(str(study_id)), "condition": t.condition.slug,
                     "level": t.level, **dict(zip(PROBS, p)), "detected": t.column in detected,
                     "model_version": f"cv-fold{int(study_id) % 2}"})
    return pd.DataFrame(rows)


def test_fold_priors_see_only_the_training_folds_labels():
    labels, folds = _labels(10), None
    folds = _folds(labels)
    before = fold_priors(labels, folds, fold=0)
    in_fold0 = labels["study_id"].isin(folds.loc[folds["fold"] == 0, "study_id"])
    changed = labels.assign(label=np.where(in_fold0, 2, labels["label"]))  # every fold-0 label Severe
    assert fold_priors(changed, folds, fold=0) == before  # the validation fold's labels do not leak in
    assert fold_priors(changed, folds, fold=1) != fold_priors(labels, folds, fold=1)  # they train fold 1's
    assert set(before) == set(TARGET_COLUMNS) and all(abs(sum(p) - 1) < 1e-9 for p in before.values())


def test_end_to_end_frame_covers_every_labelled_target_and_fills_failed_studies_with_the_fold_prior():
    labels = _labels(4)
    labels.loc[(labels["study_id"] == 100) & (labels["column"] == TARGET_COLUMNS[0]), "label"] = -1  # unlabelled
    folds = _folds(labels)
    priors = {f: fold_priors(labels, folds, f) for f in (0, 1)}
    found = {TARGET_COLUMNS[1], TARGET_COLUMNS[5]}
    predictions = pd.concat([_scoring_rows(s, found, {TARGET_COLUMNS[1]: [2.0, 1.0, 1.0]}) for s in (100, 101, 102)])
    frame = end_to_end_frame(predictions, ["103"], labels, folds, priors)
    assert list(frame.columns) == FRAME_COLUMNS
    # every labelled target of the four studies, the unlabelled one left out
    assert len(frame) == 4 * 25 - 1 and frame["study_id"].nunique() == 4
    assert frame["study_id"].dtype == labels["study_id"].dtype
    assert (frame.groupby("study_id")["fold"].first() == folds.set_index("study_id")["fold"]).all()
    scored = frame[frame["study_id"] == 101].set_index("column")
    np.testing.assert_allclose(scored.loc[TARGET_COLUMNS[1], PROBS].to_numpy(float), [0.5, 0.25, 0.25])  # rescaled
    assert scored["detected"].sum() == 2 and not scored["failed"].any()
    failed = frame[frame["study_id"] == 103].set_index("column")
    assert failed["failed"].all() and not failed["detected"].any()
    fallback = weighted_prior_from_card(priors[1])  # study 103 is in fold 1
    np.testing.assert_allclose(failed[PROBS].to_numpy(float), fallback.loc[failed.index, PROBS].to_numpy())
    # nothing scored and nothing failed: an empty frame of the same layout
    assert list(end_to_end_frame(pd.DataFrame(), [], labels, folds, priors).columns) == FRAME_COLUMNS


def test_labelled_predictions_joins_rows_of_several_bundles_to_their_labels():
    labels = _labels(2)
    rows = pd.concat([_scoring_rows(100, set()), _scoring_rows(101, {TARGET_COLUMNS[0]})])
    joined = labelled_predictions(rows, labels)
    assert len(joined) == 50 and set(joined["study_id"]) == {100, 101}
    assert joined["detected"].sum() == 1
    merged = joined.merge(labels, on=["study_id", "column"], suffixes=("", "_truth"))
    assert (merged["label"] == merged["label_truth"]).all()


def _end_to_end(labels, folds, rng, sharpen: float = 3.0, detected_share: float = 0.7) -> pd.DataFrame:
    """An overconfident grader's end-to-end rows; the undetected ones carry a constant prior."""
    long = long_labels(labels).merge(folds, on="study_id")
    logits = rng.normal(0, 1, size=(len(long), 3)) + 2.0 * np.eye(3)[long["label"].to_numpy()]
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = long.assign(**dict(zip(PROBS, apply_temperature(true, 1 / sharpen).T)))
    frame["detected"] = rng.random(len(frame)) < detected_share
    frame.loc[~frame["detected"], PROBS] = [0.5, 0.3, 0.2]
    return frame.assign(failed=False)


def test_scorer_metrics_put_end_to_end_first_with_baselines_on_its_rows():
    rng = np.random.default_rng(4)
    labels = _labels(40, seed=4)
    folds = _folds(labels, k=3)
    e2e = _end_to_end(labels, folds, rng)
    points = e2e[e2e["detected"]].drop(columns=["detected", "failed"]).copy()  # the grader's own OOF
    table, per_fold = scorer_metrics(points, labels, folds, e2e)
    assert list(table["evaluated_on"].drop_duplicates()) == [ON_END_TO_END, ON_LABELLED_POINTS]
    assert table.iloc[0]["model"] == END_TO_END
    overall = table[table["group"] == "all"]
    n = overall.groupby("evaluated_on")["n"].nunique()
    assert (n == 1).all()  # every model and baseline of a row set on the same rows
    assert overall.set_index(["evaluated_on", "model"]).loc[(ON_END_TO_END, END_TO_END), "n"] == len(e2e)
    assert {END_TO_END + CALIBRATED, AT_LABELLED_POINTS, AT_LABELLED_POINTS + CALIBRATED} <= set(table["model"])
    assert set(per_fold["fold"]) == {0, 1, 2} and set(per_fold["evaluated_on"]) == {ON_END_TO_END, ON_LABELLED_POINTS}
    line = headline_line(table)
    assert line.startswith("HEADLINE out-of-fold RSNA score end to end") and "labelled points (diagnostic" in line
    # only the labelled points (a run without detectors): named as a diagnostic, no headline figure
    only_points, _ = scorer_metrics(points, labels, folds)
    assert set(only_points["evaluated_on"]) == {ON_LABELLED_POINTS}
    assert "not computed (needs the detectors and DeepScoreNet" in headline_line(only_points)
    failed = headline_line(only_points, "failed: FileNotFoundError: scorer.pt")
    assert "not computed (failed: FileNotFoundError: scorer.pt)" in failed and "labelled points (diagnostic" in failed


def test_calibration_is_cross_fitted_on_the_detections_and_leaves_the_fallback_alone():
    rng = np.random.default_rng(5)
    labels = _labels(60, seed=5)
    folds = _folds(labels, k=3)
    e2e = _end_to_end(labels, folds, rng)
    points = e2e.iloc[:0].drop(columns=["detected", "failed"])
    calibrated = cross_fitted_end_to_end(e2e, points)
    undetected = ~e2e["detected"]
    np.testing.assert_allclose(calibrated.loc[undetected, PROBS].to_numpy(float), e2e.loc[undetected, PROBS].to_numpy(float))
    assert not np.allclose(calibrated.loc[~undetected, PROBS].to_numpy(float), e2e.loc[~undetected, PROBS].to_numpy(float))
    # a study's calibrated rows do not depend on its own labels (no leakage), nor on another
    # fold's (each fold is another model): only on the other half of its own fold's studies
    first = sorted(e2e.loc[e2e["fold"] == 0, "study_id"].unique())[0]
    for changed in (e2e["study_id"] == first, e2e["fold"] == 1):
        flipped = e2e.copy()
        flipped.loc[changed, "label"] = (flipped.loc[changed, "label"] + 1) % 3
        again = cross_fitted_end_to_end(flipped, points)
        unchanged = e2e["study_id"] == first
        np.testing.assert_allclose(again.loc[unchanged, PROBS].to_numpy(float),
                                   calibrated.loc[unchanged, PROBS].to_numpy(float))
    # the shipped temperatures: from the detections; an overconfident grader gets T > 1
    temps, fitted_on = shipped_temperatures(points, e2e)
    assert set(fitted_on.values()) == {ON_END_TO_END} and all(t > 1.2 for t in temps.values())


def test_each_fold_model_is_calibrated_with_its_own_temperatures():
    """Two folds, two models: one overconfident, one underconfident. Scaling either with the
    other's temperature (or a pooled one) is worse than its own; the within-fold fit gains."""
    from lumbar_ray.training.cv_metrics import _calibration_summary

    rng = np.random.default_rng(8)
    labels = _labels(80, seed=8)
    folds = _folds(labels, k=2)
    sharp = _end_to_end(labels, folds, rng, sharpen=3.0, detected_share=1.0)
    soft = _end_to_end(labels, folds, rng, sharpen=0.4, detected_share=1.0)
    e2e = pd.concat([sharp[sharp["fold"] == 0], soft[soft["fold"] == 1]], ignore_index=True)
    points = e2e.iloc[:0].drop(columns=["detected", "failed"])
    own = {fold: shipped_temperatures(points, e2e, fold=fold)[0] for fold in (0, 1)}
    assert all(t > 1.2 for t in own[0].values()) and all(t < 0.8 for t in own[1].values())
    pooled = shipped_temperatures(points, e2e)[0]
    assert all(own[1][c] < pooled[c] < own[0][c] for c in pooled)
    before = _calibration_summary(e2e)["rsna_score"]
    after = _calibration_summary(cross_fitted_end_to_end(e2e, points))["rsna_score"]
    assert after < before - 0.05


def test_shipped_temperatures_fall_back_to_the_labelled_points_per_condition():
    rng = np.random.default_rng(6)
    labels = _labels(30, seed=6)
    folds = _folds(labels)
    e2e = _end_to_end(labels, folds, rng)
    spinal = e2e["column"].str.startswith("spinal")
    e2e.loc[spinal, "detected"] = False  # the spinal targets were never found end to end
    points = _end_to_end(labels, folds, rng, sharpen=0.5).drop(columns=["detected", "failed"])  # underconfident
    temps, fitted_on = shipped_temperatures(points, e2e)
    spinal_condition = TARGETS[[t.column for t in TARGETS].index(e2e.loc[spinal, "column"].iloc[0])].condition.slug
    assert fitted_on[spinal_condition] == ON_LABELLED_POINTS and temps[spinal_condition] < 1.0
    assert all(where == ON_END_TO_END for c, where in fitted_on.items() if c != spinal_condition)


def test_no_temperature_from_a_handful_of_rows():
    rng = np.random.default_rng(7)
    labels = _labels(4, seed=7)  # 20 labelled rows per condition, fewer than MIN_CALIBRATION_ROWS
    folds = _folds(labels)
    e2e = _end_to_end(labels, folds, rng, detected_share=1.0)
    points = e2e.drop(columns=["detected", "failed"])
    assert shipped_temperatures(points, e2e) == ({}, {})
    # then the cross-fitted frames are the raw ones: a temperature at a bound would only make them worse
    np.testing.assert_allclose(cross_fitted_end_to_end(e2e, points)[PROBS].to_numpy(float), e2e[PROBS].to_numpy(float))


def test_studies_per_task_spread_each_bundle_over_its_share_of_the_cluster():
    from lumbar_ray.scoring.on_cluster import chunks, studies_per_task

    assert studies_per_task(40, n_bundles=5, slots=16) == 14  # 3 tasks per fold at a time
    assert studies_per_task(4, n_bundles=2, slots=2) == 4  # one task per fold on a 2-CPU machine
    assert studies_per_task(2000, n_bundles=1, slots=4) == 32  # capped: fewer loads, but a bounded task
    assert studies_per_task(0, n_bundles=3, slots=1) == 1
    assert chunks(["a", "b", "c"], 2) == [["a", "b"], ["c"]] and chunks([], 4) == []


def test_end_to_end_needs_both_kinds_of_model():
    assert missing_for_end_to_end(["detector_sagittal_t1", SCORER]) is None
    assert "no detectors" in missing_for_end_to_end([SCORER])
    assert "no DeepScoreNet" in missing_for_end_to_end(["detector_sagittal_t1"])


# --------------------------------------------------------------------------------------------
# Scoring studies as Ray tasks (the untrained registry: every stage runs, in seconds)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    from registries import untrained_registry  # tests/ is on sys.path (conftest.py)

    return untrained_registry(tmp_path_factory.mktemp("untrained"))


@pytest.mark.slow
@pytest.mark.ray
def test_scoring_on_the_cluster_equals_the_in_process_loop(ray_runtime, synthetic_root, untrained):
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.models.registry import ModelRegistry, parse_model_spec
    from lumbar_ray.scoring.on_cluster import TaskResources, score_on_cluster
    from lumbar_ray.scoring.study import ModelBundle, score_in_process

    studies = sorted(list_studies(str(synthetic_root), "test"))[:2] + ["no-such-study"]
    reference, ref_errors = score_in_process(ModelBundle.from_registry(untrained, device="cpu"), str(synthetic_root),
                                             studies, split="test")
    scored = score_on_cluster(functools.partial(ModelBundle.from_registry, untrained, device="cpu"),
                              str(synthetic_root), studies, "test", TaskResources(studies_per_task=2, num_gpus=0))
    assert scored.failed_studies() == {"no-such-study"} == set(ref_errors.loc[ref_errors["stage"] == "read", "study_id"])
    keys = ["study_id", "row_id"]
    got = scored.predictions.sort_values(keys).reset_index(drop=True)
    want = reference.sort_values(keys).reset_index(drop=True)
    np.testing.assert_allclose(got[PROBS].to_numpy(float), want[PROBS].to_numpy(float), atol=1e-6)
    assert (got["detected"] == want["detected"]).all() and len(got) == 50
    # the same files as a bundle outside the registry (a CV fold's artefacts): the same rows
    root, version = parse_model_spec(untrained)
    registry = ModelRegistry(root)
    manifest = registry.manifest(version)
    files = {job: registry.url("versions", version, name) for job, name in manifest["models"].items()}
    from lumbar_ray.config import series_type_of_job

    from_files = ModelBundle.from_files(
        "fold-like", files[SCORER], {series_type_of_job(j): f for j, f in files.items() if j != SCORER},
        detector_conf=manifest["config"]["detector"]["conf"], device="cpu")
    rows, _ = score_in_process(from_files, str(synthetic_root), studies[:1], split="test")
    rows = rows.sort_values(keys)
    np.testing.assert_allclose(rows[PROBS].to_numpy(float), want[want["study_id"] == studies[0]][PROBS].to_numpy(float),
                               atol=1e-6)
    assert set(rows["model_version"]) == {"fold-like"}


# --------------------------------------------------------------------------------------------
# The hook in run_training, on the session's trained run (2 folds, detectors and DeepScoreNet)


@pytest.mark.slow
@pytest.mark.ray
def test_trained_run_reports_the_end_to_end_figure_first(trained):
    from lumbar_ray.models.registry import ModelRegistry

    table = trained.metric_table
    assert table.iloc[0]["evaluated_on"] == ON_END_TO_END
    manifest = ModelRegistry(trained.registry).manifest(trained.version)
    e2e = manifest["metrics"]["end_to_end"]
    assert e2e["n_studies"] == len(pd.read_parquet(f"{trained.registry}/versions/{trained.version}/folds.parquet"))
    assert 0.0 <= e2e["detected_share"] <= 1.0 and np.isfinite(e2e["rsna_score"])
    assert manifest["calibration"]["evaluated_on"] == ON_END_TO_END
    assert trained.report.splitlines()[2].startswith("HEADLINE out-of-fold RSNA score end to end")
    overall = table[table["group"] == "all"].set_index("model")["rsna_log_loss"]
    print(f"\nend to end (uncalibrated / calibrated): {overall[END_TO_END]:.4f} / {overall[END_TO_END + CALIBRATED]:.4f}; "
          f"at the labelled points: {overall[AT_LABELLED_POINTS]:.4f}; detected share {e2e['detected_share']:.2f}")


@pytest.mark.slow
@pytest.mark.ray
def test_an_end_to_end_pass_that_fails_gives_its_reason_not_an_exception(ray_runtime, synthetic_root, tmp_path):
    """A fold's models that do not load (here: no artefacts at all) make every task raise; the
    pass returns why, so that run_training still publishes the version and the card says why
    it has no end-to-end figure."""
    from lumbar_ray.config import TrainConfig
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.training.cv_metrics import end_to_end_card
    from lumbar_ray.training.end_to_end import end_to_end_oof

    studies = sorted(list_studies(str(synthetic_root), "train"))[:4]
    labels = _labels(4).assign(study_id=lambda f: f["study_id"].map(dict(zip(range(100, 104), studies))))
    folds = _folds(labels)
    cfg = TrainConfig(data=str(synthetic_root), registry=str(tmp_path / "registry"))
    printed: list[str] = []
    result = end_to_end_oof(cfg, labels, folds, str(tmp_path / "no-artifacts"), echo=printed.append)
    assert not result.available and result.skipped.startswith("failed: ")
    print(f"\nend-to-end pass: {result.skipped}")
    assert "no-artifacts" in result.skipped  # the missing file is named
    assert any("WARNING: end-to-end out-of-fold CV failed" in line and "published without it" in line
               for line in printed)
    assert end_to_end_card(result, pd.DataFrame()) == {"skipped": result.skipped}
