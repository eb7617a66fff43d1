"""Temperature scaling per condition and the expected calibration error (pure, no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lumbar_ray.metrics.calibration import (
    apply_temperature,
    calibrate_frame,
    cross_fitted_frame,
    expected_calibration_error,
    fit_temperature,
    fit_temperatures,
)
from lumbar_ray.metrics.rsna import rsna_score
from lumbar_ray.targets import PROBABILITY_COLUMNS, TARGETS

PROBS = list(PROBABILITY_COLUMNS)


def _overconfident(n: int, rng, sharpen: float = 3.0):
    """Labels drawn from true probabilities, predictions = the truth sharpened (overconfident)."""
    logits = rng.normal(0.0, 1.0, size=(n, 3))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in true])
    return apply_temperature(true, 1.0 / sharpen), labels, true


def test_temperature_undoes_overconfidence_and_lowers_the_loss():
    rng = np.random.default_rng(0)
    probs, labels, _ = _overconfident(4000, rng, sharpen=3.0)
    t = fit_temperature(probs, labels, weighted=False)
    assert 2.5 < t < 3.6  # the sharpening it has to undo is 3
    before = expected_calibration_error(probs, labels)
    after = expected_calibration_error(apply_temperature(probs, t), labels)
    assert after < before / 2
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-6)
    # the ranking of the classes never changes
    assert (apply_temperature(probs, t).argmax(axis=1) == probs.argmax(axis=1)).all()
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0


def _frame(rng, n_studies: int = 120, sharpen: float = 2.5) -> pd.DataFrame:
    rows = []
    for study in range(n_studies):
        for t in TARGETS:
            probs, labels, _ = _overconfident(1, rng, sharpen)
            rows.append({"study_id": study, "column": t.column, "label": int(labels[0]), "fold": study % 3,
                         **dict(zip(PROBS, probs[0]))})
    return pd.DataFrame(rows)


def test_per_condition_fit_and_cross_fitting_improve_the_rsna_score():
    frame = _frame(np.random.default_rng(1))
    frame[PROBS] = frame[PROBS].astype(np.float32)  # as training's out-of-fold frames hold them
    temperatures = fit_temperatures(frame)
    assert set(temperatures) == {t.condition.slug for t in TARGETS}
    assert all(1.2 < v < 5.0 for v in temperatures.values())
    calibrated = calibrate_frame(frame, temperatures)
    crossed = cross_fitted_frame(frame)
    assert list(crossed.index) == list(frame.index)
    before, fitted, honest = (rsna_score(f).score for f in (frame, calibrated, crossed))
    assert fitted < before and honest < before
    assert honest >= fitted - 1e-9  # fitting on the scored rows flatters; cross-fitting does not
    # an unknown condition is left alone
    same = calibrate_frame(frame, {"no_such_condition": 3.0})
    np.testing.assert_allclose(same[PROBS].to_numpy(), frame[PROBS].to_numpy())


def test_scoring_applies_the_cards_temperatures_and_the_weighted_prior(tmp_path):
    from registries import untrained_registry  # tests/ is on sys.path (conftest.py)

    from lumbar_ray.metrics.rsna import prior_baseline, weighted_prior_from_card
    from lumbar_ray.scoring.study import DetectedStudy, ModelBundle, TargetHit, study_rows

    rng = np.random.default_rng(3)
    labels = pd.DataFrame([{"study_id": s, "column": t.column, "label": int(rng.integers(0, 3))}
                           for s in range(30) for t in TARGETS])
    prior = prior_baseline(labels)
    card_priors = {c: prior.loc[c].tolist() for c in prior.index}
    temperatures = {t.condition.slug: 1.5 + 0.25 * i for i, t in enumerate(TARGETS) if t.level_index == 0}
    spec = untrained_registry(tmp_path, card={"priors": card_priors, "calibration": {"temperatures": temperatures}})
    bundle = ModelBundle.from_registry(spec, device="cpu", parts=("scorer",))
    assert bundle.temperatures == temperatures
    weighted = weighted_prior_from_card(card_priors)
    assert bundle.priors == {c: weighted.loc[c].tolist() for c in weighted.index}

    hits = [TargetHit(t.index, "1", 0, 1, 10.0, 10.0, 0.9) if t.index % 2 == 0 else TargetHit(t.index) for t in TARGETS]
    detected = DetectedStudy("7", hits, np.zeros((13, 3, 32, 32), np.float32))
    raw = rng.dirichlet(np.ones(3), size=13)
    rows = study_rows(detected, raw, bundle.version, bundle.priors, "run", pd.Timestamp.now(tz="UTC"),
                      bundle.temperatures)
    it = iter(raw)
    for t, row in zip(TARGETS, rows.itertuples()):
        got = np.array([getattr(row, c) for c in PROBS])
        if t.index % 2 == 0:
            expected = apply_temperature(next(it)[None, :], temperatures[t.condition.slug])[0]
        else:
            expected = np.asarray(bundle.priors[t.column])
        np.testing.assert_allclose(got, expected, atol=1e-12)
    # no calibration in the card: the probabilities pass unchanged
    plain = study_rows(detected, raw, "v", bundle.priors, "run", pd.Timestamp.now(tz="UTC"))
    np.testing.assert_allclose(plain[plain["detected"]][PROBS].to_numpy(), raw, atol=1e-12)
