"""Dataset adapters: the tiny shop, every class of bad input, quarantine and the bad-share limit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recflow.datasets import IngestError, ingest
from recflow.schemas import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA
from recflow.settings import DataSettings


def test_generic_adapter_writes_canonical_tables(tiny_settings) -> None:
    report = ingest(tiny_settings)
    paths = tiny_settings.paths
    events = pq.read_table(paths.events)
    assert events.schema.equals(EVENTS_SCHEMA, check_metadata=False)
    assert pq.read_table(paths.items).schema.equals(ITEMS_SCHEMA, check_metadata=False)
    assert pq.read_table(paths.users).schema.equals(USERS_SCHEMA, check_metadata=False)
    ev = events.to_pandas()
    assert len(ev) == 10 and report.tables["events"].rejected_rows == 0
    assert ev["event_timestamp"].is_monotonic_increasing
    assert set(ev["event_type"]) == {"view", "cart", "purchase"}
    a = ev[ev.user_id == "a"].set_index("event_id")
    assert a.loc["e02", "quantity"] == 2.0 and a.loc["e02", "price"] == 1.0
    items = pd.read_parquet(paths.items).set_index("item_id")
    assert items.loc["x", "text"] == "oat milk 1l; dairy; oatly"  # built from title, category, brand
    assert pd.isna(items.loc["v", "first_seen"]), "an unsold item has no first_seen but stays in the catalogue"
    assert items.loc["x", "first_seen"] == pd.Timestamp("2024-01-01T10:00:00Z")
    users = pd.read_parquet(paths.users).set_index("user_id")
    assert users.loc["a", "age"] == "25-34" and pd.isna(users.loc["c", "age"])
    assert any("loyalty_tier" in n for n in report.tables["users"].notes), "unused columns are reported"


def test_interactions_alone_build_a_minimal_catalogue(make_settings, tiny_shop: dict[str, Path]) -> None:
    s = make_settings(data=DataSettings(source="generic", interactions_path=tiny_shop["interactions"]))
    report = ingest(s)
    items = pd.read_parquet(s.paths.items)
    assert sorted(items.item_id) == ["w", "x", "y", "z"]
    assert items.text.isna().all()
    assert report.tables["items"].notes


def test_column_map_and_parquet_input(make_settings, tiny_shop: dict[str, Path], tmp_path: Path) -> None:
    df = pd.read_csv(tiny_shop["interactions"], dtype="string").rename(columns={"user_id": "customer", "timestamp": "ts"})
    path = tmp_path / "events.parquet"
    df.to_parquet(path)
    s = make_settings(
        data=DataSettings(source="generic", interactions_path=path, columns={"user_id": "customer", "timestamp": "ts"})
    )
    ingest(s)
    assert set(pd.read_parquet(s.paths.events).user_id) == {"a", "b", "c"}


BAD_ROWS = [
    # (raw row, expected reason)
    ({"event_id": "g1", "user_id": "a", "item_id": "x", "timestamp": "2024-01-02T00:00:00Z"}, None),
    ({"event_id": "g2", "user_id": "b", "item_id": "y", "timestamp": "2024-01-02 13:00"}, None),
    ({"event_id": "b1", "user_id": "", "item_id": "x", "timestamp": "2024-01-02T00:00:00Z"}, "missing_user_id"),
    ({"event_id": "b2", "user_id": "a", "item_id": "", "timestamp": "2024-01-02T00:00:00Z"}, "missing_item_id"),
    ({"event_id": "b3", "user_id": "a", "item_id": "x", "timestamp": "yesterday-ish"}, "unparsable_timestamp"),
    ({"event_id": "b4", "user_id": "a", "item_id": "x", "timestamp": "2031-01-01T00:00:00Z"}, "future_timestamp"),
    ({"event_id": "b5", "user_id": "a", "item_id": "x", "timestamp": "2024-01-02", "quantity": "-1"}, "negative_quantity"),
    ({"event_id": "b6", "user_id": "a", "item_id": "x", "timestamp": "2024-01-02", "price": "-0.5"}, "negative_price"),
    ({"event_id": "b7", "user_id": "a", "item_id": "x", "timestamp": "2024-01-02", "quantity": "two"}, "unparsable_number"),
    ({"event_id": "b8", "user_id": "a", "item_id": "x", "timestamp": "2024-01-02", "event_type": "wishlist"}, "unknown_event_type"),
    ({"event_id": "g1", "user_id": "a", "item_id": "y", "timestamp": "2024-01-03"}, "duplicate_event_id"),
    ({"event_id": "b9", "user_id": "a", "item_id": "nope", "timestamp": "2024-01-02"}, "unknown_item_id"),
]


@pytest.fixture
def bad_shop(tmp_path: Path, tiny_shop: dict[str, Path]) -> Path:
    rows = pd.DataFrame([r for r, _ in BAD_ROWS]).reindex(
        columns=["event_id", "user_id", "item_id", "timestamp", "event_type", "quantity", "price"]
    )
    rows["event_type"] = rows["event_type"].fillna("purchase")
    path = tmp_path / "bad.csv"
    rows.to_csv(path, index=False)
    return path


def test_every_class_of_bad_input_is_quarantined_with_its_reason(make_settings, bad_shop, tiny_shop) -> None:
    s = make_settings(
        data=DataSettings(
            source="generic", interactions_path=bad_shop, items_path=tiny_shop["items"],
            now="2024-06-01T00:00:00Z", max_bad_share=1.0,
        )
    )
    report = ingest(s).tables["events"]
    expected = pd.Series([reason for _, reason in BAD_ROWS if reason]).value_counts().to_dict()
    assert report.rejected == expected
    assert report.accepted_rows == 2 and report.total_rows == len(BAD_ROWS)
    quarantine = pd.read_parquet(report.quarantine_path)
    assert len(quarantine) + report.accepted_rows == len(BAD_ROWS), "every row is either accepted or quarantined"
    by_id = quarantine.set_index("event_id")
    assert by_id.loc["b3", "timestamp"] == "yesterday-ish", "the raw value is kept as it was"
    assert by_id.loc["b7", "reason"] == "unparsable_number"
    assert quarantine.loc[quarantine.reason == "duplicate_event_id", "_row"].tolist() == [10]
    for reason in expected:
        assert report.examples[reason], f"no example shown for {reason}"


def test_too_many_bad_rows_fail_with_a_clear_message(make_settings, bad_shop, tiny_shop) -> None:
    s = make_settings(
        data=DataSettings(
            source="generic", interactions_path=bad_shop, items_path=tiny_shop["items"],
            now="2024-06-01T00:00:00Z", max_bad_share=0.5,
        )
    )
    with pytest.raises(IngestError) as err:
        ingest(s)
    message = str(err.value)
    assert "10 of 12 rows" in message and "max_bad_share" in message and "quarantine" in message
    assert not s.paths.events.exists(), "nothing is written to the canonical tables on failure"
    assert list(s.paths.quarantine.glob("events-*.parquet")), "the rejected rows are still kept"


def test_missing_required_column_is_named(make_settings, tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    pd.DataFrame({"user_id": ["a"], "item_id": ["x"]}).to_csv(path, index=False)
    s = make_settings(data=DataSettings(source="generic", interactions_path=path))
    with pytest.raises(IngestError, match="'timestamp' is missing"):
        ingest(s)


def test_unreadable_and_missing_files(make_settings, tmp_path: Path) -> None:
    s = make_settings(data=DataSettings(source="generic", interactions_path=tmp_path / "nope.csv"))
    with pytest.raises(IngestError, match="does not exist"):
        ingest(s)
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(IngestError, match="neither CSV/TSV nor parquet"):
        ingest(make_settings(data=DataSettings(source="generic", interactions_path=odd)))
    with pytest.raises(IngestError, match="no interactions file"):
        ingest(make_settings(data=DataSettings(source="generic")))


def test_bad_items_are_quarantined(make_settings, tiny_shop, tmp_path: Path) -> None:
    items = pd.read_csv(tiny_shop["items"], dtype="string")
    items = pd.concat([items, pd.DataFrame({"item_id": ["x", ""], "title": ["dup", "no id"], "price": ["1", "2"]})])
    path = tmp_path / "items.csv"
    items.to_csv(path, index=False)
    s = make_settings(
        data=DataSettings(source="generic", interactions_path=tiny_shop["interactions"], items_path=path,
                          now="2024-06-01T00:00:00Z", max_bad_share=0.5)
    )
    report = ingest(s).tables["items"]
    assert report.rejected == {"duplicate_item_id": 1, "missing_item_id": 1}
    assert pd.read_parquet(s.paths.items).set_index("item_id").loc["x", "title"] == "Oat milk 1l", "first wins"


def test_naive_and_numeric_timestamps(make_settings, tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pd.DataFrame(
        {"user_id": [1, 2], "item_id": [10.0, 11.0], "timestamp": [1704067200, 1704153600]}
    ).to_parquet(path)
    s = make_settings(data=DataSettings(source="generic", interactions_path=path))
    ingest(s)
    ev = pd.read_parquet(s.paths.events)
    assert ev.item_id.tolist() == ["10", "11"], "integral float ids keep a stable string form"
    assert ev.event_timestamp.iloc[0] == pd.Timestamp("2024-01-01T00:00:00Z")
    assert ev.event_id.str.startswith("ev-").all() and ev.event_id.is_unique


def test_until_keeps_later_events_as_holdout(make_settings, tiny_shop) -> None:
    s = make_settings(
        data=DataSettings(source="generic", interactions_path=tiny_shop["interactions"], items_path=tiny_shop["items"],
                          now="2024-06-01T00:00:00Z", until="2024-03-01T00:00:00Z")
    )
    report = ingest(s)
    canonical, holdout = pd.read_parquet(s.paths.events), pd.read_parquet(s.paths.holdout_events)
    assert len(canonical) + len(holdout) == 10
    assert canonical.event_timestamp.max() < pd.Timestamp("2024-03-01", tz="UTC") <= holdout.event_timestamp.min()
    assert sorted(holdout.event_id) == ["e08", "e10"]
    assert any("holdout" in n for n in report.tables["events"].notes)
    items = pd.read_parquet(s.paths.items).set_index("item_id")
    assert pd.isna(items.loc["w", "first_seen"]), "first sold after 'until': unseen as of the canonical data"


def test_a_home_keeps_its_source_when_none_is_given(make_settings, tiny_shop: dict[str, Path], monkeypatch) -> None:
    """A shop's home ingested from its files, then ingested with no source given (an hourly build_features
    run, `recflow features` without options): its own files again, never Complete Journey over them."""
    import json

    from recflow.datasets import completejourney as cj
    from recflow.datasets.ingest import SOURCE_MANIFEST

    shop = make_settings(data=DataSettings(source="generic", interactions_path=tiny_shop["interactions"],
                                           items_path=tiny_shop["items"]))
    ingest(shop)
    recorded = json.loads((shop.paths.canonical / SOURCE_MANIFEST).read_text())
    assert recorded["source"] == "generic" and recorded["interactions_path"] == str(tiny_shop["interactions"])
    before = pd.read_parquet(shop.paths.events)

    def no_cj() -> None:
        raise AssertionError("Complete Journey loaded over the shop's home")

    monkeypatch.setattr(cj, "load_raw", no_cj)
    again = ingest(make_settings())  # the defaults say completejourney; nothing was given
    assert again.source == "generic" and again.note and "own source" in again.note
    pd.testing.assert_frame_equal(pd.read_parquet(shop.paths.events), before)
    with pytest.raises(AssertionError, match="Complete Journey loaded"):  # a source given is obeyed
        ingest(make_settings(data=DataSettings(source="completejourney")))
    # a home ingested before the source was recorded: refused with what to do, not overwritten
    (shop.paths.canonical / SOURCE_MANIFEST).unlink()
    with pytest.raises(IngestError, match="--interactions PATH"):
        ingest(make_settings())
    pd.testing.assert_frame_equal(pd.read_parquet(shop.paths.events), before)
