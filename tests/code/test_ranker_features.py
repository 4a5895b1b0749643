"""The two-stage model's feature function and candidates: hand-computed values, online = offline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recflow.ranker.candidates import CandidateConfig, ItemSide, generate, item_similarity
from recflow.ranker.features import item_stats, pair_features, user_context
from recflow.ranker.log import DAY_S, PurchaseLog

T0 = int(pd.Timestamp("2024-01-01", tz="UTC").value // 10**9)
ITEMS = pd.Index(["x", "y", "z", "w"])


def tiny_log() -> PurchaseLog:
    # user a: x on days 0, 4, 10 (twice on day 10), y on day 4; user b: x on day 2, z on day 3
    rows = [("a", "x", 0), ("a", "y", 4), ("a", "x", 4), ("a", "x", 10), ("a", "x", 10.01), ("b", "x", 2), ("b", "z", 3),
            ("b", "w", 30)]
    ev = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                       "event_timestamp": pd.to_datetime([T0 + r[2] * DAY_S for r in rows], unit="s", utc=True)})
    return PurchaseLog.from_events(ev, ITEMS)


def test_pair_features_by_hand() -> None:
    log = tiny_log()
    as_of = T0 + 14 * DAY_S
    stats = item_stats(log, as_of)
    ctx = user_context(log, stats, as_of)
    a = int(np.flatnonzero(log.user_ids == "a")[0])
    f = pair_features(ctx, np.array([a, a]), np.array([0, 2]))  # (a, x), (a, z)
    assert f["ui_cnt"][0] == 4 and f["ui_occasions"][0] == 3  # two lines on day 10 are one trip
    assert f["ui_gap_mean_d"][0] == pytest.approx(5.0)  # gaps 4 and 6
    assert f["ui_gap_std_d"][0] == pytest.approx(1.0)
    assert f["ui_days_since_last"][0] == pytest.approx(4.0 - 0.01, abs=1e-4)
    assert f["ui_overdue"][0] == pytest.approx((4.0 - 0.01) / 5.0, rel=1e-4)
    want = 2 ** (-14 / 7) + 2 ** (-10 / 7) + 2 ** (-4 / 7) + 2 ** (-3.99 / 7)
    assert f["ui_dec_7d"][0] == pytest.approx(want, rel=1e-5)
    assert f["ui_basket_share"][0] == pytest.approx(1.0)  # x in all 3 of a's trips
    assert f["ui_bought"].tolist() == [1.0, 0.0]
    assert f["ui_cnt"][1] == 0 and np.isnan(f["ui_gap_mean_d"][1])
    # item side: x has 5 lines, 2 buyers, one of whom re-bought; w (day 30) is after as_of: cold
    assert stats["item_pop_all"].tolist() == [5.0, 1.0, 1.0, 0.0]
    assert stats["item_rebuy_rate"][0] == pytest.approx(0.5)
    assert not stats.sold[3]
    assert f["u_n_baskets"][0] == 3 and f["u_n_lines"][0] == 5


def test_trip_recency_by_hand() -> None:
    """Trips are user-days: a's trips are days 0, 4 and 10; x is in all three, y only in the middle one."""
    log = tiny_log()
    as_of = T0 + 14 * DAY_S
    ctx = user_context(log, item_stats(log, as_of), as_of)
    a = int(np.flatnonzero(log.user_ids == "a")[0])
    f = pair_features(ctx, np.array([a, a, a]), np.array([0, 1, 2]))  # x, y, z
    assert f["ui_trip_dec_90"][0] == pytest.approx(1 + 0.9 + 0.81)
    assert f["ui_trip_dec_70"][1] == pytest.approx(0.7)  # y: one trip before the last
    assert f["ui_trips_since_last"].tolist()[:2] == [0.0, 1.0] and np.isnan(f["ui_trips_since_last"][2])
    assert f["ui_last3_share"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert f["ui_last10_share"][0] == pytest.approx(1.0)  # 3 trips in all: the share is of those
    assert f["ui_trip_overdue"][1] == pytest.approx(1 * 1 / 3)  # one trip since, one purchase in three trips
    # a bought x on 3 trips (2 re-buys) and y on 1: 2 of 4 (item, trip) purchases were re-buys; all 14 days
    # are within 28, and x and y were both first bought then
    assert f["u_repeat_share"][0] == pytest.approx(0.5) and f["u_new_share_28d"][0] == pytest.approx(1.0)


def test_features_ignore_lines_at_or_after_as_of() -> None:
    log = tiny_log()
    as_of = T0 + 4 * DAY_S  # day-4 lines are not yet known
    ctx = user_context(log, item_stats(log, as_of), as_of)
    a = int(np.flatnonzero(log.user_ids == "a")[0])
    f = pair_features(ctx, np.array([a]), np.array([0]))
    assert f["ui_cnt"][0] == 1 and f["ui_days_since_last"][0] == pytest.approx(4.0)


def test_online_history_gives_the_offline_features() -> None:
    """The service builds the log from each user's pushed history (ids + epoch seconds): same numbers."""
    from training.synthetic import synthetic_shop

    events, items = synthetic_shop(n_users=30, n_items=60, days=60, seed=3)
    idx = pd.Index(items["item_id"].astype(str))
    offline = PurchaseLog.from_events(events, idx)
    as_of = int(pd.Timestamp("2024-02-20", tz="UTC").value // 10**9)
    stats = item_stats(offline, as_of)
    users = offline.user_ids[:12]
    # what the online store holds after the pushes: each user's lines, most recent first
    before = offline.before(as_of).for_users(users)
    off = before.offsets()
    hist = [(idx[before.item[off[u]:off[u + 1]][::-1]].tolist(), before.ts[off[u]:off[u + 1]][::-1].tolist())
            for u in range(len(users))]
    online = PurchaseLog.from_histories(hist, idx, users)
    c_off = user_context(offline.for_users(users), stats, as_of)
    c_on = user_context(online, stats, as_of)
    u = np.repeat(np.arange(len(users)), len(idx))
    i = np.tile(np.arange(len(idx)), len(users))
    a, b = pair_features(c_off, u, i), pair_features(c_on, u, i)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_candidates_cover_the_whole_history() -> None:
    from training.synthetic import synthetic_shop

    events, items = synthetic_shop(n_users=40, n_items=80, days=70, seed=1)
    idx = pd.Index(items["item_id"].astype(str))
    log = PurchaseLog.from_events(events, idx)
    as_of = int(pd.Timestamp("2024-03-01", tz="UTC").value // 10**9)
    before = log.before(as_of)
    side = ItemSide(item_stats(before, as_of), item_similarity(before, 20))
    ctx = user_context(log, side.stats, as_of)
    users = np.arange(log.n_users)
    cands = generate(ctx, side, users, CandidateConfig(n_popular=5, n_cooccur=5, n_trending=0), batch_size=7)
    bought = np.unique(before.user * log.n_items + before.item)
    got = cands.user * log.n_items + cands.item
    assert np.isin(bought, got).all()
    hist = cands.features["src_history"] > 0
    assert np.array_equal(np.sort(got[hist]), bought)
    # popular unseen items are proposed to everyone
    top = side.popular[0]
    assert (cands.item == top).sum() == len(np.unique(cands.user))


def test_history_order_does_not_matter_and_unknown_items_are_dropped() -> None:
    a = PurchaseLog.from_histories([(["x", "y", "nope"], [30, 10, 20])], ITEMS, ["u"])
    b = PurchaseLog.from_histories([(["y", "x"], [10, 30])], ITEMS, ["u"])
    assert a.item.tolist() == b.item.tolist() == [1, 0]
    assert a.ts.tolist() == [10, 30]
    with pytest.raises(ValueError, match="different lengths"):
        PurchaseLog.from_histories([(["x"], [1, 2])], ITEMS)


def test_launch_slot_keys_on_a_hand_computed_case() -> None:
    """Two users; launches are the rows with age < 14. User 0's two best launches go to positions 0
    and 2; user 1 has one launch, which takes position 0 while their other rows close up behind it."""
    from recflow.ranker.model import _with_launches

    users = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    order = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0])  # ascending = better first
    age = np.array([50.0, 3.0, np.nan, 5.0, 1.0, 30.0, 40.0, 2.0])  # NaN: never sold, not a launch
    key = _with_launches(order, users, age, (0, 2), 14.0)
    ranked = [list(np.flatnonzero(users == u)[np.argsort(key[users == u], kind="stable")]) for u in (0, 1)]
    assert ranked[0] == [1, 0, 3, 2, 4]
    assert ranked[1] == [7, 5, 6]


def test_rebuy_hazards_by_hand() -> None:
    # user a buys x on days 0, 7, 14, 28 (gaps 7, 7, 14), user b on days 0 and 20 (gap 20); as of day 35
    # a's x was last bought 7 days ago: gaps >= 7 are 7, 7, 14, of which 7 and 7 end within 7 days
    rows = [("a", "x", d) for d in (0, 7, 14, 28)] + [("b", "x", 0), ("b", "x", 20), ("a", "y", 30)]
    ev = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                       "event_timestamp": pd.to_datetime([T0 + r[2] * DAY_S for r in rows], unit="s", utc=True)})
    log = PurchaseLog.from_events(ev, ITEMS)
    as_of = T0 + 35 * DAY_S
    ctx = user_context(log, item_stats(log, as_of), as_of)
    a = int(np.flatnonzero(log.user_ids == "a")[0])
    f = pair_features(ctx, np.array([a, a]), np.array([0, 1]))
    assert f["ui_gaps_open"][0] == 3 and f["ui_hazard_7d"][0] == pytest.approx(2 / 3)
    # pooled over users: gaps 7, 7, 14, 20 are >= 7; two end within 7 days
    item_h = (2 + 0.1) / (4 + 1)
    assert f["item_gaps_open"][0] == 4 and f["item_hazard_7d"][0] == pytest.approx(item_h, rel=1e-6)
    assert f["ui_hazard_7d_shrunk"][0] == pytest.approx((2 + 2 * item_h) / (3 + 2), rel=1e-6)
    # y bought once: no gap of its own, NaN own hazard; a never-bought pair has no hazard at all
    assert np.isnan(f["ui_hazard_7d"][1]) and f["ui_gaps_open"][1] == 0
    g = pair_features(ctx, np.array([a]), np.array([2]))
    assert all(np.isnan(g[k][0]) for k in ("ui_hazard_7d", "ui_gaps_open", "item_hazard_7d"))
