"""Feature tables on the tiny shop, checked by hand (see the timeline in conftest.TINY_EVENTS)."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recflow.schemas import FEATURE_TABLES, feature_table_schema


def _table(settings, name: str) -> pd.DataFrame:
    return pd.read_parquet(settings.paths.feature_table(name))


def _row(df: pd.DataFrame, key: str, value: str, stamp: str) -> pd.Series:
    hit = df[(df[key] == value) & (df.event_timestamp == pd.Timestamp(stamp, tz="UTC"))]
    assert len(hit) == 1, f"no single row for {value} at {stamp}: {df[df[key] == value].event_timestamp.tolist()}"
    return hit.iloc[0]


def test_schemas_match_the_contract(tiny_features) -> None:
    for name in FEATURE_TABLES:
        schema = pq.read_schema(tiny_features.paths.feature_table(name))
        expected = feature_table_schema(name)
        assert schema.names == expected.names, name
        for field in expected:
            assert schema.field(field.name).type == field.type, f"{name}.{field.name}"


@pytest.mark.parametrize(
    ("stamp", "p7", "p30", "p90", "distinct90"),
    [
        ("2024-01-02", 2, 2, 2, 2),  # x, y bought on 01-01; valid from the end of that day
        ("2024-01-06", 3, 3, 3, 2),  # + x on 01-05
        ("2024-01-09", 1, 3, 3, 2),  # 01-01 left the 7-day window
        ("2024-01-13", 0, 3, 3, 2),  # 01-05 left it too
        ("2024-02-01", 0, 1, 3, 2),  # 01-01 left the 30-day window
        ("2024-02-05", 0, 0, 3, 2),
        ("2024-02-21", 1, 1, 4, 3),  # + z
        ("2024-04-01", 0, 0, 2, 2),  # 01-01 left the 90-day window: x (01-05) and z remain
        ("2024-04-05", 0, 0, 1, 1),  # 01-05 left it: only z
    ],
)
def test_user_activity_windows(tiny_features, stamp, p7, p30, p90, distinct90) -> None:
    row = _row(_table(tiny_features, "user_activity"), "user_id", "a", stamp)
    assert (row.purchases_7d, row.purchases_30d, row.purchases_90d) == (p7, p30, p90)
    assert row.distinct_items_90d == distinct90


def test_user_activity_spend_recency_and_baskets(tiny_features) -> None:
    ua = _table(tiny_features, "user_activity")
    row = _row(ua, "user_id", "a", "2024-01-06")
    assert row.spend_7d == pytest.approx(2.5 + 2 * 1.0 + 2.5)
    assert row.avg_basket_size_90d == pytest.approx(3 / 2)  # 3 lines in 2 baskets
    assert row.distinct_categories_90d == 2  # dairy, bakery
    assert row.last_purchase_ts == int(pd.Timestamp("2024-01-05T09:00:00Z").timestamp())
    assert row.days_since_last_purchase == pytest.approx(15 / 24, abs=1e-3)  # 01-05 09:00 -> 01-06 00:00
    b = _row(ua, "user_id", "b", "2024-01-04")
    assert (b.purchases_7d, b.interactions_30d) == (1, 3), "views and carts count as interactions, not purchases"
    assert ua.event_timestamp.max() <= pd.Timestamp("2024-05-01", tz="UTC"), "no rows past the data's horizon"


def test_rows_are_stamped_after_their_events(tiny_features) -> None:
    ev = pd.read_parquet(tiny_features.paths.events)
    hist = _table(tiny_features, "user_history")
    for _, row in hist.iterrows():
        included = ev[(ev.user_id == row.user_id) & ev.item_id.isin(row.history_item_ids)]
        latest = pd.to_datetime(max(row.history_ts), unit="s", utc=True)
        assert latest < row.event_timestamp
        assert (included.event_timestamp < row.event_timestamp).any()


def test_user_history_is_most_recent_first(tiny_features) -> None:
    hist = _table(tiny_features, "user_history")
    assert _row(hist, "user_id", "a", "2024-01-02").history_item_ids.tolist() == ["y", "x"]
    assert _row(hist, "user_id", "a", "2024-02-21").history_item_ids.tolist() == ["z", "x", "y", "x"]
    b = _row(hist, "user_id", "b", "2024-01-04")
    assert b.history_item_ids.tolist() == ["x", "x", "x"]
    assert b.history_types.tolist() == ["purchase", "cart", "view"], "each entry's event type, aligned"
    assert set(_row(hist, "user_id", "a", "2024-02-21").history_types) == {"purchase"}


def test_the_ranker_reads_the_purchases_of_the_history(tiny_features) -> None:
    """The two-stage ranker learns from the event log's purchase lines; online it reads the same lines
    from the history row, whose views and carts it leaves out (b viewed, carted, then bought x)."""
    from recflow.ranker.log import purchase_history

    hist = _table(tiny_features, "user_history")
    b = _row(hist, "user_id", "b", "2024-01-04")
    row = {f"user_history__{n}": list(b[n]) for n in ("history_item_ids", "history_ts", "history_types")}
    ids, stamps = purchase_history(row)
    ev = pd.read_parquet(tiny_features.paths.events)
    bought = ev[(ev.user_id == "b") & (ev.event_type == "purchase") & (ev.event_timestamp < b.event_timestamp)]
    assert ids == bought.item_id.tolist() and stamps == [int(t.timestamp()) for t in bought.event_timestamp]
    assert purchase_history({**row, "user_history__history_types": ["view"] * 3}) is None, "no purchase: no history"
    legacy = {k: v for k, v in row.items() if k != "user_history__history_types"}  # a row from before the types
    assert purchase_history(legacy) == (["x", "x", "x"], row["user_history__history_ts"])


def test_history_length_is_capped(make_settings, tiny_shop) -> None:
    from recflow.datasets import ingest
    from recflow.features.build import build_feature_tables
    from recflow.settings import DataSettings, FeatureSettings

    s = make_settings(
        data=DataSettings(source="generic", interactions_path=tiny_shop["interactions"], now="2024-06-01T00:00:00Z"),
        features=FeatureSettings(history_length=2),
    )
    ingest(s)
    report = build_feature_tables(s)
    hist = _table(s, "user_history")
    assert hist.history_item_ids.map(len).max() == 2
    assert _row(hist, "user_id", "a", "2024-02-21").history_item_ids.tolist() == ["z", "x"]
    # users with longer histories are named: they are served with features of their latest lines only
    lines = pd.read_parquet(s.paths.events).groupby("user_id").size()
    cut = int((lines > 2).sum())
    assert cut > 0 and len(report.warnings) == 1
    assert report.warnings[0].startswith(f"{cut:,} of {len(lines):,} users") and f"to {lines.max():,}" in report.warnings[0]
    s.features.history_length = int(lines.max())
    assert build_feature_tables(s).warnings == []


def test_item_popularity(tiny_features) -> None:
    pop = _table(tiny_features, "item_popularity")
    row = _row(pop, "item_id", "x", "2024-01-06")
    assert (row.purchases_7d, row.purchases_30d, row.buyers_30d, row.interactions_30d) == (3, 3, 2, 5)
    assert row.trend == pytest.approx((3 / 7) / (3 / 30), abs=1e-3)
    later = _row(pop, "item_id", "x", "2024-02-05")  # 30 days after the last purchase on 01-05
    assert (later.purchases_30d, later.buyers_30d, later.trend) == (0, 0, 0.0)


def test_catalog_and_profile(tiny_features) -> None:
    cat = _table(tiny_features, "item_catalog").set_index("item_id")
    assert cat.loc["v", "event_timestamp"] == pd.Timestamp("2024-01-01", tz="UTC"), "unsold items from the start"
    assert cat.loc["x", "title"] == "Oat milk 1l"
    prof = _table(tiny_features, "user_profile").set_index("user_id")
    assert prof.loc["a", "age"] == "25-34"
    assert prof.loc["a", "event_timestamp"] == pd.Timestamp("2024-01-02", tz="UTC")


def test_rebuild_is_byte_identical(tiny_features) -> None:
    from recflow.features.build import build_feature_tables

    before = {n: tiny_features.paths.feature_table(n).read_bytes() for n in FEATURE_TABLES}
    build_feature_tables(tiny_features)
    after = {n: tiny_features.paths.feature_table(n).read_bytes() for n in FEATURE_TABLES}
    assert before == after


def test_logged_feedback_is_part_of_the_next_build(tiny_features) -> None:
    from recflow.event_log import EventLog
    from recflow.features.build import build_feature_tables

    feedback = pd.DataFrame(
        {
            "event_id": ["fb1", "e04"],  # e04 is already canonical: it must not count twice
            "user_id": ["a", "a"],
            "item_id": ["y", "z"],
            "event_type": ["purchase", "purchase"],
            "event_timestamp": pd.to_datetime(["2024-04-29T10:00:00Z", "2024-02-20T08:00:00Z"]),
            "basket_id": [None, "b3"],
            "quantity": [1.0, 1.0],
            "price": [1.0, 4.0],
        }
    )
    EventLog(tiny_features.paths.event_log).append(feedback)
    build_feature_tables(tiny_features)
    row = _row(_table(tiny_features, "user_activity"), "user_id", "a", "2024-04-30")
    assert (row.purchases_7d, row.purchases_90d) == (1, 2)  # fb1, plus z on 02-20 (once)
    hist = _row(_table(tiny_features, "user_history"), "user_id", "a", "2024-04-30")
    assert hist.history_item_ids.tolist()[:2] == ["y", "z"]


def test_user_history_built_in_user_ranges_is_the_same_table(tiny_features, monkeypatch) -> None:  # noqa: ANN001
    from recflow.features import build

    whole = pq.read_table(tiny_features.paths.feature_table("user_history"))
    monkeypatch.setattr(build, "HISTORY_LINES_PER_PART", 3)  # a part per few lines: several user ranges
    con = build.connect()
    try:
        build._stage_events(con, tiny_features.paths.events, tiny_features.paths.items, [])
        ranges = build.user_ranges(con, 3)
    finally:
        con.close()
    assert len(ranges) > 1 and ranges[0] is not None and ranges[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), "contiguous, in user-id order"
    used: list[int] = []
    original = build.user_ranges
    monkeypatch.setattr(build, "user_ranges", lambda c: used.append(len(r := original(c))) or r)
    build.build_feature_tables(tiny_features)
    assert used and used[0] > 1, "the build ran user_history in several parts"
    assert pq.read_table(tiny_features.paths.feature_table("user_history")).equals(whole)
