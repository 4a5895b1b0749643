"""Expectations on the data monitoring reads and builds (request log contract, derived frames)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring import data as md
from monitoring.synthetic import synthetic_items, synthetic_log, synthetic_purchases
from recflow.schemas import REQUEST_LOG_SCHEMA, conform

T0 = pd.Timestamp("2017-10-01", tz="UTC")


@pytest.fixture(scope="module")
def items() -> pd.DataFrame:
    return synthetic_items(n_items=100)


@pytest.fixture(scope="module")
def log(items: pd.DataFrame) -> pd.DataFrame:
    return synthetic_log(800, 200, T0, 7, items=items, seed=5)


def test_synthetic_log_honours_the_request_log_contract(log: pd.DataFrame) -> None:
    table = conform(log, REQUEST_LOG_SCHEMA, name="request_log")  # raises on a contract violation
    assert table.num_rows == len(log)
    assert md.log_problems(log, name="log") == []


def test_log_expectations_catch_contract_violations(log: pd.DataFrame) -> None:
    bad = log.head(10).copy()
    bad.loc[bad.index[0], "request_id"] = bad.loc[bad.index[1], "request_id"]
    bad.at[bad.index[2], "scores"] = np.array([0.1, 0.9], dtype=np.float32)  # rising and too short
    bad.at[bad.index[3], "item_ids"] = np.array(["i1", "i1"], dtype=object)
    bad.at[bad.index[3], "scores"] = np.array([0.5, 0.4], dtype=np.float32)
    bad.at[bad.index[4], "item_ids"] = np.array([], dtype=object)
    bad.at[bad.index[4], "scores"] = np.array([], dtype=np.float32)
    problems = " | ".join(md.log_problems(bad, name="cur"))
    assert "1 duplicated request_id" in problems
    assert "len(scores) != len(item_ids)" in problems
    assert "not in descending order" in problems
    assert "same item twice" in problems
    assert "served an empty list" in problems


def test_descriptors_are_consistent(log: pd.DataFrame, items: pd.DataFrame) -> None:
    groups = md.mix_groups(md.explode_lists(log), items, "department", 3)
    d = md.prediction_descriptors(log, item_popularity=pd.Series(1.0, index=items["item_id"]), items=items,
                                  groups=groups)
    assert len(d) == len(log) and d.index.equals(log.index)
    assert (d["top1_score"] >= d["mean_score"] - 1e-9).all() and (d["mean_score"] >= d["min_score"] - 1e-9).all()
    shares = d[[c for c in d.columns if c.startswith("share_department__")]]
    assert shares.shape[1] == 4  # 3 groups + other
    assert np.allclose(shares.sum(axis=1), 1.0)
    assert d["mean_log_popularity"].between(0, np.log(2) + 1e-9).all()
    assert d["top1_department"].isin(items["department"]).all()


def test_relevance_frame_invariants(log: pd.DataFrame, items: pd.DataFrame) -> None:
    buys = synthetic_purchases(log, hit_rate=0.5, items=items, seed=5)
    rel = md.relevance_frame(log, buys, horizon=pd.Timedelta(days=7))
    assert not rel.duplicated(["user_id", "item_id"]).any()
    assert set(rel["target"].unique()) <= {0, 1}
    shown = rel[rel["recommended"]]
    assert set(shown["user_id"]) == set(log["user_id"])  # one list per served user
    assert (shown.groupby("user_id")["rank"].agg(lambda r: sorted(r) == list(range(1, len(r) + 1)))).all()
    assert (rel.loc[~rel["recommended"], "rank"] == shown["rank"].max() + 1).all()
    assert rel.loc[~rel["recommended"], "target"].eq(1).all()  # extra rows exist only for purchases
    # every purchase in the horizon after a user's first request is a relevant row
    first = md.first_request_per_user(log).set_index("user_id")["ts"]
    ts = pd.to_datetime(buys["event_timestamp"], utc=True)
    start = buys["user_id"].map(first)
    in_horizon = buys[(ts >= start) & (ts < start + pd.Timedelta(days=7))]
    expected = set(zip(in_horizon["user_id"], in_horizon["item_id"], strict=True))
    got = set(zip(rel.loc[rel["target"] == 1, "user_id"], rel.loc[rel["target"] == 1, "item_id"], strict=True))
    assert got == expected
