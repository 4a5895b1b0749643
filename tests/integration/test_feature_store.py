"""Feast on the tiny shop: apply, point-in-time joins, materialisation, push, and the flow."""

from __future__ import annotations

import pandas as pd
import pytest

from recflow import feature_store as fs
from recflow.features.training_set import build_training_set, get_training_features


@pytest.fixture(params=["sqlite", "redis"])
def applied(request, tiny_features):  # noqa: ANN001, ANN201
    """The tiny shop applied to Feast, once per online store (Redis: a real server, flushed per test)."""
    settings = tiny_features
    if request.param == "redis":
        import redis

        address = request.getfixturevalue("redis_server")
        host, port = address.split(":")
        redis.Redis(host=host, port=int(port)).flushall()
        settings = settings.model_copy(
            update={"feast": settings.feast.model_copy(update={"online_store": "redis", "redis_connection_string": address})}
        )
    store = fs.get_store(settings)
    result = fs.apply(settings, store)
    return settings, store, result


def _online_users(settings, store, users=("a", "b", "c")) -> pd.DataFrame:
    return fs.online_features(settings, [{"user_id": u} for u in users], store=store).set_index("user_id")


def test_apply_registers_everything(applied) -> None:
    _, store, result = applied
    assert result.entities == ["item", "user"]
    assert result.feature_views == ["item_catalog", "item_popularity", "user_activity", "user_history", "user_profile"]
    assert {"training_v1", "serving_v1"} <= set(result.feature_services)
    assert {"user_activity_push", "user_history_push"} <= set(result.data_sources)
    serving = store.get_feature_service("serving_v1")
    assert {p.name for p in serving.feature_view_projections} == {"user_activity", "user_history", "user_profile"}


def test_point_in_time_never_joins_a_later_row(applied) -> None:
    settings, store, _ = applied
    entity = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "a"],
            "item_id": ["x", "x", "z", "x"],
            "event_timestamp": pd.to_datetime(
                ["2024-01-01T23:59:59Z", "2024-01-05T12:00:00Z", "2024-02-20T08:00:00Z", "2024-01-06T00:00:00Z"]
            ),
        }
    )
    out, lookups = get_training_features(settings, entity, store=store)
    assert lookups == {"user_id": 4, "item_id": 4}
    assert out[["user_id", "item_id"]].equals(entity[["user_id", "item_id"]].astype("string")), "row order kept"
    # Before the first row (valid from 01-02) there is nothing to join.
    assert pd.isna(out.loc[0, "user_activity__purchases_7d"])
    # On 01-05 at noon the 01-05 09:00 purchase is not visible yet (its row is valid from 01-06).
    assert out.loc[1, "user_activity__purchases_7d"] == 2
    assert list(out.loc[1, "user_history__history_item_ids"]) == ["y", "x"]
    # The target basket of 02-20 is not in its own history.
    assert "z" not in list(out.loc[2, "user_history__history_item_ids"])
    # Exactly at the row's timestamp the row is joined (valid from).
    assert out.loc[3, "user_activity__purchases_7d"] == 3
    assert out.loc[1, "item_popularity__purchases_7d"] == 2  # x: a on 01-01, b on 01-03


def test_training_set_parquet(applied, tmp_path) -> None:
    settings, store, _ = applied
    entity = pd.DataFrame({"user_id": ["b"], "item_id": ["w"], "event_timestamp": ["2024-03-15T18:00:00Z"]})
    result = build_training_set(settings, entity, out_path=tmp_path / "ts.parquet", store=store)
    frame = pd.read_parquet(result.path)
    assert result.rows == 1 and "user_profile__age" in frame.columns
    assert frame.loc[0, "user_profile__age"] == "45-54"
    with pytest.raises(ValueError, match="missing column"):
        build_training_set(settings, entity.drop(columns="item_id"), store=store)
    with pytest.raises(ValueError, match="unparsable event_timestamp"):
        build_training_set(settings, entity.assign(event_timestamp="soon"), store=store)


def test_materialized_online_values_equal_latest_offline(applied) -> None:
    settings, store, _ = applied
    start, end = fs.default_window(settings)
    result = fs.materialize(settings, start, end, store=store)
    assert result.rows_in_window > 0
    online = _online_users(settings, store)
    offline = pd.read_parquet(settings.paths.feature_table("user_activity"))
    latest = offline.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    for user in ("a", "b", "c"):
        for col in ("purchases_7d", "purchases_90d", "spend_90d", "distinct_items_90d", "last_purchase_ts"):
            assert online.loc[user, f"user_activity__{col}"] == latest.loc[user, col], (user, col)
    hist = pd.read_parquet(settings.paths.feature_table("user_history"))
    last_hist = hist.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    assert list(online.loc["a", "user_history__history_item_ids"]) == list(last_hist.loc["a", "history_item_ids"])
    items = fs.online_features(settings, [{"item_id": "v"}], service="item_index_v1", store=store)
    assert items.loc[0, "item_catalog__title"] == "Sparkling water", "unsold items are online for cold start"


def test_materialize_respects_the_window(applied) -> None:
    settings, store, _ = applied
    fs.materialize(settings, "2024-01-01", "2024-01-10", store=store, feature_views=["user_activity"])
    online = _online_users(settings, store)
    # Latest row of user a stamped before 01-10 is 01-09 (purchases_7d = 1); 01-13 is outside.
    assert online.loc["a", "user_activity__purchases_7d"] == 1
    with pytest.raises(ValueError, match="empty"):
        fs.materialize(settings, "2024-01-10", "2024-01-01", store=store)


def test_push_is_visible_online_at_once(applied) -> None:
    settings, store, _ = applied
    fs.materialize(settings, *fs.default_window(settings), store=store)
    row = pd.read_parquet(settings.paths.feature_table("user_history")).query("user_id == 'a'").tail(1).copy()
    now = pd.Timestamp("2024-05-01T12:00:00Z")
    row["event_timestamp"] = now
    row["created_timestamp"] = now
    row["history_item_ids"] = [["v", "z", "x", "y", "x"]]
    row["history_ts"] = [[int(now.timestamp())] + list(row["history_ts"].iloc[0])]
    fs.push(settings, "user_history_push", row, store=store)
    online = _online_users(settings, store, users=("a",))
    assert list(online.loc["a", "user_history__history_item_ids"]) == ["v", "z", "x", "y", "x"]


def test_serving_reader_equals_feast_get_online_features(applied) -> None:
    """The service's lean reader (OnlineStore.online_read per view) answers exactly what Feast's
    get_online_features does: values, types, timestamps, unknown and repeated users, after a push."""
    from serving.online_reader import OnlineUserReader, fetch_user_features

    settings, store, _ = applied
    fs.materialize(settings, *fs.default_window(settings), store=store)
    service = store.get_feature_service(settings.feast.serving_service)
    reader = OnlineUserReader(store, service)
    users = ["a", "b", "nobody", "c", "a"]
    expected = fetch_user_features(store, service, users)
    assert reader(users) == expected
    assert expected[0]["user_history__history_item_ids"] and expected[2]["user_activity__purchases_7d"] is None
    row = pd.read_parquet(settings.paths.feature_table("user_activity")).query("user_id == 'b'").tail(1).copy()
    row["event_timestamp"] = row["created_timestamp"] = pd.Timestamp("2024-05-01T12:00:00Z")
    row["purchases_7d"] = 99
    fs.push(settings, "user_activity_push", row, store=store)
    got = reader(["b"])
    assert got == fetch_user_features(store, service, ["b"]) and got[0]["user_activity__purchases_7d"] == 99
    assert got[0]["user_activity__purchases_7d__ts"] == int(pd.Timestamp("2024-05-01T12:00:00Z").timestamp())


def test_build_features_flow_twice_gives_identical_online_values(prefect_harness, tiny_settings) -> None:
    from flows.features import build_features

    args = {"home": str(tiny_settings.home), "overrides": {"data": tiny_settings.data.model_dump(mode="json")}}
    first = build_features(**args)
    assert first["ingest"]["tables"]["events"]["accepted_rows"] == 10
    assert first["features"]["rows"]["user_profile"] == 3
    store = fs.get_store(tiny_settings)
    before = _online_users(tiny_settings, store)
    second = build_features(**args)
    after = _online_users(tiny_settings, store)
    assert first["materialize"] == {**second["materialize"], "seconds": first["materialize"]["seconds"]}
    pd.testing.assert_frame_equal(before, after)
    assert after.loc["c", "user_activity__purchases_90d"] == 2


def test_serving_service_point_in_time_needs_only_user_keys(applied) -> None:
    from recflow.features.training_set import get_historical

    settings, store, _ = applied
    entity = pd.DataFrame({"user_id": ["a"], "event_timestamp": ["2024-01-05T12:00:00Z"]})
    out, lookups = get_historical(settings, entity, service="serving_v1", store=store)
    assert lookups == {"user_id": 1}
    assert out.loc[0, "user_activity__purchases_7d"] == 2
    assert "item_popularity__trend" not in out.columns


def test_push_rows_write_what_the_data_frame_path_writes(applied) -> None:
    """serving.online_push.OnlineRows.write_rows (the push's path: values straight to protos) stores,
    byte for byte, what Feast's data-frame ingestion (OnlineRows.write) stores for the same rows:
    list, int, float and null values, and both timestamps."""
    import numpy as np
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from recflow.schemas import USER_ACTIVITY_FEATURES
    from serving.online_push import ACTIVITY_PUSH, HISTORY_PUSH, OnlineRows

    settings, store, _ = applied
    rows = OnlineRows(store)
    now, ts = pd.Timestamp("2024-05-01T12:00:00Z"), pd.Timestamp("2024-05-01T11:59:58.123456Z")
    history = {"event_timestamp": ts, "created_timestamp": now, "history_item_ids": ["v", "z", "x"],
               "history_ts": [1714564798, 1714478398, 1714391998], "history_types": ["view", "purchase", "cart"]}
    activity = {"event_timestamp": ts, "created_timestamp": now, **{n: 3 for n in USER_ACTIVITY_FEATURES}}
    activity.update(spend_7d=12.5, days_since_last_purchase=np.nan, last_purchase_ts=None)
    old = pd.DataFrame([{"user_id": "frame", **activity}])
    for n in USER_ACTIVITY_FEATURES:  # the types the push gave the frame before write_rows
        old[n] = old[n].astype("Int64" if n == "last_purchase_ts" else "int64" if str(USER_ACTIVITY_FEATURES[n]) == "int64"
                              else "float64")
    rows.write(HISTORY_PUSH, pd.DataFrame([{"user_id": "frame", **history}]))
    rows.write(ACTIVITY_PUSH, old)
    rows.write_rows(HISTORY_PUSH, [{"user_id": "direct", **history}])
    rows.write_rows(ACTIVITY_PUSH, [{"user_id": "direct", **activity}])

    online = fs.online_store(store)
    for name in ("user_history", "user_activity"):
        view = store.get_feature_view(name)
        keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]) for u in ("frame", "direct")]
        (t_frame, v_frame), (t_direct, v_direct) = online.online_read(config=store.config, table=view, entity_keys=keys)
        assert v_direct is not None and {k: v.SerializeToString() for k, v in v_direct.items()} == \
            {k: v.SerializeToString() for k, v in v_frame.items()}, name
        assert t_direct == t_frame
    assert v_direct["last_purchase_ts"].WhichOneof("val") is None  # null stays null
    assert v_direct["days_since_last_purchase"].WhichOneof("val") is None  # NaN is null, as in a frame


def test_point_in_time_features_in_batches_equal_one_query(applied) -> None:
    """feast.historical_batch_rows bounds the offline store's memory; the rows it returns do not depend on it."""
    from recflow.features.training_set import get_historical

    settings, store, _ = applied
    entity = pd.DataFrame({"user_id": ["a", "b", "c", "a", "b", "c", "a"],
                           "item_id": ["x", "y", "z", "w", "x", "y", "z"],
                           "event_timestamp": ["2024-01-05T12:00:00Z", "2024-01-05T12:00:00Z", "2024-01-06T00:00:00Z",
                                               "2024-01-20T00:00:00Z", "2024-02-01T00:00:00Z", "2024-01-02T00:00:00Z",
                                               "2024-05-01T00:00:00Z"]})
    whole, lookups = get_historical(settings, entity, store=store)
    small = settings.model_copy(update={"feast": settings.feast.model_copy(update={"historical_batch_rows": 2})})
    batched, same = get_historical(small, entity, store=store)
    assert lookups == same == {"user_id": 7, "item_id": 7}
    assert whole["user_history__history_item_ids"].map(lambda v: v is not None and len(v) > 0).sum() >= 3
    pd.testing.assert_frame_equal(whole, batched)
