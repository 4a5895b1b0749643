"""Next-basket baselines (TIFU-KNN, decayed frequency, new-item popularity), per-user metrics and the
paired bootstrap, against hand-computed cases on a tiny shop."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from training.baselines import (
    HALF_LIVES,
    baseline_scorers,
    history_before,
    new_item_popularity_scorer,
    tifu_knn_scorer,
    tifu_neighbours,
    tifu_user_vectors,
    tune_decayed_frequency,
    tune_tifu_knn,
)
from training.evaluate import EvalSet, evaluate, paired_bootstrap
from training.examples import Catalogue, UserRows

ANCHOR = pd.Timestamp("2024-03-01", tz="UTC")
N = 24  # items i0..i23; only i0..i6 are ever bought (evaluate ranks a top 20)
TIFU = {"group_size": 2, "within_decay": 0.5, "between_decay": 0.25}


def _catalogue(first_seen: dict[int, int] | None = None) -> Catalogue:
    fs = pd.Series(pd.NaT, index=range(N), dtype="datetime64[ns, UTC]")
    for i, days in (first_seen or {}).items():
        fs[i] = ANCHOR + pd.Timedelta(days=days)
    return Catalogue.from_items(pd.DataFrame({"item_id": [f"i{i}" for i in range(N)], "title": "t", "first_seen": fs}))


def _events(lines: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    """``(user, basket, item, day relative to the anchor)`` per purchase line."""
    return pd.DataFrame(
        {
            "user_id": [u for u, _, _, _ in lines],
            "basket_id": [b for _, b, _, _ in lines],
            "item_id": [f"i{i}" if i >= 0 else "unknown" for _, _, i, _ in lines],
            "event_timestamp": [ANCHOR + pd.Timedelta(days=d) for _, _, _, d in lines],
            "event_type": "purchase",
        }
    )


def _evalset(users: list[str], targets: list[list[int]], seen: list[list[int]], cold: np.ndarray | None = None) -> EvalSet:
    r = len(users)
    rows = UserRows(
        user_ids=np.array(users), anchor=np.zeros(r, np.int64), hist_offsets=np.zeros(r + 1, np.int64),
        hist_items=np.zeros(0, np.int64), hist_ts=np.zeros(0, np.int64), activity=np.zeros((r, 11)),
        profile=[[None] * 7] * r, target_offsets=np.cumsum([0] + [len(t) for t in targets]),
        targets=np.array(sum(targets, []), dtype=np.int64),
    )
    s_off = np.cumsum([0] + [len(s) for s in seen])
    cold = np.zeros(N, bool) if cold is None else cold
    return EvalSet("t", ANCHOR, rows, s_off, np.array(sum(seen, []), dtype=np.int64), cold, N)


# Shop: eval users a, b; c and d only buy before the anchor (neighbour candidates, not evaluated).
#   a: B1 {0, 1} day -50, B2 {1, 2} day -40 (item 1 twice), B3 {0} -30, B4 {2, 3} -20, B5 {3} -10
#   b: C1 {4} -45, C2 {4, 5} -35        c: D1 {0, 3} -48, D2 {3} -5 (+ an unknown item)
#   d: E1 {1} -60                       after the anchor: a buys 5 (ignored by every baseline)
SHOP = [
    ("a", "B1", 0, -50), ("a", "B1", 1, -50), ("a", "B2", 1, -40), ("a", "B2", 1, -40), ("a", "B2", 2, -39.9),
    ("a", "B3", 0, -30), ("a", "B4", 2, -20), ("a", "B4", 3, -20), ("a", "B5", 3, -10),
    ("b", "C1", 4, -45), ("b", "C2", 4, -35), ("b", "C2", 5, -35),
    ("c", "D1", 0, -48), ("c", "D1", 3, -48), ("c", "D2", 3, -5), ("c", "D2", -1, -5),
    ("d", "E1", 1, -60),
    ("a", "F1", 5, 1),
]


def _shop() -> tuple[pd.DataFrame, Catalogue, EvalSet]:
    ev = _evalset(["a", "b"], [[3, 5], [4, 6]], [[0, 1, 2, 3], [4, 5]])
    return _events(SHOP), _catalogue(), ev


def _expected_vectors() -> np.ndarray:
    """By hand, group size 2, within 0.5, between 0.25 (groups from the latest basket backwards)."""
    rb, rg = 0.5, 0.25
    u = np.zeros((4, 6))
    # a: groups (latest first) {B4, B5}, {B2, B3}, {B1}: k = 3
    b1, b2, b3, b4, b5 = (np.isin(np.arange(6), items).astype(float) for items in ([0, 1], [1, 2], [0], [2, 3], [3]))
    g0 = (rb * b4 + b5) / 2
    g1 = (rb * b2 + b3) / 2
    g2 = b1 / 1  # the short oldest group
    assert g0.tolist() == [0, 0, 0.25, 0.75, 0, 0] and g1.tolist() == [0.5, 0.25, 0.25, 0, 0, 0]
    u[0] = (g0 + rg * g1 + rg**2 * g2) / 3
    # b: one group {C1, C2}: (rb * C1 + C2) / 2
    u[1, 4], u[1, 5] = (rb + 1) / 2, 1 / 2
    # c: one group {D1, D2}: (rb * D1 + D2) / 2
    u[2, 0], u[2, 3] = rb / 2, (rb + 1) / 2
    # d: one basket
    u[3, 1] = 1.0
    return u


def test_history_codes_every_purchaser() -> None:
    events, cat, ev = _shop()
    h = history_before(events, cat, ev)
    assert h.n_users == 4 and len(h.item) == 16  # unknown item and the post-anchor line dropped
    assert sorted(set(h.user[h.user_row >= 0].tolist())) == [0, 1]
    assert np.array_equal(h.user[h.user_row >= 0], h.user_row[h.user_row >= 0])
    assert sorted(set(h.user[h.user_row < 0].tolist())) == [2, 3]


def test_tifu_user_vectors_by_hand() -> None:
    events, cat, ev = _shop()
    h = history_before(events, cat, ev)
    x = tifu_user_vectors(h, N, **TIFU)
    dense = x.dense(np.arange(4)).numpy()
    assert dense[:, :6] == pytest.approx(_expected_vectors(), abs=1e-7)
    assert not dense[:, 6:].any()
    assert x.vals[x.indptr[0] : x.indptr[1]].tolist() == pytest.approx([0.0625, 0.125 / 3, 0.3125 / 3, 0.25])
    # group size 1, no decay: plain basket counts averaged over the k = 5 baskets of a
    flat = tifu_user_vectors(h, N, group_size=1, within_decay=1.0, between_decay=1.0).dense(np.array([0])).numpy()
    assert flat[0, :6] == pytest.approx(np.array([2, 2, 2, 2, 0, 0]) / 5)


def test_tifu_neighbours_and_scores_by_hand() -> None:
    events, cat, ev = _shop()
    h = history_before(events, cat, ev)
    x = tifu_user_vectors(h, N, **TIFU)
    u = _expected_vectors()
    cos = lambda p, q: p @ q / np.linalg.norm(p) / np.linalg.norm(q)  # noqa: E731
    assert cos(u[0], u[2]) > cos(u[0], u[3]) > 0 == cos(u[0], u[1])
    # a: c then d (b shares no item); b: nobody shares an item with it
    assert tifu_neighbours(x, np.array([0, 1]), 3).tolist() == [[2, 3, -1], [-1, -1, -1]]

    s = tifu_knn_scorer(h, N, **TIFU, neighbors=2, alpha=0.5)(np.array([0, 1])).numpy()
    want_a = 0.5 * u[0] + 0.5 * (u[2] + u[3]) / 2
    want_b = 0.5 * u[1]  # no neighbour with a positive similarity: the neighbour part is 0
    assert s[0, :4] == pytest.approx(want_a[:4], abs=1e-7)
    assert s[1, 4:6] == pytest.approx(want_b[4:6], abs=1e-7)
    # every item scoring 0 falls below every positive score, in popularity order
    assert (s[0, 4:] < 0).all() and (s[1, :4] < 0).all() and (s[:, 6:] < 0).all()
    pop = np.bincount(h.item, minlength=N)
    assert s[1, 0] > s[1, 2] > s[1, 6] and pop[0] > pop[2] > pop[6]

    one = tifu_knn_scorer(h, N, **TIFU, neighbors=1, alpha=0.7)(np.array([0])).numpy()[0]
    assert one[:4] == pytest.approx((0.7 * u[0] + 0.3 * u[2])[:4], abs=1e-7)
    own = tifu_knn_scorer(h, N, **TIFU, neighbors=2, alpha=1.0)(np.array([0])).numpy()[0]
    assert own[:4] == pytest.approx(u[0, :4], abs=1e-7) and (own[4:] < 0).all()


def test_tune_tifu_knn_matches_the_scorer() -> None:
    events, cat, ev = _shop()
    grid = {"group_size": (1, 2), "within_decay": (0.5,), "between_decay": (0.25,), "neighbors": (1, 2), "alpha": (0.5, 1.0)}
    for cache_bytes in (1 << 30, 0):  # neighbour means kept / recomputed per batch
        params, score = tune_tifu_knn(events, cat, ev, grid, cache_bytes=cache_bytes)
        assert set(params) == set(grid) and all(params[key] in grid[key] for key in grid)
        h = history_before(events, cat, ev)
        assert evaluate(tifu_knn_scorer(h, N, **params), ev)["ndcg@10"] == pytest.approx(score)


def test_tuning_scores_rank_as_the_scorer() -> None:
    from training.baselines import _popularity_fill, _tifu_neighbour_mean, _tuning_scorer

    events, cat, ev = _shop()
    h = history_before(events, cat, ev)
    x = tifu_user_vectors(h, N, **TIFU)
    xt, below, rows = x.torch_t(), _popularity_fill(h, N) - 1.0, np.arange(2)
    nb = tifu_neighbours(x, rows, 2)
    m = _tifu_neighbour_mean(x, xt, nb)
    cached = torch.where(m > 0, m, below)
    for alpha in (0.5, 0.9, 1.0):
        want = tifu_knn_scorer(h, N, **TIFU, neighbors=2, alpha=alpha)(rows)
        for c in (cached, None):
            for r in (rows, rows[::-1].copy()):  # a row range (one-pass path) and not
                got = _tuning_scorer(x, xt, None if alpha == 1.0 else nb, c, torch.empty(2, N), alpha, below)(r)
                assert torch.equal(torch.argsort(got, dim=1, descending=True, stable=True), torch.argsort(want[r], dim=1, descending=True, stable=True))
                pos = want[r] > 0
                assert torch.equal(got[pos], want[r][pos])


def test_decayed_frequency_order_and_tuning() -> None:
    # a: item 0 three times ~300 days ago, item 1 once yesterday; b: item 2 once
    lines = [("a", "B1", 0, -300), ("a", "B2", 0, -299), ("a", "B3", 0, -298), ("a", "B4", 1, -1), ("b", "C1", 2, -3)]
    ev = _evalset(["a", "b"], [[0], [2]], [[0, 1], [2]])
    events, cat = _events(lines), _catalogue()
    rows = np.array([0])
    short = baseline_scorers(events, cat, ev, half_life_days=7)["decayed_frequency"](rows)[0]
    long = baseline_scorers(events, cat, ev, half_life_days=365)["decayed_frequency"](rows)[0]
    assert short[1] > short[0] > short[2]  # 2^(-1/7) > 3 * 2^(-300/7); unseen item 2 below both
    assert long[0] > long[1] > long[2]  # 3 * 2^(-300/365) ~ 1.70 > 2^(-1/365)
    half_life, score = tune_decayed_frequency(events, cat, ev)
    assert half_life in HALF_LIVES and half_life >= 180  # a's target is item 0: long memories win
    assert score == pytest.approx(1.0)


def test_new_item_popularity_picks_recent_first_sales() -> None:
    lines = [
        *[("u", f"O{d}", 0, -60 + d) for d in range(5)],  # item 0: old and the most bought
        ("u", "P1", 1, -30), ("v", "P2", 1, -29),  # item 1: old
        ("u", "Q1", 2, -10), ("v", "Q2", 2, -9),  # item 2: first sold 10 days ago, 2 lines
        *[("v", f"R{d}", 3, -5) for d in range(4)],  # item 3: first bought 5 days ago, but listed 100 days ago
        ("u", "S1", 4, -13),  # item 4: first sold 13 days ago, 1 line
        ("v", "T1", 5, 1),  # item 5: listed 2 days ago, sold only after the anchor
        *[("w", f"U{d}", 6, -15) for d in range(3)],  # item 6: first sold 15 days ago (too old)
    ]
    events, cat = _events(lines), _catalogue({3: -100, 5: -2})
    ev = _evalset(["u"], [[2]], [[0, 1, 2, 4]])
    h = history_before(events, cat, ev)
    anchor_s = int(ANCHOR.value // 10**9)
    s = new_item_popularity_scorer(h, N, cat.first_seen, anchor_s, days=14)(np.array([0]))[0]
    order = torch.argsort(s, descending=True, stable=True)[:6].tolist()
    assert order == [2, 4, 0, 3, 6, 1]  # new items by count, then global popularity
    assert s[4] > 0.5 >= s[0] and s[5] == 0
    assert baseline_scorers(events, cat, ev)["new_item_popularity"](np.array([0]))[0].tolist() == s.tolist()


def test_recently_viewed_lists_the_latest_views_and_carts_then_popularity() -> None:
    """u viewed item 2 three days before the anchor, carted item 4 one day before, viewed item 6 twenty
    days before (outside the 14 days) and item 3 after the anchor; v's views are not u's."""
    events = _events(SHOP)
    browse = pd.DataFrame({
        "user_id": ["a", "a", "a", "a", "b"], "basket_id": None, "item_id": ["i2", "i4", "i6", "i3", "i7"],
        "event_timestamp": [ANCHOR + pd.Timedelta(days=d) for d in (-3, -1, -20, 1, -2)],
        "event_type": ["view", "cart", "view", "view", "view"],
    })
    cat = _catalogue()
    ev = _evalset(["a", "b"], [[3, 5], [4, 6]], [[0, 1, 2, 3], [4, 5]])
    scorers = baseline_scorers(pd.concat([events, browse], ignore_index=True), cat, ev)
    s = scorers["recently_viewed"](np.array([0, 1]))
    assert torch.argsort(s[0], descending=True, stable=True)[:3].tolist() == [4, 2, 1], "latest first, then popularity"
    assert s[0, 4] > s[0, 2] >= 1.0 > 0.5 >= s[0, 6], "the 20-day-old view is only popularity"
    assert int(torch.argmax(s[1])) == 7 and s[1, 2] < 1.0
    assert "recently_viewed" not in baseline_scorers(events, cat, ev), "purchases only: no such baseline"


def test_baseline_scorers_names() -> None:
    events, cat, ev = _shop()
    names = set(baseline_scorers(events, cat, ev))
    assert {"popularity", "recent_popularity", "personal_top_frequency", "item_knn", "decayed_frequency", "new_item_popularity"} <= names
    assert "tifu_knn" not in names
    with_tifu = baseline_scorers(events, cat, ev, tifu_params={**TIFU, "neighbors": 2, "alpha": 0.5})
    assert with_tifu["tifu_knn"](np.array([0, 1])).shape == (2, N)


def test_evaluate_per_user_by_hand() -> None:
    # the case of test_training_metrics: a: seen {0, 1}, targets {0, 3}; b: seen {2}, targets {4, 5}, 5 cold
    cold = np.zeros(N, bool)
    cold[5] = True
    ev = _evalset(["a", "b"], [[0, 3], [4, 5]], [[0, 1], [2]], cold)
    base = torch.arange(N, 0, -1, dtype=torch.float32)
    scores = torch.stack([base, base.clone()])
    scores[1, :6] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) + 100
    m = evaluate(lambda rows: scores[rows], ev, k=2, k_recall=2, per_user=True)
    pu = m.pop("per_user")
    d = 1 / math.log2(3)
    assert pu["user_ids"].tolist() == ["a", "b"]
    assert pu["ndcg@2"].tolist() == pytest.approx([1 / (1 + d), 1.0])
    assert pu["ndcg@2_new"].tolist() == pytest.approx([d, 1.0])
    assert pu["ndcg@2_repeat"][0] == pytest.approx(1.0) and math.isnan(pu["ndcg@2_repeat"][1])
    assert math.isnan(pu["ndcg@2_cold"][0]) and pu["ndcg@2_cold"][1] == pytest.approx(1.0)
    for key in ("ndcg@2", "ndcg@2_new", "ndcg@2_repeat", "ndcg@2_cold", "recall@2", "hitrate@2_new"):
        assert m[key] == pytest.approx(np.nanmean(pu[key]), abs=1e-15)
    plain = evaluate(lambda rows: scores[rows], ev, k=2, k_recall=2)
    assert plain == m  # the means do not depend on per_user


def test_paired_bootstrap_known_cases() -> None:
    rng = np.random.default_rng(1)
    b = rng.random(200)
    const = paired_bootstrap(b + 0.1, b, n_resamples=200)
    assert const["mean_diff"] == pytest.approx(0.1, abs=1e-12)
    assert const["ci95_lo"] == pytest.approx(0.1, abs=1e-12) and const["ci95_hi"] == pytest.approx(0.1, abs=1e-12)
    same = paired_bootstrap(b, b)
    assert (same["mean_diff"], same["ci95_lo"], same["ci95_hi"], same["n_users"]) == (0.0, 0.0, 0.0, 200)

    a = b + rng.normal(0.05, 0.05, 200)
    up = paired_bootstrap(a, b, seed=3)
    assert 0 < up["ci95_lo"] <= up["mean_diff"] <= up["ci95_hi"]
    assert up["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert up == paired_bootstrap(a, b, seed=3)  # seeded
    noisy = paired_bootstrap(b, rng.permutation(b), seed=4)
    assert noisy["ci95_lo"] < 0 < noisy["ci95_hi"] and noisy["ci95_lo"] <= noisy["mean_diff"] <= noisy["ci95_hi"]
    narrow = paired_bootstrap(a, b, seed=3, ci=0.5)
    assert up["ci95_lo"] < narrow["ci95_lo"] <= narrow["ci95_hi"] < up["ci95_hi"]

    # NaNs dropped pairwise
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[:10], b_nan[10:15] = np.nan, np.nan
    assert paired_bootstrap(a_nan, b_nan)["n_users"] == 185


def test_paired_bootstrap_stratified_weeks() -> None:
    # week 1: 10 users, +0.1 each; week 2: 1000 users, +0.3 each -> mean of the weekly means = 0.2
    w1 = (np.full(10, 0.6), np.full(10, 0.5))
    w2 = (np.full(1000, 0.8), np.full(1000, 0.5))
    r = paired_bootstrap([w1, w2], n_resamples=100)
    assert r["n_users"] == 1010
    assert r["mean_diff"] == pytest.approx(0.2) and r["ci95_lo"] == pytest.approx(0.2) and r["ci95_hi"] == pytest.approx(0.2)
    # with noise, each week is resampled on its own: the interval holds the weekly-mean average
    rng = np.random.default_rng(0)
    weeks = [(rng.normal(m, 0.1, n), np.zeros(n)) for m, n in ((0.1, 50), (0.3, 400))]
    s = paired_bootstrap(weeks, seed=2)
    assert s["mean_diff"] == pytest.approx(np.mean([w[0].mean() for w in weeks]))
    assert s["ci95_lo"] < s["mean_diff"] < s["ci95_hi"]
    assert paired_bootstrap([(np.array([np.nan]), np.array([1.0]))])["n_users"] == 0
