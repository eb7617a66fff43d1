"""Best checkpoints, early stopping and collapsed-fold retries (issue #16, item 3), without Ray:
the best/patience bookkeeping, its survival across a worker restart, the collapse rule, the
retried fold's record, the CLI flags, and the validation studies read once under a memory bound."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lumbar_ray.config import DetectorConfig, ScorerConfig
from lumbar_ray.training.best_epoch import BestEpoch, is_validation_epoch
from lumbar_ray.training.detector_eval import collapse_reason, collapsed, selection_value
from lumbar_ray.training.trials import TrialSummary, fold_outcomes, merged_history, shipped_attempt


def files(epoch: int) -> dict[str, bytes]:
    return {"model.pt": f"weights of epoch {epoch}".encode(), "oof.parquet": f"oof {epoch}".encode()}


def run(tracker: BestEpoch, values: list[float | None], start: int = 0) -> int | None:
    """Feed rounds ``start``.. of ``values`` as a worker loop does; the epoch it stops after."""
    for epoch in range(start, len(values)):
        tracker.update(epoch, values[epoch], files(epoch))
        if tracker.should_stop:
            return epoch
    return None


def test_early_stopping_stops_after_patience_rounds_and_ships_the_best_epoch():
    tracker = BestEpoch(higher_is_better=False, patience=2)  # an RSNA score: lower is better
    assert run(tracker, [0.9, 0.5, 0.7, 0.6, 0.3, 0.2]) == 3  # epochs 2 and 3 did not beat epoch 1
    assert tracker.best_epoch == 1 and tracker.best_value == 0.5 and tracker.stale_rounds == 2
    assert tracker.shipped_files(files(3)) == files(1)
    # a tie is no improvement: the earlier epoch stays
    tied = BestEpoch(higher_is_better=True, patience=1)
    assert run(tied, [0.4, 0.4, 0.9]) == 1 and tied.best_epoch == 0


@pytest.mark.parametrize("patience", [None, 0])
def test_patience_off_never_stops(patience):
    tracker = BestEpoch(higher_is_better=True, patience=patience)
    assert run(tracker, [0.9] + [0.1] * 20) is None
    assert tracker.best_epoch == 0 and tracker.stale_rounds == 20


def test_rounds_without_a_candidate_neither_win_nor_count_before_a_best():
    """A collapsed detector (NaN) gets the whole schedule: patience counts from a best round."""
    tracker = BestEpoch(higher_is_better=True, patience=2)
    nan = float("nan")
    assert run(tracker, [nan, None, nan, nan, 0.2, nan, 0.1]) == 6
    assert tracker.best_epoch == 4 and tracker.rounds == 7
    nothing = BestEpoch(higher_is_better=True, patience=1)
    assert run(nothing, [nan, nan]) is None and nothing.best_epoch is None
    assert nothing.shipped_files(files(1)) == files(1)  # no best: the last epoch's files ship
    summary = nothing.summary()
    assert summary["best_epoch"] == -1 and math.isnan(summary["best_value"]) and summary["validation_rounds"] == 2


def test_a_restarted_worker_resumes_with_the_best_state():
    """The state goes through torch.save with the checkpoint; a worker that resumes after epoch 2
    ships and stops exactly as one that never stopped, and never ships a file of its own rounds
    that was worse than the one before the restart."""
    values = [0.3, 0.8, 0.6, 0.7, 0.5, 0.4]  # higher is better: best epoch 1, patience 3 runs out at 4
    straight = BestEpoch(higher_is_better=True, patience=3)
    stopped = run(straight, values)
    before = BestEpoch(higher_is_better=True, patience=3)
    run(before, values[:3])
    buffer = io.BytesIO()
    torch.save({"best": before.state_dict()}, buffer)
    buffer.seek(0)
    resumed = BestEpoch.from_state(torch.load(buffer, weights_only=False)["best"])
    assert resumed == before and resumed.best_files == files(1) and resumed.stale_rounds == 1
    assert run(resumed, values, start=3) == stopped == 4
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.shipped_files(files(4)) == files(1)
    # A fresh tracker after the restart (the state lost) would pick epoch 3's worse weights.
    fresh = BestEpoch(higher_is_better=True, patience=3)
    run(fresh, values, start=3)
    assert fresh.best_epoch == 3


def test_validation_epochs_every_n_and_the_last():
    assert [e for e in range(7) if is_validation_epoch(e, 7, 3)] == [2, 5, 6]
    assert [e for e in range(3) if is_validation_epoch(e, 3, 1)] == [0, 1, 2]
    with pytest.raises(ValueError, match="val_every"):
        is_validation_epoch(0, 3, 0)


def test_collapse_is_no_hit_within_5mm_on_labelled_targets():
    found = {"n_labelled": 10, "detected": 1.0, "hit_5mm_3d": 0.3}
    blind = {"n_labelled": 10, "detected": 0.0, "hit_5mm_3d": 0.0}
    misplaced = {"n_labelled": 10, "detected": 1.0, "hit_5mm_3d": 0.0}
    unlabelled = {"n_labelled": 0, "detected": float("nan"), "hit_5mm_3d": float("nan")}
    assert not collapsed(found) and collapsed(blind) and collapsed(misplaced) and not collapsed(unlabelled)
    assert selection_value(found) == 0.3
    assert math.isnan(selection_value(blind)) and math.isnan(selection_value(unlabelled))
    assert "none of 10 labelled targets" in collapse_reason(misplaced, "its 4 validation studies")
    assert "100% had a detection" in collapse_reason(misplaced, "x")


def test_a_retried_fold_ships_its_first_attempt_that_did_not_collapse_and_records_why():
    first = {"attempt": 0, "seed": 0, "collapsed": True, "collapse_reason": "on its 4 validation studies: none"}
    second = {"attempt": 1, "seed": 1000, "collapsed": False, "collapse_reason": ""}
    assert shipped_attempt([first, second]) == 1
    assert shipped_attempt([first, {**second, "collapsed": True}]) == 0  # both blind: the first
    assert shipped_attempt([second]) == 0
    history = merged_history([[{"epoch": 0}, {"epoch": 1}], [{"epoch": 0}]], [first, second], 1)
    assert [(h.get("event"), h.get("epoch"), h["attempt"]) for h in history] == [
        (None, 0, 0), (None, 1, 0), ("retry", None, 1), (None, 0, 1), ("shipped", None, 1)]
    retry = history[2]
    assert retry["seed"] == 1000 and "attempt 0 collapsed: on its 4 validation studies" in retry["reason"]


def test_the_card_records_each_folds_outcome():
    metrics = {"best_epoch": 3, "best_value": 0.41, "selection_metric": "val_hit_5mm_3d", "shipped_epoch": 3,
               "epochs_trained": 6, "stopped_early": True, "collapsed": False, "attempts": 2, "shipped_attempt": 1,
               "seed": 1000, "retry_reasons": ["on its 4 validation studies: none"]}
    final = {"best_epoch": -1, "best_value": float("nan"), "selection_metric": "", "shipped_epoch": 9,
             "epochs_trained": 10, "stopped_early": False, "collapsed": False}
    card = fold_outcomes([TrialSummary("detector_sagittal_t1", 0, 0.0, 1.0, "ip", "node", metrics),
                          TrialSummary("detector_sagittal_t1", -1, 0.0, 1.0, "ip", "node", final)])
    fold0, everything = card["detector_sagittal_t1"]["fold0"], card["detector_sagittal_t1"]["all"]
    assert fold0["attempts"] == 2 and fold0["shipped_attempt"] == 1 and fold0["retry_reasons"]
    assert fold0["best_epoch"] == 3 and fold0["stopped_early"] and fold0["selection_metric"] == "val_hit_5mm_3d"
    assert everything["best_epoch"] is None and everything["best_value"] is None and everything["shipped_epoch"] == 9
    assert everything["attempts"] == 1 and everything["retry_reasons"] == []


def test_cli_flags_set_validation_patience_and_retries():
    from lumbar_ray.training.job import config_from_args, get_args_parser

    def parse(*flags):
        return config_from_args(get_args_parser().parse_args(["--data", "d", "--out", "o", *flags]))

    cfg = parse()
    assert (cfg.scorer.patience, cfg.detector.patience) == (ScorerConfig.patience, DetectorConfig.patience)
    cfg = parse("--patience", "0", "--val-every", "3", "--collapse-retries", "2")
    assert (cfg.scorer.patience, cfg.detector.patience, cfg.scorer.val_every, cfg.detector.val_every) == (0, 0, 3, 3)
    assert cfg.detector.collapse_retries == 2
    cfg = parse("--detector-patience", "7", "--scorer-val-every", "2")
    assert (cfg.detector.patience, cfg.scorer.patience, cfg.scorer.val_every) == (7, ScorerConfig.patience, 2)
    with pytest.raises(SystemExit):
        parse("--val-every", "0")
    with pytest.raises(ValueError, match="patience"):
        ScorerConfig(patience=-1)


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    from lumbar_ray.metrics import labels as label_io
    from lumbar_ray.synth import writer as synth

    root = tmp_path_factory.mktemp("validation")
    synth.synthesize(str(root), n_studies=2, seed=5, split="train", size="small")
    points = label_io.labelled_points(label_io.read_labels(str(root)), label_io.read_coordinates(str(root)))
    return str(root), points


@pytest.mark.parametrize("cache_mb, reads_per_round", [(1024, 0), (0, 2)])
def test_validation_studies_are_read_once_within_their_memory_bound(two_studies, monkeypatch, cache_mb,
                                                                    reads_per_round):
    from lumbar_ray.targets import AXIAL_T2, SAGITTAL_T2
    from lumbar_ray.training import detector_validation

    root, points = two_studies
    reads = []
    read_study = detector_validation.read_study
    monkeypatch.setattr(detector_validation, "read_study", lambda *a, **k: reads.append(a[1]) or read_study(*a, **k))
    monkeypatch.setattr(detector_validation, "detect_series", lambda model, series, **kwargs: [])
    ids = sorted(points["study_id"].unique())
    studies = detector_validation.ValidationStudies(root, "train", ids, points, AXIAL_T2, cache_mb=cache_mb)
    _, rates = detector_validation.validation_records(None, studies, 0.01, torch.device("cpu"))
    assert len(reads) == 2 and rates["n_labelled"] > 0 and collapsed(rates)
    detector_validation.validation_records(None, studies, 0.01, torch.device("cpu"))
    assert len(reads) == 2 + reads_per_round
    assert studies.held_bytes <= cache_mb * 1024 * 1024
    for study in studies.cache.values():  # the axial series, and the sagittal ones of the canal points only
        kept = {s.series_type for s in study.all_series()}
        assert AXIAL_T2 in kept and kept <= {AXIAL_T2, SAGITTAL_T2}
