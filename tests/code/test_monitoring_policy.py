"""Drift policy: thresholds, sample-size gating, overrides (pure functions, no Evidently)."""

from __future__ import annotations

import pytest

from monitoring.policy import (
    FEATURE_DRIFT,
    PREDICTION_DRIFT,
    DriftPolicy,
    MetricRule,
    Observation,
    decide,
    evaluate,
)
from recflow.settings import MonitoringSettings


def _obs(feature: float = 0.0, prediction: float = 0.0, ndcg: float = 0.2, ndcg_ref: float = 0.2,
         n: int = 1000, n_fb: int = 500) -> list[Observation]:
    return [
        Observation(metric=FEATURE_DRIFT, value=feature, n=n),
        Observation(metric=PREDICTION_DRIFT, value=prediction, n=n),
        Observation(metric="ndcg_at_k", value=ndcg, reference=ndcg_ref, n=n_fb),
        Observation(metric="hit_rate_at_k", value=0.4, reference=0.4, n=n_fb),
    ]


@pytest.fixture()
def policy() -> DriftPolicy:
    return DriftPolicy.from_settings(MonitoringSettings())


def test_no_drift_gives_false(policy: DriftPolicy) -> None:
    decision = decide(_obs(), policy, n_current=1000, n_reference=1000)
    assert decision.drift is False
    assert all(m.verdict == "ok" for m in decision.metrics)
    assert decision.reasons and "no gating metric" in decision.reasons[0]


def test_injected_feature_drift_gives_true(policy: DriftPolicy) -> None:
    decision = decide(_obs(feature=0.5), policy, n_current=1000, n_reference=1000)
    assert decision.drift is True
    verdicts = {m.metric: m.verdict for m in decision.metrics}
    assert verdicts[FEATURE_DRIFT] == "drift"
    assert verdicts[PREDICTION_DRIFT] == "ok"
    assert any(r.startswith("feature_drift_share") for r in decision.reasons)


def test_quality_drop_is_relative_to_reference(policy: DriftPolicy) -> None:
    # threshold 0.1: a 5 % drop is fine, a 20 % drop is drift, an improvement is never drift
    assert decide(_obs(ndcg=0.19, ndcg_ref=0.2), policy, n_current=1000, n_reference=1000).drift is False
    dropped = decide(_obs(ndcg=0.16, ndcg_ref=0.2), policy, n_current=1000, n_reference=1000)
    assert dropped.drift is True
    ndcg = next(m for m in dropped.metrics if m.metric == "ndcg_at_k")
    assert ndcg.statistic == pytest.approx(0.2)
    assert decide(_obs(ndcg=0.4, ndcg_ref=0.2), policy, n_current=1000, n_reference=1000).drift is False


def test_threshold_is_respected_at_the_boundary() -> None:
    rule = MetricRule(kind="max_value", threshold=0.3, min_samples=10)
    assert evaluate(Observation(metric="x", value=0.3, n=100), rule).verdict == "ok"
    assert evaluate(Observation(metric="x", value=0.3001, n=100), rule).verdict == "drift"


def test_settings_thresholds_and_overrides_are_used() -> None:
    strict = DriftPolicy.from_settings(MonitoringSettings(drift_share_threshold=0.1,
                                                          metric_thresholds={"ndcg_at_k": 0.5}))
    assert strict.rules[FEATURE_DRIFT].threshold == 0.1
    assert strict.rules["ndcg_at_k"].threshold == 0.5
    assert strict.rules["hit_rate_at_k"].threshold == MonitoringSettings().quality_drop_threshold
    # 0.2 feature drift: drift under 0.1, fine under the default 0.3; a 40 % NDCG drop is within 0.5
    assert decide(_obs(feature=0.2, ndcg=0.12, ndcg_ref=0.2), strict, n_current=1000, n_reference=1000).drift
    lenient = DriftPolicy.from_settings(MonitoringSettings(metric_thresholds={"ndcg_at_k": 0.5}))
    assert decide(_obs(feature=0.2, ndcg=0.12, ndcg_ref=0.2), lenient, n_current=1000,
                  n_reference=1000).drift is False


def test_unknown_override_is_rejected_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="unknown metric.*ndcg_at_10.*known metrics"):
        DriftPolicy.from_settings(MonitoringSettings(metric_thresholds={"ndcg_at_10": 0.2}))


def test_too_few_requests_gives_no_decision(policy: DriftPolicy) -> None:
    decision = decide(_obs(feature=0.9, n=50), policy, n_current=50, n_reference=1000)
    assert decision.drift is None
    assert "too few requests" in decision.reasons[0]
    feature = next(m for m in decision.metrics if m.metric == FEATURE_DRIFT)
    assert feature.verdict == "insufficient_data"  # 50 < min_samples 200


def test_too_few_feedback_users_skips_quality_only(policy: DriftPolicy) -> None:
    decision = decide(_obs(ndcg=0.01, ndcg_ref=0.2, n_fb=10), policy, n_current=1000, n_reference=1000)
    assert decision.drift is False  # features fine, quality not assessable
    ndcg = next(m for m in decision.metrics if m.metric == "ndcg_at_k")
    assert ndcg.verdict == "insufficient_data"
    assert any("ndcg_at_k: not assessed" in r for r in decision.reasons)


def test_missing_values_are_insufficient_not_ok(policy: DriftPolicy) -> None:
    obs = [Observation(metric=FEATURE_DRIFT, value=None, n=1000),
           Observation(metric=PREDICTION_DRIFT, value=None, n=1000)]
    decision = decide(obs, policy, n_current=1000, n_reference=1000)
    assert decision.drift is None
    assert {m.verdict for m in decision.metrics} == {"insufficient_data"}


def test_advisory_metrics_are_reported_but_do_not_decide(policy: DriftPolicy) -> None:
    obs = [*_obs(), Observation(metric="popularity_gini", value=0.9, reference=0.3, n=500)]
    decision = decide(obs, policy, n_current=1000, n_reference=1000)
    gini = next(m for m in decision.metrics if m.metric == "popularity_gini")
    assert gini.verdict == "drift" and gini.gate is False
    assert decision.drift is False
    assert any(r.startswith("advisory: popularity_gini") for r in decision.reasons)
