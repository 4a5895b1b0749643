"""Monitoring frames: log loading, feature flattening, id exclusion, descriptors, relevance labels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from monitoring import data as md
from recflow.schemas import EVENTS_SCHEMA, REQUEST_LOG_SCHEMA, conform

T0 = pd.Timestamp("2017-10-01", tz="UTC")


def _log(rows: list[dict]) -> pd.DataFrame:
    base = {"request_id": None, "ts": T0, "endpoint": "recommend", "user_id": None, "item_id": None, "k": 3,
            "model_version": "v1", "fallback": False, "degraded": False, "feature_age_s": 1.0,
            "latency_ms": 5.0, "features": "{}", "item_ids": [], "scores": [], "arm": None}
    out = pd.DataFrame([{**base, "request_id": f"r{i}", **r} for i, r in enumerate(rows)])
    out["k"] = out["k"].astype("int32")
    return out


def _events(rows: list[tuple[str, str, pd.Timestamp]]) -> pd.DataFrame:
    return pd.DataFrame({
        "event_id": [f"e{i}" for i in range(len(rows))], "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows], "event_type": "purchase", "event_timestamp": [r[2] for r in rows],
        "basket_id": None, "quantity": 1.0, "price": 1.0,
    })


def test_flatten_features_parses_nested_and_null_rows() -> None:
    s = pd.Series(['{"a": 1, "b": "x", "n": {"c": 2.5}}', None, '{"a": 3}'], index=[10, 11, 12])
    flat = md.flatten_features(s)
    assert list(flat.index) == [10, 11, 12]
    assert flat.loc[10, "a"] == 1 and flat.loc[12, "a"] == 3
    assert flat.loc[10, "n.c"] == 2.5
    assert flat.loc[11].isna().all()


@pytest.mark.parametrize("bad", ['{"a": 1', "[1, 2]", '{"a": 1}, {"b": 2}'])
def test_flatten_features_rejects_non_objects_with_the_row(bad: str) -> None:
    s = pd.Series(['{"a": 1}', bad], index=["ok", "broken"])
    with pytest.raises(ValueError, match="features"):
        md.flatten_features(s)


def test_id_and_timestamp_columns_are_never_drift_tested() -> None:
    flat = pd.DataFrame({
        "user_id": ["u1", "u2", "u3"], "household_key": ["1", "2", "3"], "last_purchase_ts": [1, 2, 3],
        "history_item_ids": [["a"], ["b"], []], "spend_30d": [1.0, 2.0, 3.0], "age": ["25-34", "35-44", None],
        "always_null": [None, None, None], "is_new": [True, False, True],
    })
    numerical, categorical, skipped = md.split_feature_columns(flat)
    assert numerical == ["spend_30d"]
    assert sorted(categorical) == ["age", "is_new"]
    assert {"user_id", "household_key", "last_purchase_ts", "history_item_ids", "always_null"} <= set(skipped)


def test_high_cardinality_strings_are_treated_as_ids() -> None:
    flat = pd.DataFrame({"session": [f"s{i}" for i in range(300)], "band": ["a", "b", "c"] * 100})
    _, categorical, skipped = md.split_feature_columns(flat, max_categories=100)
    assert categorical == ["band"] and "session" in skipped


def test_feature_frames_keep_common_testable_columns_and_report_schema_changes() -> None:
    ref = _log([{"user_id": "u1", "features": '{"user_id": "u1", "a": 1, "old": 2, "age": "x"}'},
                {"user_id": "u2", "features": '{"user_id": "u2", "a": 2, "old": 3, "age": "y"}'}])
    cur = _log([{"user_id": "u3", "features": '{"user_id": "u3", "a": 5, "new": 1, "age": "x"}'}])
    f_ref, f_cur, info = md.feature_frames(ref, cur)
    assert list(f_ref.columns) == list(f_cur.columns) == ["a", "age"]
    assert info["only_reference"] == ["old"] and info["only_current"] == ["new"]
    assert "user_id" in info["skipped"]


def test_lifetime_accumulators_are_left_out_of_the_drift_test() -> None:
    from recflow.settings import MonitoringSettings

    rows = [{"user_id": f"u{i}", "features": f'{{"u_n_lines": {i * 10}, "u_span_d": {i}, "u_days_since_last": {i % 7}}}'}
            for i in range(20)]
    later = [{**r, "features": r["features"].replace('"u_n_lines": ', '"u_n_lines": 1000')} for r in rows]
    f_ref, f_cur, info = md.feature_frames(_log(rows), _log(later), lifetime=MonitoringSettings().lifetime_features)
    assert list(f_ref.columns) == list(f_cur.columns) == ["u_days_since_last"]
    assert "lifetime accumulator" in info["skipped"]["u_n_lines"] and "u_span_d" in info["skipped"]
    assert list(md.feature_frames(_log(rows), _log(later))[0].columns) == ["u_n_lines", "u_span_d", "u_days_since_last"]


def test_explode_lists_ranks_and_scores() -> None:
    log = _log([{"item_ids": ["a", "b", "c"], "scores": [0.9, 0.5, 0.1]}, {"item_ids": [], "scores": []},
                {"item_ids": ["d", "e"], "scores": None}])
    long = md.explode_lists(log)
    assert long["row"].tolist() == [0, 0, 0, 2, 2]
    assert long["rank"].tolist() == [1, 2, 3, 1, 2]
    assert long["score"].iloc[:3].tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert long["score"].iloc[3:].isna().all()


def test_prediction_descriptors_hand_computed() -> None:
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "department": ["MEAT", "MEAT", "DELI", "PRODUCE"]})
    log = _log([{"item_ids": ["a", "c", "d", "b"], "scores": [0.8, 0.6, 0.4, 0.2]},
                {"item_ids": ["c"], "scores": [0.5]}])
    pop = pd.Series({"a": 9.0, "b": 0.0, "c": 3.0})  # d unknown -> 0
    d = md.prediction_descriptors(log, item_popularity=pop, items=items, groups=["MEAT", "DELI"])
    assert d.loc[0, "top1_score"] == pytest.approx(0.8)
    assert d.loc[0, "mean_score"] == pytest.approx(0.5)
    assert d.loc[0, "min_score"] == pytest.approx(0.2)
    assert d.loc[0, "list_length"] == 4
    assert d.loc[0, "mean_log_popularity"] == pytest.approx((math.log(10) + math.log(4)) / 4)
    assert d.loc[0, "top1_department"] == "MEAT" and d.loc[1, "top1_department"] == "DELI"
    assert d.loc[0, "share_department__meat"] == pytest.approx(0.5)
    assert d.loc[0, "share_department__deli"] == pytest.approx(0.25)
    assert d.loc[0, "share_department__other"] == pytest.approx(0.25)
    assert d.loc[1, "share_department__deli"] == pytest.approx(1.0)


def test_relevance_frame_labels_purchases_within_horizon_only() -> None:
    log = _log([
        {"user_id": "u1", "ts": T0, "item_ids": ["a", "b", "c"]},
        {"user_id": "u1", "ts": T0 + pd.Timedelta(days=1), "item_ids": ["x", "y", "z"]},  # not the first list
        {"user_id": "u2", "ts": T0 + pd.Timedelta(hours=1), "item_ids": ["a", "c"]},
    ])
    buys = _events([
        ("u1", "b", T0 + pd.Timedelta(days=2)),  # recommended, in horizon
        ("u1", "d", T0 + pd.Timedelta(days=3)),  # not recommended, in horizon -> extra row
        ("u1", "c", T0 + pd.Timedelta(days=8)),  # after the 7-day horizon
        ("u1", "a", T0 - pd.Timedelta(days=1)),  # before the request
        ("u2", "c", T0 + pd.Timedelta(days=6)),  # in horizon, but after `until`
        ("u3", "a", T0),  # user never served
    ])
    out = md.relevance_frame(log, buys, horizon=pd.Timedelta(days=7), until=T0 + pd.Timedelta(days=5))
    got = {(r.user_id, r.item_id): (r.rank, r.target, r.recommended) for r in out.itertuples()}
    assert got == {
        ("u1", "a"): (1, 0, True), ("u1", "b"): (2, 1, True), ("u1", "c"): (3, 0, True),
        ("u1", "d"): (4, 1, False),  # rank = longest list + 1
        ("u2", "a"): (1, 0, True), ("u2", "c"): (2, 0, True),
    }


def test_load_request_log_reads_all_files_in_window(tmp_path) -> None:
    folder = tmp_path / "request_log"
    (folder / "day=1").mkdir(parents=True)
    day1 = _log([{"user_id": "u1", "ts": T0 - pd.Timedelta(hours=1)}, {"user_id": "u2", "ts": T0}])
    day2 = _log([{"user_id": "u3", "ts": T0 + pd.Timedelta(days=1)},
                 {"user_id": "u4", "ts": T0 + pd.Timedelta(days=7)},
                 {"user_id": "u5", "ts": T0 + pd.Timedelta(days=2), "endpoint": "similar"}])
    pq.write_table(conform(day1, REQUEST_LOG_SCHEMA, name="log"), folder / "day=1" / "a.parquet")
    pq.write_table(conform(day2, REQUEST_LOG_SCHEMA, name="log"), folder / "b.parquet")
    out = md.load_request_log(folder, T0, T0 + pd.Timedelta(days=7))
    assert sorted(out["user_id"]) == ["u2", "u3"]  # [start, end), recommend only
    assert list(out.loc[out["user_id"] == "u2", "item_ids"].iloc[0]) == []
    assert md.load_request_log(tmp_path / "missing", T0, T0 + pd.Timedelta(days=1)).empty


def test_request_logs_written_before_the_arm_column_still_read(tmp_path) -> None:
    """Files of an older service have no ``arm``: they read with it null, and a canary's rows only come from
    files that have it."""
    import pyarrow as pa

    folder = tmp_path / "request_log"
    folder.mkdir()
    old_schema = pa.schema([f for f in REQUEST_LOG_SCHEMA if f.name != "arm"])
    old = _log([{"user_id": "u1", "ts": T0}]).drop(columns="arm")
    pq.write_table(conform(old, old_schema, name="log"), folder / "old.parquet")
    new = _log([{"user_id": "u2", "ts": T0, "arm": "canary"}, {"user_id": "u3", "ts": T0, "arm": None}])
    pq.write_table(conform(new, REQUEST_LOG_SCHEMA, name="log"), folder / "new.parquet")
    every = md.load_request_log(folder, T0, T0 + pd.Timedelta(days=1))
    assert sorted(every["user_id"]) == ["u1", "u2", "u3"] and every.set_index("user_id")["arm"].isna().to_dict() == {
        "u1": True, "u2": False, "u3": True}
    armed = md.load_request_log(folder, T0, T0 + pd.Timedelta(days=1), arms_only=True)
    assert list(armed["user_id"]) == ["u2"]
    assert md.load_request_log(folder, T0, T0 + pd.Timedelta(days=1), arms_only=True).shape[0] == 1
    (folder / "new.parquet").unlink()
    assert md.load_request_log(folder, T0, T0 + pd.Timedelta(days=1), arms_only=True).empty


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_request_log_file_is_set_aside_and_the_rest_is_read(tmp_path, caplog, damage: str) -> None:  # noqa: ANN001
    folder = tmp_path / "request_log"
    folder.mkdir()
    good = _log([{"user_id": "u1", "ts": T0}])
    pq.write_table(conform(good, REQUEST_LOG_SCHEMA, name="log"), folder / "a.parquet")
    pq.write_table(conform(_log([{"user_id": "u2", "ts": T0}]), REQUEST_LOG_SCHEMA, name="log"), folder / "b.parquet")
    raw = (folder / "b.parquet").read_bytes()
    bad = {"truncated": raw[: len(raw) // 2], "garbage": b"PAR1" + b"\x00" * 64 + b"PAR1", "empty": b""}[damage]
    (folder / "b.parquet").write_bytes(bad)
    with caplog.at_level("ERROR", logger="recflow.monitoring"):
        out = md.load_request_log(folder, T0, T0 + pd.Timedelta(days=1))
    assert list(out["user_id"]) == ["u1"]
    assert not (folder / "b.parquet").exists() and (folder / "b.parquet.corrupt").read_bytes() == bad
    assert "b.parquet" in caplog.text and "set aside" in caplog.text
    again = md.load_request_log(folder, T0, T0 + pd.Timedelta(days=1))  # the next run does not trip on it
    assert list(again["user_id"]) == ["u1"]


def test_load_events_unions_sources_and_filters_type_and_window(tmp_path) -> None:
    ev = _events([("u1", "a", T0), ("u1", "b", T0 + pd.Timedelta(days=1)), ("u2", "c", T0 + pd.Timedelta(days=9))])
    ev.loc[1, "event_type"] = "view"
    log_dir = tmp_path / "event_log"
    log_dir.mkdir()
    pq.write_table(conform(ev, EVENTS_SCHEMA, name="ev"), log_dir / "x.parquet")
    pq.write_table(conform(ev, EVENTS_SCHEMA, name="ev"), tmp_path / "events.parquet")  # same ids: de-duplicated
    out = md.load_events([log_dir, tmp_path / "events.parquet", tmp_path / "nope"], T0, T0 + pd.Timedelta(days=7))
    assert out["event_id"].tolist() == ["e0"]


def test_sample_rows_caps_and_is_deterministic() -> None:
    df = pd.DataFrame({"x": np.arange(1000)})
    assert md.sample_rows(df, 2000, 0) is df
    a, b = md.sample_rows(df, 100, 7), md.sample_rows(df, 100, 7)
    assert len(a) == 100 and a.equals(b)


def test_missing_categorical_values_become_a_category_and_null_shares_are_reported() -> None:
    ref = _log([{"features": '{"age": "25-34", "spend": 1.0}'}, {"features": '{"age": "35-44", "spend": 2.0}'}])
    cur = _log([{"features": '{"age": null, "spend": null}'}, {"features": '{"age": "35-44", "spend": 3.0}'}])
    f_ref, f_cur, info = md.feature_frames(ref, cur)
    assert f_cur["age"].tolist() == [md.MISSING, "35-44"]
    assert f_cur["spend"].isna().tolist() == [True, False]
    assert info["null_share"]["spend"] == {"reference": 0.0, "current": 0.5}


def test_flatten_features_accepts_parsed_dicts() -> None:
    flat = md.flatten_features(pd.Series([{"a": 1}, None, {"b": "x"}]))
    assert flat.shape == (3, 2) and flat.loc[0, "a"] == 1 and flat.loc[2, "b"] == "x"
