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
