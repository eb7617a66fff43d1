"""Scheduled retraining: champion/challenger on the same holdout, atomic compare-and-swap promotion."""

import threading

import pytest

from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.training.promotion import PromotionLock, PromotionLockBusy, decisions, promote_if_unchanged
from lumbar_ray.config import HOLDOUT_SALT
from lumbar_ray.training.retrain import holdout_studies, is_holdout, paired_scores, unseen_holdout
from registries import registry_with_versions


def test_holdout_membership_is_stable_and_proportional():
    ids = list(range(1000, 3000))
    held = holdout_studies(ids, 0.2)
    assert 0.15 < len(held) / len(ids) < 0.25
    assert held == holdout_studies(list(reversed(ids)) [::-1], 0.2)  # order does not matter
    assert set(holdout_studies(ids[:500], 0.2)) == {s for s in held if s in ids[:500]}  # stable as data grows
    assert not any(is_holdout(s, 0.0) for s in ids) and all(is_holdout(s, 1.0) for s in ids)


def test_concurrent_promotions_cannot_both_win(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1", "v2", "v3")
    registry.set_champion("v1", reason="start")
    results = {}
    barrier = threading.Barrier(2)

    def attempt(challenger):
        barrier.wait()
        results[challenger] = promote_if_unchanged(registry, challenger, "v1", reason="better", owner=challenger)

    threads = [threading.Thread(target=attempt, args=(v,)) for v in ("v2", "v3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, (promoted, _) in results.items() if promoted]
    assert len(winners) == 1, results
    assert registry.champion()["version"] == winners[0]
    loser = ({"v2", "v3"} - set(winners)).pop()
    assert "not promoted" in results[loser][1] or "changed" in results[loser][1]
    # the lock is released afterwards
    assert not (tmp_path / "reg" / "locks" / "promote.lock").exists()


def test_held_lock_refuses_promotion_and_changed_champion_is_detected(tmp_path):
    registry = registry_with_versions(tmp_path / "reg", "v1", "v2")
    registry.set_champion("v1", reason="start")
    with PromotionLock(registry, owner="someone-else"):
        with pytest.raises(PromotionLockBusy):
            with PromotionLock(registry, owner="me"):
                pass
        promoted, why = promote_if_unchanged(registry, "v2", "v1", reason="x", owner="me")
        assert not promoted and "held by someone-else" in why
    assert registry.champion()["version"] == "v1"
    promoted, why = promote_if_unchanged(registry, "v2", expected_champion="v0", reason="x", owner="me")
    assert not promoted and "changed" in why
    assert registry.champion()["version"] == "v1"


@pytest.mark.s3
def test_promotion_lock_is_exclusive_on_s3(s3_env):
    registry = ModelRegistry(f"s3://{s3_env.bucket}/lock-test")
    with PromotionLock(registry, owner="a"):
        with pytest.raises(PromotionLockBusy):
            with PromotionLock(registry, owner="b"):
                pass
    with PromotionLock(registry, owner="c"):  # released: can be taken again
        pass


@pytest.mark.slow
@pytest.mark.ray
def test_retrain_refuses_to_compare_with_a_champion_that_trained_on_the_holdout(ray_runtime, synthetic_root, trained,
                                                                                tmp_path):
    """The session's champion was trained on every study (no holdout rule, nothing excluded): a
    retrain trains and scores its challenger on the holdout, but refuses the comparison, records
    why, and leaves the pointer where it was, whatever the margin."""
    import shutil

    from lumbar_ray.config import DetectorConfig, RetrainConfig, ScorerConfig, TrainConfig
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.training.retrain import run_retrain

    registry_root = tmp_path / "registry"
    shutil.copytree(trained.registry, registry_root)
    ids = [int(s) for s in list_studies(str(synthetic_root), "train")]
    fraction = _fraction_with_a_small_holdout(ids)
    cfg = RetrainConfig(
        train=TrainConfig(data=str(synthetic_root), registry=str(registry_root), folds=2, final_fit=False,
                          scorer=ScorerConfig(epochs=1),
                          detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8, collapse_retries=0)),
        margin=-100.0, holdout_fraction=fraction,  # any challenger would win a fair comparison
    )
    decision = run_retrain(cfg)
    registry = ModelRegistry(str(registry_root))
    assert not decision.promoted and decision.champion == trained.version
    assert "comparison refused" in decision.reason and f"--set {decision.challenger}" in decision.reason
    assert registry.champion()["version"] == trained.version
    assert decision.challenger in registry.versions() and decision.challenger != trained.version
    assert decision.challenger_score is not None and decision.champion_score is None
    manifest = registry.manifest(decision.challenger)
    assert set(manifest["data"]["excluded_studies"]) == set(holdout_studies(ids, fraction))
    assert manifest["config"]["holdout_rule"] == [fraction, HOLDOUT_SALT]
    recorded = decisions(registry)
    assert recorded and recorded[-1]["challenger"] == decision.challenger and recorded[-1]["promoted"] is False
    assert "refused" in recorded[-1]["reason"]


def test_verdict_needs_the_margin():
    from lumbar_ray.training.promotion import FIRST_VERSION
    from lumbar_ray.training.retrain import verdict

    assert verdict(0.50, 0.60, 0.05, "v1") == (True, "better by 0.1000 >= margin 0.05")
    better, why = verdict(0.58, 0.60, 0.05, "v1")
    assert not better and "not better by the margin" in why and "champion v1 stays" in why
    assert verdict(0.9, None, 0.05, None) == (True, FIRST_VERSION)

def test_unseen_holdout_from_the_champions_card():
    holdout, rule = [11, 12, 13], (0.2, HOLDOUT_SALT)
    # the same holdout rule: membership is a hash of the id, so it never trained on any of them
    assert unseen_holdout({"config": {"holdout_rule": [0.2, HOLDOUT_SALT]}}, holdout, rule) == holdout
    # another rule: only the studies its card lists as excluded
    other = {"config": {"holdout_rule": [0.3, "other"], "exclude_studies": [12]}, "data": {"excluded_studies": [13, 99]}}
    assert unseen_holdout(other, holdout, rule) == [12, 13]
    # trained on every study (`train` without a holdout), or a card without a word on it
    assert unseen_holdout({"config": {"holdout_rule": None}, "data": {"excluded_studies": []}}, holdout, rule) == []
    assert unseen_holdout({}, holdout, rule) == []


def test_paired_scores_compare_on_the_rows_every_model_has():
    import pandas as pd

    from lumbar_ray.metrics.rsna import rsna_score

    rows = [{"study_id": s, "column": "spinal_canal_stenosis_l1_l2", "label": 0} for s in (1, 2)]
    good = pd.DataFrame(rows).assign(normal_mild=0.9, moderate=0.05, severe=0.05)
    bad = pd.DataFrame(rows[:1]).assign(normal_mild=0.2, moderate=0.4, severe=0.4)  # study 2 failed for it
    scores, n = paired_scores({"challenger": good, "champion": bad})
    assert n == 1 and scores["challenger"] == pytest.approx(rsna_score(good.iloc[:1]).score)
    with pytest.raises(ValueError, match="no holdout row"):
        paired_scores({"challenger": good, "champion": bad.iloc[:0]})


def _fraction_with_a_small_holdout(ids) -> float:
    return next(f for f in (0.2, 0.3, 0.4, 0.5) if 1 <= len(holdout_studies(ids, f)) <= 3)


def _weak_champion(root, card: dict) -> ModelRegistry:
    """A registry whose champion v1 is untrained (tests/registries.py), made deliberately weak:
    temperature 0.05 on every condition sharpens its near-uniform guesses to near-certain ones."""
    from registries import untrained_registry

    from lumbar_ray.targets import TARGETS

    temperatures = {t.condition.slug: 0.05 for t in TARGETS}
    spec = untrained_registry(root, card={"calibration": {"temperatures": temperatures}, **card})
    registry = ModelRegistry(spec.split("@")[0])
    registry.set_champion("v1", reason="a weak champion for the test")
    return registry


@pytest.mark.slow
@pytest.mark.ray
def test_retrain_promotes_a_challenger_that_beats_the_champion(ray_runtime, synthetic_root, tmp_path):
    """A short real retrain (DeepScoreNet only, 2 folds, 1 epoch) against a deliberately weak
    champion trained under the same holdout rule: compared on the holdout, the challenger wins
    by more than the margin and is promoted through the compare-and-swap, and the decision says so."""
    from lumbar_ray.config import RetrainConfig, ScorerConfig, TrainConfig
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.training.retrain import run_retrain

    ids = [int(s) for s in list_studies(str(synthetic_root), "train")]
    fraction = _fraction_with_a_small_holdout(ids)
    registry = _weak_champion(tmp_path, {"config": {"detector": {"conf": 1e-9}, "holdout_rule": [fraction, HOLDOUT_SALT]}})
    cfg = RetrainConfig(
        train=TrainConfig(data=str(synthetic_root), registry=registry.root, folds=2, final_fit=False, models=("scorer",),
                          scorer=ScorerConfig(epochs=1, batch_size=64)),
        margin=0.005, holdout_fraction=fraction,
    )
    decision = run_retrain(cfg, echo=print)
    assert decision.champion == "v1" and decision.challenger != "v1"
    assert decision.promoted, decision.reason
    assert decision.challenger_score <= decision.champion_score - cfg.margin
    assert decision.holdout_studies == len(holdout_studies(ids, fraction))
    assert registry.champion()["version"] == decision.challenger
    assert "better by" in registry.champion()["reason"]
    recorded = decisions(registry)[-1]
    assert recorded["challenger"] == decision.challenger and recorded["promoted"] is True
    assert recorded["champion"] == "v1" and "better by" in recorded["reason"]
    manifest = registry.manifest(decision.challenger)
    assert set(manifest["data"]["excluded_studies"]) == set(holdout_studies(ids, fraction))
    # scorer only: no end-to-end figure, and the card says why
    assert "no detectors" in manifest["metrics"]["end_to_end"]["skipped"]
    print(f"\nholdout RSNA score: challenger {decision.challenger_score:.4f}, weak champion {decision.champion_score:.4f}")
