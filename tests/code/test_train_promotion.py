"""training.incremental.promotion_decision: the retrain flow's gate, the empty-registry exception, and the
cases where no gate can run."""

from __future__ import annotations

M = {"ndcg@10": 0.20, "ndcg@10_new": 0.05, "recall@20": 0.1}


def test_the_train_flow_decides_through_the_retrain_gate(make_settings) -> None:  # noqa: ANN001
    from training.incremental import promotion_decision

    s = make_settings().training
    champ = {"tag": "m:1", "kind": "two-stage", "week": "test", "metrics": M}
    first = promotion_decision(s, None, M)
    assert first["promote"] and first["gate"] is None and "empty registry" in first["reason"]
    better = promotion_decision(s, champ, {**M, "ndcg@10": 0.25})
    assert better["promote"] and better["gate"]["challenger"] == 0.25 and "m:1" in better["reason"]
    tie = promotion_decision(s, champ, M)  # not better by the margin
    assert not tie["promote"] and "misses the required +1.0%" in tie["reason"] and tie["gate"]["champion"] == 0.20
    guarded = promotion_decision(s, champ, {**M, "ndcg@10": 0.3, "ndcg@10_new": 0.01})
    assert not guarded["promote"] and "ndcg@10_new fell" in guarded["reason"]
    broken = promotion_decision(s, {"tag": "m:1", "error": "ValueError: features differ"}, M)
    assert not broken["promote"] and broken["gate"] is None and "could not be evaluated" in broken["reason"]
    off = promotion_decision(make_settings(training={"promote": False}).training, None, M)
    assert not off["promote"] and "training.promote=false" in off["reason"]
