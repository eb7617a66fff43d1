"""Cross-validated training on Ray (tiny synthetic set, 2 folds): folds, concurrency, fault
tolerance, registry integrity. The training itself runs once, in the session fixture `trained`."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lumbar_ray.config import SCORER
from lumbar_ray.metrics.calibration import TEMPERATURE_BOUNDS
from lumbar_ray.models.registry import ChecksumMismatchError, ModelRegistry
from lumbar_ray.targets import TARGETS

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_folds_are_disjoint_by_study_and_oof_matches_them(trained):
    registry = ModelRegistry(trained.registry)
    version_dir = Path(trained.registry) / "versions" / trained.version
    folds = pd.read_parquet(version_dir / "folds.parquet")
    assert folds["study_id"].is_unique
    assert set(folds["fold"]) == {0, 1}
    oof = pd.read_parquet(version_dir / "oof_scorer.parquet")
    fold_of = dict(zip(folds["study_id"], folds["fold"]))
    # Every out-of-fold row comes from the fold whose model never saw that study.
    assert (oof["study_id"].map(fold_of) == oof["fold"]).all()
    # Each study is predicted by exactly one fold model.
    assert (oof.groupby("study_id")["fold"].nunique() == 1).all()
    manifest = registry.manifest(trained.version)
    # no final fit here: each model ships the fold that validated best on its own held-out fold
    assert set(manifest["shipped_folds"]) == set(manifest["models"])
    assert set(manifest["shipped_folds"].values()) <= {"fold0", "fold1"}
    assert manifest["shipped_fold"] in {"fold0", "fold1", "per model"}


def test_folds_ran_concurrently(trained):
    spans = [(t.fold, t.started, t.finished) for t in trained.trials]
    assert {f for f, _, _ in spans} == {0, 1}
    overlapping = [
        (a, b) for a in spans for b in spans
        if a[0] == 0 and b[0] == 1 and a[1] < b[2] and b[1] < a[2]
    ]
    assert overlapping, f"no fold-0 trial overlapped a fold-1 trial: {spans}"


def test_killed_worker_resumed_from_its_checkpoint(trained, killed_trials):
    markers, _ = killed_trials
    for fold in ("fold0", "fold1"):
        assert (markers / f"{trained.version}-{SCORER}-{fold}.killed").exists()  # its first worker died
        history = json.loads((Path(trained.artifacts) / SCORER / fold / "history.json").read_text())
        events = [h for h in history if h.get("event") == "resumed"]
        assert events and events[0]["epoch"] == 1, history  # restarted after epoch 0's checkpoint
        epochs = [h["epoch"] for h in history if "event" not in h]
        assert epochs == [0, 1], history  # epoch 0 was not trained twice


def test_each_fold_ships_its_best_round_with_the_best_kept_across_the_restart(trained):
    """The scorer folds validate after both epochs, their worker killed in between: each ships
    the better round's weights and out-of-fold file, epoch 0's score kept through the restart."""
    import torch

    from lumbar_ray.metrics.rsna import rsna_score

    card = ModelRegistry(trained.registry).manifest(trained.version)["fold_outcomes"][SCORER]
    for fold in ("fold0", "fold1"):
        folder = Path(trained.artifacts) / SCORER / fold
        history = json.loads((folder / "history.json").read_text())
        scores = {h["epoch"]: h["val_rsna_score"] for h in history if "event" not in h}
        best = min(sorted(scores), key=scores.get)  # a tie keeps the earlier epoch
        outcome = next(h for h in history if h.get("event") == "outcome")
        assert outcome["best_epoch"] == best == card[fold]["best_epoch"] == card[fold]["shipped_epoch"], history
        assert outcome["best_value"] == scores[best] and card[fold]["selection_metric"] == "val_rsna_score"
        assert torch.load(folder / "scorer.pt", weights_only=True)["epoch"] == best
        assert rsna_score(pd.read_parquet(folder / "oof.parquet")).score == pytest.approx(scores[best])


def test_metrics_table_has_model_and_both_baselines_on_same_rows(trained):
    table = trained.metric_table
    assert set(table["model"]) == {"deepscorenet_end_to_end", "deepscorenet_end_to_end_calibrated",
                                   "deepscorenet_at_labelled_points", "deepscorenet_at_labelled_points_calibrated",
                                   "baseline_majority", "baseline_prior", "baseline_weighted_prior"}
    overall = table[table["group"] == "all"]  # each row set (end to end, labelled points): all models on the same rows
    assert (overall.groupby("evaluated_on")["n"].nunique() == 1).all() and (overall["n"] > 0).all()
    # temperatures per condition in the card, with the out-of-fold score and ECE before/after
    manifest = ModelRegistry(trained.registry).manifest(trained.version)
    calibration = manifest["calibration"]
    # fitted on the shipped DeepScoreNet's own fold (no final fit here): its 4 studies give 20
    # rows per condition, too few for a temperature (MIN_CALIBRATION_ROWS), so none ships
    assert calibration["fitted_on_folds"].startswith(manifest["shipped_folds"]["scorer"])
    assert set(calibration["temperatures"]) <= {t.condition.slug for t in TARGETS}
    assert all(TEMPERATURE_BOUNDS[0] <= v <= TEMPERATURE_BOUNDS[1] for v in calibration["temperatures"].values())
    assert {"rsna_score", "ece"} <= set(calibration["oof_before"]) == set(calibration["oof_after_cross_fitted"])
    assert "detector_sagittal_t2_stir" in set(trained.detector_table["detector"])
    assert {"within_5mm", "within_5mm_3d"} <= set(trained.detector_table.columns)


def test_best_folds_pick_each_models_best_validated_fold():
    from lumbar_ray.training.cv_metrics import best_folds

    det = pd.DataFrame({"detector": ["a", "a", "a", "b", "b", "b"], "fold": ["0", "1", "all"] * 2,
                        "within_5mm": [0.0, 0.39, 0.2, 0.9, 0.9, 0.9]})
    scorer = pd.DataFrame({"model": ["deepscorenet_at_labelled_points"] * 2 + ["baseline_prior"] * 2,
                           "fold": [0, 1, 0, 1], "rsna_score": [0.61, 0.58, 0.1, 0.1]})
    # a collapsed fold 0 loses; a tie goes to the lower fold; the baselines do not count
    assert best_folds(det, scorer, [0, 1]) == {"a": 1, "b": 0, SCORER: 1}
    assert best_folds(pd.DataFrame(), pd.DataFrame(), [0, 1]) == {}


def test_detector_metrics_in_plane_and_in_patient_space():
    from lumbar_ray.training.cv_metrics import detector_metrics

    records = pd.DataFrame({
        "job": ["det"] * 4, "fold": [0, 0, 1, 1],
        "detected": [True, True, True, False],
        "right_slice": [True, False, True, None],
        "dist_mm": [1.0, 1.0, 7.0, np.nan],
        "dist_3d_mm": [1.0, 4.2, 7.0, np.nan],  # the second: the neighbouring slice, 4.2 mm away
    })
    table = detector_metrics(records).set_index("fold")
    assert table.loc["all", "n_targets"] == 4 and table.loc["all", "right_instance"] == pytest.approx(0.5)
    assert table.loc["all", "within_5mm"] == pytest.approx(0.25) and table.loc["all", "within_10mm"] == pytest.approx(0.5)
    assert table.loc["all", "within_5mm_3d"] == pytest.approx(0.5) and table.loc["all", "within_10mm_3d"] == pytest.approx(0.75)
    assert table.loc["0", "within_5mm_3d"] == pytest.approx(1.0) and table.loc["1", "within_5mm_3d"] == pytest.approx(0.0)
    # records from before the 3-D distance existed: unknown, not misses
    old = detector_metrics(records.drop(columns="dist_3d_mm")).set_index("fold")
    assert np.isnan(old.loc["all", "within_5mm_3d"]) and old.loc["all", "within_5mm"] == pytest.approx(0.25)


def test_manifest_checksums_match_and_tampered_weights_are_refused(trained, tmp_path):
    registry = ModelRegistry(trained.registry)
    manifest = registry.manifest(trained.version)
    assert set(manifest["sha256"]) == {f"{job}.pt" for job in manifest["models"]}
    for key in ("version", "created_at", "git_commit", "config", "targets", "input_spec", "data", "metrics", "priors"):
        assert key in manifest
    assert len(manifest["targets"]) == 25 and len(manifest["priors"]) == 25
    registry.verify(trained.version)
    # Tamper with a copy of the registry, never the shared fixture.
    import shutil

    copy = tmp_path / "registry"
    shutil.copytree(trained.registry, copy)
    weights = copy / "versions" / trained.version / "scorer.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle of the file
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        ModelRegistry(str(copy)).fetch(trained.version, "scorer.pt", tmp_path / "dl")
    from lumbar_ray.scoring.study import ModelBundle

    with pytest.raises(ChecksumMismatchError):
        ModelBundle.from_registry(f"{copy}@{trained.version}", device="cpu")


@pytest.mark.s3
def test_ray_train_and_tune_storage_on_s3(synthetic_root, tmp_path, s3_env):
    """Ray Train/Tune storage on s3:// (the test's S3 server, reached through the endpoint in
    the environment): every fold's checkpoints, the Tune experiment and the artefacts land in
    the bucket, nothing under the registry's local default, and the version is published."""
    from lumbar_ray.config import ScorerConfig, TrainConfig
    from lumbar_ray.runtime import ray_session
    from lumbar_ray.storage import filesystem_for
    from lumbar_ray.training.cv import run_training

    storage = f"s3://{s3_env.bucket}/train-runs"
    registry = tmp_path / "registry"
    cfg = TrainConfig(data=str(synthetic_root), registry=str(registry), folds=2, seed=0, final_fit=False,
                      models=("scorer",), scorer=ScorerConfig(epochs=1, batch_size=64), storage_path=storage)
    with ray_session(num_cpus=2):
        outcome = run_training(cfg)
    fs, base = filesystem_for(storage)
    fs.invalidate_cache()
    for fold in (0, 1):
        run_dir = f"{base}/{outcome.version}-scorer-fold{fold}"
        checkpoints = sorted(p for p in fs.glob(f"{run_dir}/checkpoint_*") if not p.endswith(".json"))
        assert checkpoints, f"no checkpoint of fold {fold} on S3"
        assert fs.exists(f"{checkpoints[-1]}/state.pt")
        assert fs.exists(f"{base}/{outcome.version}/artifacts/scorer/fold{fold}/oof.parquet")
    assert fs.glob(f"{base}/{outcome.version}-cv/experiment_state-*.json")
    assert not (registry / "runs").exists()
    manifest = ModelRegistry(str(registry)).manifest(outcome.version)
    assert manifest["config"]["storage_path"] == storage
    assert set(outcome.metric_table["model"]) >= {"deepscorenet_at_labelled_points", "baseline_weighted_prior"}


# --------------------------------------------------------------------------------------------
# Slice noise for the grader: every example carries the crops of its slab's neighbouring slices


@pytest.fixture(scope="module")
def slab_study_root(tmp_path_factory):
    """One small synthetic study whose Axial T2 series is tilted slabs with a lost slice."""
    from lumbar_ray.synth.protocols import AcquisitionPlan
    from lumbar_ray.synth.writer import synthesize

    root = tmp_path_factory.mktemp("slabs")
    synthesize(root, 1, seed=11, size="small", plans=[AcquisitionPlan(axial="slabs", missing=(("axial", 0.5),))])
    return root


def test_training_examples_carry_neighbour_crops_within_the_slab(slab_study_root):
    from lumbar_ray.config import ScorerConfig
    from lumbar_ray.dicom.read import read_study
    from lumbar_ray.metrics import labels as label_io
    from lumbar_ray.models.crops import extract_crop, neighbour_slices
    from lumbar_ray.targets import AXIAL_T2, TARGETS
    from lumbar_ray.training.examples import study_examples

    root = str(slab_study_root)
    points = label_io.labelled_points(label_io.read_labels(root), label_io.read_coordinates(root))
    cfg = ScorerConfig(channels="adjacent")
    (study_id, own), = points.groupby("study_id")
    examples = study_examples(root, int(study_id), own, cfg, with_slices=False)
    assert len(examples.crops) == len(own) and not examples.problems
    assert examples.neighbour_crops.shape == (len(examples.crops), 2, 3, 32, 32)
    study = read_study(root, str(study_id))
    axial = study.series_of_type(AXIAL_T2)[0]
    assert axial.is_multi_oriented and len(np.unique(axial.slab_ids())) == 5  # one slab per level
    inside = 0
    for i, row in enumerate(examples.points.itertuples(index=False)):
        series = study.find_series(row.series_id, int(row.instance_number))
        k = series.index_of_instance(int(row.instance_number))
        slabs = series.slab_ids()
        args = dict(channels="adjacent", mm=cfg.crop_mm, pixel_spacing=tuple(series.pixel_spacing), slab_ids=slabs)
        assert np.array_equal(examples.crops[i], extract_crop(series.volume, k, row.x, row.y, **args))
        below, above = neighbour_slices(series.n_slices, k, slabs)
        assert slabs[below] == slabs[k] == slabs[above]
        for side, j in enumerate((below, above)):
            assert np.array_equal(examples.neighbour_crops[i, side], extract_crop(series.volume, j, row.x, row.y, **args))
        inside += int(below == k - 1 and above == k + 1)
    assert inside > 0  # most points have both neighbours; some may sit at a slab's or stack's end
