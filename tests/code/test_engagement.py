"""Views and carts: a shop whose events hold them gets a ranker that reads them, computed the same
from the event log (training, evaluation) and from the online history with its event types (serving)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recflow.ranker.candidates import CandidateConfig, ItemSide, generate, item_similarity
from recflow.ranker.features import ENGAGEMENT_FEATURES, item_stats, pair_features, user_context
from recflow.ranker.log import DAY_S, PurchaseLog, history_lines
from training.synthetic import synthetic_shop, with_views

T0 = int(pd.Timestamp("2024-03-01", tz="UTC").value // 10**9)


def test_engagement_features_and_candidates_by_hand() -> None:
    """u viewed item c 2 days before as_of and carted d 20 days before; bought a 10 days before and
    viewed it again 1 day before."""
    ev = pd.DataFrame({
        "user_id": ["u"] * 5, "item_id": ["a", "a", "c", "c", "d"],
        "event_type": ["purchase", "view", "view", "view", "cart"],
        "event_timestamp": pd.to_datetime([T0 - 10 * DAY_S, T0 - DAY_S, T0 - 3 * DAY_S, T0 - 2 * DAY_S, T0 - 20 * DAY_S],
                                          unit="s", utc=True),
    })
    idx = pd.Index(["a", "b", "c", "d"])
    log = PurchaseLog.from_events(ev, idx)
    assert len(log) == 1 and log.has_engagement and len(log.engaged) == 4
    ctx = user_context(log, item_stats(log, T0), T0)
    f = pair_features(ctx, np.zeros(4, np.int64), np.arange(4))
    assert f["ue_views"].tolist() == [1, 0, 2, 0] and f["ue_carts"].tolist() == [0, 0, 0, 1]
    assert f["ue_days_since_view"][[0, 2]].tolist() == [1.0, 2.0] and np.isnan(f["ue_days_since_view"][1])
    assert f["ue_days_since_cart"][3] == 20.0
    assert f["ue_after_buy"][0] == 1.0 and np.isnan(f["ue_after_buy"][2]), "viewed again after buying it"
    assert f["ue_view_dec_7d"][2] == pytest.approx(2 ** (-3 / 7) + 2 ** (-2 / 7), rel=1e-6)
    side = ItemSide(item_stats(log, T0))
    cands = generate(ctx, side, np.array([0]), CandidateConfig(n_popular=0, n_trending=0, n_new=0, n_engaged=5))
    engaged = cands.item[cands.features["src_engaged"] > 0].tolist()
    assert engaged == [0, 2], "a and c were viewed within 14 days; d was carted 20 days ago"
    off = generate(ctx, side, np.array([0]), CandidateConfig(n_popular=0, n_trending=0, n_new=0))
    assert not off.features["src_engaged"].any(), "off unless configured"


def test_online_history_with_types_gives_the_offline_features_and_candidates() -> None:
    events, items = synthetic_shop(n_users=30, n_items=60, days=60, seed=3)
    events = with_views(events)
    idx = pd.Index(items["item_id"].astype(str))
    offline = PurchaseLog.from_events(events, idx)
    as_of = int(pd.Timestamp("2024-02-20", tz="UTC").value // 10**9)
    stats = item_stats(offline, as_of)
    users = offline.user_ids[:12]
    rows = []  # what the online store holds after the pushes: every interaction, most recent first, typed
    for u in users:
        mine = events[(events.user_id == u) & (events.event_timestamp < pd.Timestamp(as_of, unit="s", tz="UTC"))]
        mine = mine.sort_values("event_timestamp", ascending=False, kind="stable")
        rows.append({"user_history__history_item_ids": mine.item_id.tolist(),
                     "user_history__history_ts": [int(t.timestamp()) for t in mine.event_timestamp],
                     "user_history__history_types": mine.event_type.tolist()})
    lines = [history_lines(r, engagement=True) for r in rows]
    online = PurchaseLog.from_histories([(ids, ts) for ids, ts, _ in lines], idx, users, [t for _, _, t in lines])
    c_off = user_context(offline.for_users(users), stats, as_of)
    c_on = user_context(online, stats, as_of)
    assert c_on.eng is not None and len(c_on.eng.key) > 0
    u = np.repeat(np.arange(len(users)), len(idx))
    i = np.tile(np.arange(len(idx)), len(users))
    a, b = pair_features(c_off, u, i), pair_features(c_on, u, i)
    for name in (*ENGAGEMENT_FEATURES, "ui_cnt", "ui_dec_30d"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert (a["ue_views"] > 0).any() and (a["ue_carts"] > 0).any()
    side = ItemSide(stats, item_similarity(offline.before(as_of), 20))
    cfg = CandidateConfig(n_engaged=10)
    x, y = generate(c_off, side, np.arange(len(users)), cfg), generate(c_on, side, np.arange(len(users)), cfg)
    np.testing.assert_array_equal(x.item, y.item)
    np.testing.assert_array_equal(x.features["src_engaged"], y.features["src_engaged"])
    assert x.features["src_engaged"].any()
    # without engagement the reader hands over the purchases only, as before
    ids, _, kinds = history_lines(rows[0])
    assert set(kinds) == {"purchase"} and len(ids) == int((offline.before(as_of).user == 0).sum())


def test_the_config_adapts_to_a_shop_with_views() -> None:
    from recflow.ranker.model import ENGAGED_FEATURES, FEATURES
    from training.two_stage import ENGAGED_CANDIDATES, Inputs, config_for

    events, items = synthetic_shop(n_users=20, n_items=40, days=30, seed=1)
    plain = config_for(Inputs.build(events, items, None))
    assert not set(ENGAGED_FEATURES) & set(plain.features) and plain.candidates.n_engaged == 0
    assert set(plain.features) <= set(FEATURES)
    viewed = config_for(Inputs.build(with_views(events), items, None))
    assert set(ENGAGED_FEATURES) <= set(viewed.features) and viewed.candidates.n_engaged == ENGAGED_CANDIDATES
    assert viewed.features[: len(plain.features)] == plain.features


def test_the_reason_of_an_engaged_pick() -> None:
    from recflow.ranker.recommend import Pick, reason_text

    def title(_p: int) -> str:
        return "x"

    assert reason_text(Pick(1, 1.0, "viewed", 1, {"carted": 1.0, "days_since": 0.2}), title) == "in your cart today"
    assert reason_text(Pick(1, 1.0, "viewed", 1, {"carted": 0.0, "days_since": 3.4}), title) == "you looked at this 3 days ago"
    assert reason_text(Pick(1, 1.0, "viewed", 1, {"carted": 1.0, "days_since": 1.0}), title) == "in your cart 1 day ago"
