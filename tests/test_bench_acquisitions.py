"""The acquisitions benchmark's pure parts (issue #15 item 4): axial slices before/after the
reader change on forced acquisition patterns, PASS/MISS verdicts, the side-by-side scores and the
model card's detector table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lumbar_ray.bench.acquisitions import (
    axial_slice_counts,
    axial_within_5mm_3d,
    detector_cv_table,
    format_scores,
    get_args_parser,
    score_terms,
    slice_table,
    training_config,
    verdicts,
    weighted_prior_terms,
)
from lumbar_ray.demo import DemoSizes
from lumbar_ray.metrics.rsna import ALL
from lumbar_ray.synth.protocols import AcquisitionPlan
from lumbar_ray.synth.writer import synthesize
from registries import untrained_registry  # tests/ is on sys.path (conftest.py)


@pytest.fixture(scope="module")
def twin_roots(tmp_path_factory):
    """Two studies, realistic with forced plans (per-level slabs; axial split over two series, the
    first part slabs), and their simple twins."""
    base = tmp_path_factory.mktemp("acq")
    plans = [AcquisitionPlan(axial="slabs"), AcquisitionPlan(axial="split", split_after=2, split_slabs=(True, False))]
    synthesize(base / "realistic", 2, seed=5, size="small", plans=plans)
    synthesize(base / "simple", 2, seed=5, size="small", acquisitions="simple")
    return base / "realistic", base / "simple"


def test_slabs_and_split_series_lose_slices_before_and_keep_all_after(twin_roots):
    realistic, simple = twin_roots
    table = slice_table(str(realistic))
    assert len(table) == 2
    # after: every axial slice on disk is read and run through the detector
    assert (table["after"] == table["on_disk"]).all() and (table["detector"] == table["after"]).all()
    # before: slabs (3-4 slices at size small, each its own orientation) -> at most one slab
    # (or none: below the old reader's 4-slice minimum); split -> one of the two series only
    assert (table["before"] < table["after"]).all()
    assert table["before"].iloc[0] <= 4
    twin = slice_table(str(simple))
    assert list(twin["study_id"]) == list(table["study_id"])  # same study ids
    assert (twin["before"] == twin["after"]).all() and (twin["after"] == twin["on_disk"]).all()


def test_counts_need_the_descriptions(twin_roots, tmp_path):
    realistic, _ = twin_roots
    study = slice_table(str(realistic))["study_id"].iloc[0]
    with pytest.raises(FileNotFoundError, match="series_descriptions"):
        axial_slice_counts(str(realistic), study, split="test")


def test_verdicts_show_every_miss():
    lines = [v.line() for v in verdicts(realistic=0.50, simple=0.45, prior=0.84, axial_3d=0.81)]
    assert lines[0].startswith("MISS") and "0.0500" in lines[0]
    assert lines[1].startswith("MISS") and "0.5952" in lines[1]
    assert lines[2].startswith("MISS") and "0.8100" in lines[2]
    good = verdicts(realistic=0.40, simple=0.39, prior=0.84, axial_3d=0.97)
    assert [v.met for v in good] == [True, True, True]
    assert len(verdicts(0.4, 0.4, 0.84, None)) == 2  # no card table: no detector line
    # nothing measured (NaN) is a miss, never a silent pass
    assert [v.line()[:4] for v in verdicts(math.nan, 0.4, 0.84, math.nan)] == ["MISS"] * 3


def test_scores_side_by_side_and_the_weighted_prior(twin_roots):
    realistic, _ = twin_roots
    labels = pd.read_csv(realistic / "train.csv")
    prior = weighted_prior_terms(None, labels)  # no card priors: the uniform prior, weighted
    assert 0 < prior[ALL] < 5
    table = pd.DataFrame([{"model": "v1", "group": g, "rsna_log_loss": 0.1 * i}
                          for i, g in enumerate(("spinal", "foraminal", "subarticular", "any_severe_spinal", "all"))])
    real = score_terms(table, "v1")
    text = format_scores({"realistic": real, "simple": {g: v - 0.05 for g, v in real.items()}, "weighted prior": prior})
    assert "realistic - simple" in text and "0.0500" in text and "subarticular" in text


def test_detector_cv_table_from_the_card():
    card = {"metrics": {"detectors": [
        {"detector": "detector_axial_t2", "fold": "0", "n_targets": 5, "within_5mm_3d": 0.2},
        {"detector": "detector_axial_t2", "fold": "all", "n_targets": 10, "within_5mm_3d": 0.8},
        {"detector": "detector_sagittal_t1", "fold": "all", "n_targets": 10, "within_5mm_3d": 0.99}]}}
    cv = detector_cv_table(card)
    assert list(cv["detector"]) == ["detector_axial_t2", "detector_sagittal_t1"]
    assert axial_within_5mm_3d(cv) == pytest.approx(0.8)
    assert detector_cv_table({"metrics": {}}).empty and axial_within_5mm_3d(detector_cv_table({})) is None


def test_training_defaults_are_the_demos_and_flags_reach_the_config():
    demo = DemoSizes()
    cfg = training_config(get_args_parser().parse_args([]), "data", "registry")
    assert (cfg.folds, cfg.detector.epochs, cfg.scorer.epochs, cfg.detector.imgsz, cfg.detector.val_every) == (
        demo.folds, demo.detector_epochs, demo.scorer_epochs, demo.imgsz, demo.detector_val_every)
    assert not cfg.final_fit
    cfg = training_config(get_args_parser().parse_args(["--detector-epochs", "10", "--detector-val-every", "5",
                                                        "--folds", "3"]), "data", "registry")
    assert (cfg.folds, cfg.detector.epochs, cfg.detector.val_every) == (3, 10, 5)
    with pytest.raises(ValueError, match="val_every"):
        training_config(get_args_parser().parse_args(["--detector-val-every", "0"]), "data", "registry")


@pytest.mark.slow
@pytest.mark.ray
def test_end_to_end_with_given_models(ray_runtime, tmp_path):
    import json

    from lumbar_ray.bench.acquisitions import main

    models = untrained_registry(tmp_path)
    printed: list[str] = []
    args = get_args_parser().parse_args(["--holdout", "2", "--seed", "3", "--workdir", str(tmp_path / "work"),
                                         "--models", models, "--synth-workers", "1"])
    assert main(args, echo=printed.append) == 0
    text = "\n".join(printed)
    assert "realistic - simple" in text and "targets detected" in text
    assert text.count("PASS") + text.count("MISS") == 2  # no CV table in this card
    report = json.loads((tmp_path / "work" / "acquisitions.json").read_text())
    assert {k: r["n_scored"] for k, r in report["runs"].items()} == {"realistic": 2, "simple": 2}
    assert all(0 <= r["detected_share"] <= 1 for r in report["runs"].values())
    assert not (tmp_path / "work" / "train").exists()  # --models: nothing trained, no training studies
    for kind in ("realistic", "simple"):
        rows = report["axial_slices"][kind]
        assert len(rows) == 2 and all(r["after"] == r["on_disk"] == r["detector"] for r in rows)
    assert all(math.isfinite(report["rsna"][k]["all"]) for k in ("realistic", "simple", "weighted prior"))
