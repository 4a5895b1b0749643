"""Ranking metrics and the evaluation harness against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from training.evaluate import EvalSet, evaluate, hitrate_at_k, ndcg_at_k, recall_at_k
from training.examples import UserRows


def test_ndcg_recall_hitrate_by_hand() -> None:
    # user 0: relevant at ranks 1 and 3, 2 relevant items; user 1: relevant at rank 2, 3 relevant items (1 outside)
    top_rel = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    n_rel = torch.tensor([2, 3])
    dcg0 = 1 + 1 / math.log2(4)
    idcg0 = 1 + 1 / math.log2(3)
    dcg1 = 1 / math.log2(3)
    idcg1 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(top_rel, n_rel, 4).tolist() == pytest.approx([dcg0 / idcg0, dcg1 / idcg1])
    # k=2: ideal is capped at 2 positions
    assert ndcg_at_k(top_rel, n_rel, 2).tolist() == pytest.approx([1 / idcg0, dcg1 / idcg0])
    assert recall_at_k(top_rel, n_rel, 4).tolist() == pytest.approx([1.0, 1 / 3])
    assert recall_at_k(top_rel, n_rel, 1).tolist() == pytest.approx([0.5, 0.0])
    assert hitrate_at_k(top_rel, 1).tolist() == [1.0, 0.0]
    assert ndcg_at_k(top_rel[:1], torch.tensor([0]), 4).tolist() == [0.0]


def _evalset() -> EvalSet:
    # 2 users, 6 items; user 0 bought items 0 and 1 before; user 1 bought item 2 before.
    # targets: user 0 -> {0, 3}; user 1 -> {4, 5}; item 5 first sold after the anchor (cold)
    rows = UserRows(
        user_ids=np.array(["a", "b"]), anchor=np.zeros(2, np.int64), hist_offsets=np.array([0, 0, 0]),
        hist_items=np.zeros(0, np.int64), hist_ts=np.zeros(0, np.int64), activity=np.zeros((2, 11)),
        profile=[[None] * 7] * 2, target_offsets=np.array([0, 2, 4]), targets=np.array([0, 3, 4, 5]),
    )
    cold = np.array([False] * 5 + [True])
    return EvalSet("t", pd.Timestamp("2024-01-01", tz="UTC"), rows, np.array([0, 2, 3]), np.array([0, 1, 2]), cold, 6)


def test_evaluate_slices_by_hand() -> None:
    ev = _evalset()
    scores = torch.tensor([
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # user 0 ranks 0,1,2,3,... ; seen-removed: 2,3,4,5
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # user 1 ranks 5,4,3,2,1,0 ; seen-removed: 5,4,3,1,0
    ])
    m = evaluate(lambda rows: scores[rows], ev, k=2, k_recall=2)
    d = 1 / math.log2(3)
    # full ranking: user 0 top2 = [0, 1] -> rel [1, 0]; user 1 top2 = [5, 4] -> rel [1, 1]
    assert m["ndcg@2"] == pytest.approx((1 / (1 + d) + 1.0) / 2)
    assert m["recall@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["hitrate@2"] == 1.0
    # repeat slice: only user 0 has a repeat target (item 0), ranked first
    assert m["n_users_repeat"] == 1 and m["ndcg@2_repeat"] == pytest.approx(1.0)
    # new slice, seen removed: user 0 top2 = [2, 3] -> rel (target 3) [0, 1]; user 1 top2 = [5, 4] -> [1, 1]
    assert m["n_users_new"] == 2
    assert m["ndcg@2_new"] == pytest.approx((d / 1.0 + 1.0) / 2)
    # cold slice: user 1, item 5 at rank 1
    assert m["n_users_cold"] == 1 and m["ndcg@2_cold"] == pytest.approx(1.0)
    # coverage: top2 union {0, 1, 4, 5} of 6 items
    assert m["coverage"] == pytest.approx(4 / 6)
    assert m["coverage_new"] == pytest.approx(4 / 6)


def test_evaluate_rejects_wrong_shape() -> None:
    ev = _evalset()
    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda rows: torch.zeros(len(rows), 5), ev)


def test_cold_since_cutoff_versus_never_sold_before_the_week() -> None:
    # item 4 was first sold between the cutoff and the week (cold: the model never saw it sold; not
    # unsold: the week's history knows it); item 5 first sold in the week (both)
    ev = _evalset()
    ev.cold = np.array([False] * 4 + [True, True])
    ev.unsold = np.array([False] * 5 + [True])
    scores = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 6.0, 5.0]])
    m = evaluate(lambda rows: scores[rows], ev, k=2, k_recall=2)
    d = 1 / math.log2(3)
    # user 1, seen removed: top2 = [4, 5]; cold targets {4, 5} -> ideal; unsold target {5} at rank 2
    assert m["n_users_cold"] == 1 and m["ndcg@2_cold"] == pytest.approx(1.0)
    assert m["n_users_unsold"] == 1 and m["ndcg@2_unsold"] == pytest.approx(d)


def test_make_evalset_cold_since() -> None:
    from training.evaluate import make_evalset
    from training.examples import Catalogue

    t = pd.Timestamp("2024-01-08", tz="UTC")
    items = pd.DataFrame({"item_id": ["i0", "i1", "i2"], "text": ["a", "b", "c"],
                          "first_seen": pd.to_datetime(["2023-12-01", "2024-01-03", "2024-01-09"], utc=True)})
    cat = Catalogue.from_items(items)
    events = pd.DataFrame({"user_id": ["a"], "item_id": ["i0"], "event_type": ["purchase"],
                           "event_timestamp": pd.to_datetime(["2023-12-01"], utc=True)})
    rows = UserRows(np.array(["a"]), np.zeros(1, np.int64), np.array([0, 0]), np.zeros(0, np.int64), np.zeros(0, np.int64),
                    np.zeros((1, 11)), [[None] * 7], np.array([0, 2]), np.array([1, 2]))
    strict = make_evalset("w", rows, events, cat, t)
    assert strict.cold.tolist() == [False, False, True] and strict.unsold.tolist() == [False, False, True]
    since = make_evalset("w", rows, events, cat, t, cold_since=pd.Timestamp("2024-01-01", tz="UTC"))
    assert since.cold.tolist() == [False, True, True] and since.unsold.tolist() == [False, False, True]
    with pytest.raises(ValueError, match="after the week's anchor"):
        make_evalset("w", rows, events, cat, t, cold_since=pd.Timestamp("2024-01-09", tz="UTC"))


def test_goals_compare_with_the_strongest_baseline_of_any_name() -> None:
    from training.pipeline import goals

    results = {
        "popularity": {"ndcg@10": 0.10, "ndcg@10_new": 0.010},
        "item_knn": {"ndcg@10": 0.09, "ndcg@10_new": 0.012},
        "personal_top_frequency": {"ndcg@10": 0.25, "ndcg@10_new": 0.010},
        "decayed_frequency": {"ndcg@10": 0.27, "ndcg@10_new": 0.010},  # not a table model: still a baseline
        "recflow_two_tower": {"ndcg@10": 0.30, "ndcg@10_new": 0.020},  # a recflow variant: not a baseline
        "recflow": {"ndcg@10": 0.28, "ndcg@10_new": 0.018},
    }
    g = goals(results)
    assert g["best_baseline"] == "decayed_frequency"
    assert g["ndcg@10_lift"] == pytest.approx(0.28 / 0.27 - 1)
    assert g["ndcg@10_goal_met"] is False
    assert g["new_reference"] == "item_knn" and g["ndcg@10_new_goal_met"] is True
