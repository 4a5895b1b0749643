"""Data preparation: temporal split, history features, point-in-time popularity, training rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from recflow.modeling.features import history_features
from training.examples import (
    Catalogue,
    default_cutoff,
    entity_frame,
    popularity_grid,
    split_anchors,
    user_rows,
    week_purchases,
)

DAY = 86400


def test_history_features_by_hand() -> None:
    # one user, most recent first: x@t=10d, y@10d, x@4d, z@0d (days); gap 2 days; item -1 unknown
    ts = np.array([10, 10, 4, 0, 0]) * DAY
    items = np.array([0, 1, 0, -1, 2])
    h = history_features(np.array([0, 5]), items, ts, np.array([2.0]), history_length=10, half_lives_days=(7.0,))
    assert h.items.tolist() == [0, 1, 2]
    assert h.n_lines.tolist() == [4] and h.n_unique.tolist() == [3] and h.n_baskets.tolist() == [3]
    f = {int(i): row for i, row in zip(h.items, h.feats, strict=True)}
    x = f[0]
    assert x[0] == pytest.approx(math.log1p(2))  # count
    assert x[1] == pytest.approx(math.log1p(1 + 2 ** (-6 / 7)))  # decayed count, ages 0 and 6 days
    assert x[2] == pytest.approx(0.0)  # days since last purchase of x (from t_ref)
    assert x[3] == pytest.approx(math.log1p(6))  # days since first purchase of x
    assert x[4] == pytest.approx(2 / 3)  # share of baskets
    assert x[5] == 1.0  # bought twice
    assert x[6] == pytest.approx(math.log1p(6))  # mean interval
    assert x[7] == pytest.approx(math.log1p((0 + 2) / 6))  # due ratio
    assert x[8] == pytest.approx(0.0)  # most recent (ties broken by item)
    assert f[2][8] == pytest.approx(2 / 3)  # z is the oldest
    assert x[9] == pytest.approx(math.log1p(3)) and x[10] == pytest.approx(math.log1p(10)) and x[11] == pytest.approx(math.log1p(2))
    # history_length counts lines (unknown items included): with 2 lines only x and y remain
    h2 = history_features(np.array([0, 5]), items, ts, np.array([2.0]), history_length=2, half_lives_days=(7.0,))
    assert h2.items.tolist() == [0, 1]
    # padding and the max-items cap keep the most recent items
    it, ft, mask = h.padded(max_items=2)
    assert sorted(it[0][mask[0]].tolist()) == [0, 1]


def test_history_features_empty_and_batched() -> None:
    h = history_features(np.array([0, 0, 2]), np.array([3, 3]), np.array([5, 1]) * DAY, np.array([np.nan, 1.0]),
                         history_length=50, half_lives_days=(7.0, 30.0))
    assert h.offsets.tolist() == [0, 0, 1] and h.items.tolist() == [3]
    sub = h.take(np.array([1]))
    assert sub.items.tolist() == [3] and sub.n_lines.tolist() == [2]
    items, feats, mask = h.padded()
    assert items.shape == (2, 1) and not mask[0].any() and mask[1, 0]


def _events() -> pd.DataFrame:
    rows = [
        ("a", "x", "2024-01-02 10:00"), ("a", "y", "2024-01-02 10:00"), ("a", "x", "2024-01-09 10:00"),
        ("b", "y", "2024-01-03 12:00"), ("a", "z", "2024-01-16 09:00"), ("b", "x", "2024-01-20 09:00"),
        ("b", "x", "2024-01-21 23:59"),
    ]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp"])
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    df["event_type"] = "purchase"
    return df


def test_split_and_weekly_targets() -> None:
    ev = _events()
    cut = default_cutoff(ev)
    assert cut == pd.Timestamp("2024-01-08", tz="UTC")  # last day 01-21 -> +1 - 14 days
    train, val, test = split_anchors(cut, 1)
    assert train == [pd.Timestamp("2024-01-01", tz="UTC")] and test == pd.Timestamp("2024-01-15", tz="UTC")
    wp = week_purchases(ev, [*train, val, test])
    got = {(int(r.anchor_idx), r.user_id, r.item_id) for r in wp.itertuples()}
    assert got == {(0, "a", "x"), (0, "a", "y"), (0, "b", "y"), (1, "a", "x"), (2, "a", "z"), (2, "b", "x")}
    ent = entity_frame(ev, [*train, val, test])
    assert len(ent) == 5 and set(ent.columns) == {"user_id", "item_id", "event_timestamp"}


def test_popularity_grid_is_point_in_time() -> None:
    cat = Catalogue.from_items(pd.DataFrame({"item_id": ["x", "y"], "text": ["a", "b"]}))
    table = pd.DataFrame({
        "item_id": ["x", "x", "y"],
        "event_timestamp": pd.to_datetime(["2024-01-02", "2024-01-09", "2024-01-10"], utc=True),
        "purchases_7d": [1, 5, 2], "purchases_30d": [1, 6, 2], "buyers_30d": [1, 2, 1],
        "interactions_30d": [1, 6, 2], "trend": [1.0, 2.0, 3.0],
    })
    anchors = [pd.Timestamp(t, tz="UTC") for t in ("2024-01-01", "2024-01-09", "2024-01-12")]
    g = popularity_grid(table, cat, anchors)
    assert np.isnan(g[0]).all()  # nothing known yet
    assert g[1, 0, 0] == 5 and np.isnan(g[1, 1, 0])  # a row stamped at the anchor is visible
    assert g[2, 0, 0] == 5 and g[2, 1, 0] == 2


def test_user_rows_from_a_training_set() -> None:
    cat = Catalogue.from_items(pd.DataFrame({"item_id": ["x", "y", "z"], "text": ["a", "b", "c"]}))
    anchors = [pd.Timestamp("2024-01-08", tz="UTC"), pd.Timestamp("2024-01-15", tz="UTC")]
    ts = pd.DataFrame({
        "user_id": ["a", "b", "a"], "item_id": ["x", "y", "z"],
        "event_timestamp": [anchors[0], anchors[0], anchors[1]],
        "user_history__history_item_ids": [["y", "x"], None, ["x", "q"]],
        "user_history__history_ts": [[20, 10], None, [30, 25]],
        "user_activity__purchases_7d": [2.0, None, 1.0],
        "user_profile__age": ["25-34", None, "25-34"],
    })
    targets = pd.DataFrame({"anchor_idx": [0, 0, 0, 1], "user_id": ["a", "a", "b", "a"], "item_id": ["x", "z", "y", "z"]})
    rows = user_rows(ts, cat, anchors, targets=targets)
    assert len(rows) == 3
    order = {(int(a), u): n for n, (a, u) in enumerate(zip(rows.anchor, rows.user_ids, strict=True))}
    r = order[(0, "a")]
    lo, hi = rows.hist_offsets[r], rows.hist_offsets[r + 1]
    assert rows.hist_items[lo:hi].tolist() == [1, 0] and rows.hist_ts[lo:hi].tolist() == [20, 10]
    assert sorted(rows.targets[rows.target_offsets[r]:rows.target_offsets[r + 1]].tolist()) == [0, 2]
    r1 = order[(1, "a")]
    assert rows.hist_items[rows.hist_offsets[r1]:rows.hist_offsets[r1 + 1]].tolist() == [0, -1]  # unknown item -> -1
    rb = order[(0, "b")]
    assert rows.hist_offsets[rb + 1] == rows.hist_offsets[rb]  # null history -> empty
    assert rows.activity[rb, 0] != rows.activity[rb, 0]  # NaN
    bad = ts.assign(event_timestamp=pd.Timestamp("2024-02-01", tz="UTC"))
    with pytest.raises(ValueError, match="not one of"):
        user_rows(bad, cat, anchors)
