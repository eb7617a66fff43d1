"""Scheduled retraining: champion/challenger on the same holdout, atomic compare-and-swap promotion."""

import threading

import pytest

from lumbar_ray.models.registry import ModelRegistry
from lumbar_ray.training.promotion import PromotionLock, PromotionLockBusy, decisions, promote_if_unchanged
from lumbar_ray.training.retrain import holdout_studies, is_holdout
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
def test_retrain_that_is_not_better_leaves_the_champion(ray_runtime, synthetic_root, trained, tmp_path):
    import shutil

    from lumbar_ray.config import DetectorConfig, ScorerConfig, TrainConfig
    from lumbar_ray.dicom.read import list_studies
    from lumbar_ray.config import RetrainConfig
    from lumbar_ray.training.retrain import run_retrain

    registry_root = tmp_path / "registry"
    shutil.copytree(trained.registry, registry_root)
    ids = [int(s) for s in list_studies(str(synthetic_root), "train")]
    fraction = next(f for f in (0.2, 0.3, 0.4, 0.5) if 1 <= len(holdout_studies(ids, f)) <= 4)
    cfg = RetrainConfig(
        train=TrainConfig(data=str(synthetic_root), registry=str(registry_root), folds=2, final_fit=False,
                          scorer=ScorerConfig(epochs=1), detector=DetectorConfig(epochs=1, imgsz=64, batch_size=8)),
        # An impossible margin: the challenger would have to beat the champion by 100 log-loss.
        margin=100.0, holdout_fraction=fraction,
    )
    decision = run_retrain(cfg)
    registry = ModelRegistry(str(registry_root))
    assert not decision.promoted
    assert decision.champion == trained.version
    assert registry.champion()["version"] == trained.version
    assert decision.challenger in registry.versions() and decision.challenger != trained.version
    assert decision.challenger_score is not None and decision.champion_score is not None
    manifest = registry.manifest(decision.challenger)
    assert set(manifest["data"]["excluded_studies"]) == set(holdout_studies(ids, fraction))
    recorded = decisions(registry)
    assert recorded and recorded[-1]["challenger"] == decision.challenger and recorded[-1]["promoted"] is False
