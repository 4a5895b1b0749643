"""Declarative drift policy: thresholds per metric and the retrain/no-retrain decision.

Pure functions, no I/O. Build a policy from settings with :meth:`DriftPolicy.from_settings`,
collect :class:`Observation` objects (a value, optionally its reference value, and the sample
size behind it) and call :func:`decide`.

Rule kinds:

- ``max_value``: drift when ``value > threshold`` (e.g. share of drifted features);
- ``max_relative_drop``: drift when ``(reference - value) / reference > threshold`` (quality);
- ``max_relative_change``: drift when ``|value - reference| / |reference| > threshold``.

Only ``gate`` rules decide drift; the others are advisory: their verdict is reported (and listed
in the reasons, marked ``advisory``) but does not trigger retraining.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from recflow.settings import MonitoringSettings

Verdict = Literal["ok", "drift", "insufficient_data"]
RuleKind = Literal["max_value", "max_relative_drop", "max_relative_change"]

# Metric names used in summary.json (stable: dashboards and the index page read them).
FEATURE_DRIFT = "feature_drift_share"
PREDICTION_DRIFT = "prediction_drift_share"
QUALITY_METRICS = ("ndcg_at_k", "recall_at_k", "hit_rate_at_k")
ADVISORY_METRICS = ("novelty", "popularity_arp", "coverage", "popularity_gini", "personalization")


class MetricRule(BaseModel):
    """How one metric is judged."""

    kind: RuleKind
    threshold: float = Field(ge=0)
    min_samples: int = Field(ge=1)
    gate: bool = True


class DriftPolicy(BaseModel):
    """Thresholds for every monitored metric plus the minimum request volume for any decision."""

    min_samples: int = Field(ge=1)
    rules: dict[str, MetricRule]

    @classmethod
    def from_settings(cls, settings: MonitoringSettings) -> DriftPolicy:
        """Default rules from ``MonitoringSettings``; ``metric_thresholds`` overrides any threshold."""
        rules: dict[str, MetricRule] = {
            FEATURE_DRIFT: MetricRule(kind="max_value", threshold=settings.drift_share_threshold,
                                      min_samples=settings.min_samples),
            PREDICTION_DRIFT: MetricRule(kind="max_value", threshold=settings.prediction_drift_share_threshold,
                                         min_samples=settings.min_samples),
        }
        for name in QUALITY_METRICS:
            rules[name] = MetricRule(kind="max_relative_drop", threshold=settings.quality_drop_threshold,
                                     min_samples=settings.min_feedback_users)
        for name in ADVISORY_METRICS:
            rules[name] = MetricRule(kind="max_relative_change", threshold=settings.advisory_change_threshold,
                                     min_samples=settings.min_feedback_users if name != "coverage"
                                     else settings.min_samples, gate=False)
        unknown = sorted(set(settings.metric_thresholds) - set(rules))
        if unknown:
            raise ValueError(
                f"monitoring.metric_thresholds: unknown metric(s) {unknown}; known metrics are {sorted(rules)}."
            )
        for name, threshold in settings.metric_thresholds.items():
            rules[name] = rules[name].model_copy(update={"threshold": float(threshold)})
        return cls(min_samples=settings.min_samples, rules=rules)


class Observation(BaseModel):
    """A measured metric: current ``value``, optional ``reference`` value, samples behind it."""

    metric: str
    value: float | None
    reference: float | None = None
    n: int = Field(ge=0, description="Samples behind the value (the smaller side when compared).")


class MetricVerdict(BaseModel):
    """One line of ``summary.json``."""

    metric: str
    value: float | None
    reference: float | None
    threshold: float
    rule: RuleKind
    gate: bool
    n: int
    verdict: Verdict
    statistic: float | None = Field(description="What the threshold was compared with (value, drop or change).")
    reason: str


class Decision(BaseModel):
    """Outcome of a monitor run: ``drift`` is None when there is too little data to decide."""

    drift: bool | None
    reasons: list[str]
    metrics: list[MetricVerdict]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def evaluate(obs: Observation, rule: MetricRule) -> MetricVerdict:
    """Apply ``rule`` to ``obs``."""
    base = {"metric": obs.metric, "value": obs.value, "reference": obs.reference, "threshold": rule.threshold,
            "rule": rule.kind, "gate": rule.gate, "n": obs.n}
    needs_ref = rule.kind != "max_value"
    if obs.n < rule.min_samples or not _finite(obs.value) or (needs_ref and not _finite(obs.reference)):
        why = (f"{obs.n} samples < {rule.min_samples}" if obs.n < rule.min_samples
               else "no value" if not _finite(obs.value) else "no reference value")
        return MetricVerdict(**base, verdict="insufficient_data", statistic=None,
                             reason=f"{obs.metric}: not assessed ({why})")
    value = float(obs.value)  # type: ignore[arg-type]
    if rule.kind == "max_value":
        stat, text = value, f"{obs.metric} = {value:.3f}"
    else:
        ref = float(obs.reference)  # type: ignore[arg-type]
        if rule.kind == "max_relative_drop":
            stat = (ref - value) / ref if ref > 0 else 0.0
            text = f"{obs.metric} {value:.4f} vs reference {ref:.4f} ({-stat:+.1%})"
        else:
            stat = abs(value - ref) / abs(ref) if ref != 0 else (0.0 if value == 0 else math.inf)
            text = f"{obs.metric} {value:.4f} vs reference {ref:.4f} (change {stat:.1%})"
    drifted = stat > rule.threshold
    verdict: Verdict = "drift" if drifted else "ok"
    comparison = ">" if drifted else "<="
    return MetricVerdict(**base, verdict=verdict, statistic=stat,
                         reason=f"{text}; {comparison} threshold {rule.threshold:g}")


def decide(observations: list[Observation], policy: DriftPolicy, *, n_current: int, n_reference: int) -> Decision:
    """Judge every observation and take the overall decision.

    ``drift`` is None when either side has fewer than ``policy.min_samples`` requests, or when no
    gating metric could be assessed; True when any gating metric drifted; False otherwise.
    Metrics without a rule are ignored. Reasons list drifted metrics first, then advisory flags,
    then what could not be assessed.
    """
    verdicts = [evaluate(o, policy.rules[o.metric]) for o in observations if o.metric in policy.rules]
    gating = [v for v in verdicts if v.gate]
    drifted = [v for v in gating if v.verdict == "drift"]
    advisory = [v for v in verdicts if not v.gate and v.verdict == "drift"]
    unassessed = [v for v in verdicts if v.verdict == "insufficient_data"]
    reasons = [v.reason for v in drifted] + [f"advisory: {v.reason}" for v in advisory]
    drift: bool | None
    if n_current < policy.min_samples or n_reference < policy.min_samples:
        drift = None
        reasons.insert(0, f"too few requests to decide: current {n_current}, reference {n_reference} "
                          f"(minimum {policy.min_samples})")
    elif not gating or all(v.verdict == "insufficient_data" for v in gating):
        drift = None
        reasons.insert(0, "no gating metric could be assessed")
    else:
        drift = bool(drifted)
        if not drifted:
            reasons.insert(0, "no gating metric crossed its threshold")
    reasons += [v.reason for v in unassessed]
    return Decision(drift=drift, reasons=reasons, metrics=verdicts)
