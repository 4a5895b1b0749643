"""Incremental retraining pieces: warm start, the replay sample, the promotion gate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from training.incremental import gate, replay_sample, warm_start
from training.synthetic import synthetic_data
from training.trainer import TrainConfig, evaluate_model, fit

SMALL = {"batch_size": 16, "n_uniform": 32, "dim": 16, "hidden": 32, "log_every": 0}


@pytest.fixture(scope="module")
def data():  # noqa: ANN201
    return synthetic_data(n_users=40, n_items=80, train_weeks=6)[0]


@pytest.fixture(scope="module")
def champion(data):  # noqa: ANN001, ANN201
    return fit(data, TrainConfig(epochs=2, lr=5e-3, **SMALL)).model


def test_warm_start_reproduces_the_champion(data, champion) -> None:  # noqa: ANN001
    """A warm-started model that has not trained yet scores exactly like the champion."""
    res = fit(data, TrainConfig(epochs=1, max_steps=1, lr=1e-12, **SMALL), init=champion)
    before = evaluate_model(champion, data, data.val)
    after = evaluate_model(res.model, data, data.val)
    assert after["ndcg@10"] == pytest.approx(before["ndcg@10"], abs=1e-4)
    cold = fit(data, TrainConfig(epochs=1, max_steps=1, lr=1e-12, **SMALL))
    assert cold.val_metrics["ndcg@10"] != pytest.approx(before["ndcg@10"], abs=1e-4)


def test_warm_start_maps_id_rows_through_item_ids(data, champion) -> None:  # noqa: ANN001
    """Items keep their id-embedding rows even when the id vocabulary is renumbered."""
    target = copy.deepcopy(champion)
    known = np.flatnonzero(target.item_id_row.numpy() > 0)
    moved = target.item_id_row.clone()
    perm = np.random.default_rng(0).permutation(len(known))
    moved[torch.from_numpy(known)] = target.item_id_row[torch.from_numpy(known[perm])]
    target.item_id_row.copy_(moved)
    with torch.no_grad():
        target.id_emb.weight.zero_()
    report = warm_start(target, champion)
    assert report.id_rows_copied == len(known)
    for pos in known[:10]:
        new_row, old_row = int(target.item_id_row[pos]), int(champion.item_id_row[pos])
        assert torch.equal(target.id_emb.weight[new_row], champion.id_emb.weight[old_row])


def test_replay_sample_keeps_recent_weeks_and_a_share_of_older(data) -> None:  # noqa: ANN001
    d = copy.copy(data)
    n_train = len(d.anchors) - 3
    anchors = d.train.anchor.copy()
    counts = replay_sample(d, recent_weeks=2, replay_share=0.5, seed=0)
    recent_total = int((anchors >= n_train - 2).sum())
    assert counts["recent"] == recent_total
    assert int((d.train.anchor >= n_train - 2).sum()) == recent_total
    assert 0 < counts["replayed"] < counts["older_total"]
    assert len(d.train) == counts["recent"] + counts["replayed"]
    none = copy.copy(data)
    assert replay_sample(none, recent_weeks=2, replay_share=0.0)["replayed"] == 0
    with pytest.raises(ValueError, match="replay_share"):
        replay_sample(copy.copy(data), recent_weeks=1, replay_share=1.5)


def test_gate() -> None:
    champ = {"ndcg@10": 0.30, "ndcg@10_new": 0.02}
    worse = gate(champ, {"ndcg@10": 0.29, "ndcg@10_new": 0.02}, margin=0.01)
    assert not worse.promote and "misses" in worse.reason
    tie = gate(champ, {"ndcg@10": 0.301, "ndcg@10_new": 0.02}, margin=0.01)
    assert not tie.promote  # better, but not by the margin
    better = gate(champ, {"ndcg@10": 0.31, "ndcg@10_new": 0.02}, margin=0.01)
    assert better.promote and "meets" in better.reason
    collapsed = gate(champ, {"ndcg@10": 0.31, "ndcg@10_new": 0.01}, margin=0.01)
    assert not collapsed.promote and "ndcg@10_new fell" in collapsed.reason
    assert not gate(champ, {"ndcg@10": float("nan"), "ndcg@10_new": 0.02}).promote


def test_retrain_window_and_report() -> None:
    import pandas as pd

    from recflow.settings import TrainingSettings
    from training.incremental import GateDecision, retrain_markdown, retrain_window

    ts = pd.to_datetime(["2024-03-01T10:00Z", "2024-03-09T23:00Z", "2024-03-10T08:00Z"])
    events = pd.DataFrame({"event_timestamp": ts, "user_id": ["a", "b", "c"]})
    t = TrainingSettings(eval_days=7, train_weeks=12, retrain_recent_weeks=4, retrain_replay_weeks=12)
    before, end, cutoff, weeks = retrain_window(events, None, t, full=False)
    assert end == pd.Timestamp("2024-03-11", tz="UTC") and cutoff == pd.Timestamp("2024-03-04", tz="UTC")
    assert len(before) == 3 and weeks == 16
    before, end, _, weeks = retrain_window(events, "2024-03-10", t, full=True)
    assert end == pd.Timestamp("2024-03-10", tz="UTC") and len(before) == 2 and weeks == 12  # the gate week ends at as_of
    m = {k: 0.5 for k in ("ndcg@10", "recall@20", "hitrate@10", "ndcg@10_new", "ndcg@10_repeat", "coverage")}
    text = retrain_markdown("m:1", "m:2", m, {**m, "ndcg@10": 0.6}, GateDecision(True, "ndcg@10", 0.5, 0.6, 0.01, "better by 20%"),
                            "2024-03-04 .. 2024-03-11", "m:2")
    assert text.startswith("# Retrain: challenger promoted") and "| ndcg@10 | 0.5000 | 0.6000 |" in text
    assert "Gate week 2024-03-04 .. 2024-03-11: better by 20%." in text and text.endswith("Champion now: `m:2`.\n")
