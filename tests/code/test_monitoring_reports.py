"""Evidently reports: drift verdicts, id exclusion, hand-checked ranking metrics, files written."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from monitoring import data as md
from monitoring.reports import coverage, drift_report, quality_report, topk_value
from monitoring.synthetic import synthetic_items, synthetic_log

T0 = pd.Timestamp("2017-10-01", tz="UTC")
N = 1500  # > 1000 rows: Evidently uses Wasserstein / Jensen-Shannon distances


@pytest.fixture(scope="module")
def items() -> pd.DataFrame:
    return synthetic_items(n_items=120)


def _features(items: pd.DataFrame, seed: int, shift: float) -> pd.DataFrame:
    return synthetic_log(N, 400, T0, 7, items=items, seed=seed, shift=shift)


def _feature_drift(tmp_path, items, shift: float):
    ref_log, cur_log = _features(items, 1, 0.0), _features(items, 2, shift)
    f_ref, f_cur, info = md.feature_frames(ref_log, cur_log)
    out = drift_report(f_ref, f_cur, numerical=info["numerical"], categorical=info["categorical"],
                       out_dir=tmp_path, name="feature_drift", title="feature drift", subtitle="test",
                       drift_share=0.3)
    return out, info


def test_same_distribution_is_not_drift_and_injected_shift_is(tmp_path, items) -> None:
    same, info = _feature_drift(tmp_path / "same", items, 0.0)
    shifted, _ = _feature_drift(tmp_path / "shifted", items, 1.0)
    tested = set(info["numerical"]) | set(info["categorical"])
    assert same.n_columns == shifted.n_columns == len(tested) == 6
    assert same.share is not None and same.share < 0.3 and same.drifted_columns == []
    assert shifted.share is not None and shifted.share > 0.3
    # the shift multiplies activity: those columns must be flagged, income is unchanged
    assert {"purchases_7d", "purchases_30d", "spend_30d", "days_since_last_purchase"} <= set(shifted.drifted_columns)
    assert "income" not in shifted.drifted_columns
    assert shifted.share == pytest.approx(len(shifted.drifted_columns) / shifted.n_columns)


def test_id_columns_are_excluded_from_drift(tmp_path, items) -> None:
    out, info = _feature_drift(tmp_path, items, 0.0)
    ids = {"user_id", "last_purchase_ts", "history_item_ids"}
    assert ids <= set(info["skipped"])
    assert not ids & set(out.columns)
    saved = json.loads(out.files.json.read_text())
    drift_columns = {m["config"]["column"] for m in saved["metrics"] if m["config"]["type"].endswith("ValueDrift")}
    assert drift_columns == set(out.columns) and not ids & drift_columns


def test_report_files_are_written_and_non_trivial(tmp_path, items) -> None:
    out, _ = _feature_drift(tmp_path, items, 1.0)
    page = out.files.html.read_text(encoding="utf-8")
    assert len(page) > 100_000  # Evidently embeds its JS bundle: the page works offline
    assert "<title>feature drift</title>" in page and "purchases_7d" in page
    assert "<script src=" not in page.replace(" ", "")  # nothing fetched from a CDN
    saved = json.loads(out.files.json.read_text())
    assert any(m["config"]["type"].endswith("DriftedColumnsCount") for m in saved["metrics"])


def test_empty_side_writes_a_placeholder_not_an_exception(tmp_path) -> None:
    out = drift_report(pd.DataFrame({"a": [1.0]}), pd.DataFrame({"a": []}), numerical=["a"], categorical=[],
                       out_dir=tmp_path, name="prediction_drift", title="t", subtitle="s", drift_share=0.3)
    assert out.share is None and out.files.html.is_file()
    assert "0 current rows" in out.files.html.read_text()
    assert json.loads(out.files.json.read_text())["skipped"]


# --- ranking metrics against a hand-computed case ----------------------------------------------

def _served(lists: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame({"request_id": [f"r{i}" for i in range(len(lists))], "ts": T0,
                         "user_id": list(lists), "item_ids": list(lists.values()),
                         "scores": [[1.0] * len(v) for v in lists.values()], "features": "{}"})


def _buys(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"event_id": [f"e{i}" for i in range(len(pairs))], "user_id": [p[0] for p in pairs],
                         "item_id": [p[1] for p in pairs], "event_type": "purchase",
                         "event_timestamp": T0 + pd.Timedelta(days=1)})


LISTS = {"u1": ["a", "b", "c"], "u2": ["a", "c", "e"], "u3": ["b", "c", "a"], "u4": ["c", "b", "a"]}


def test_quality_metrics_match_hand_computed_values(tmp_path) -> None:
    horizon = pd.Timedelta(days=7)
    # current: u1 buys b (rank 2) and d (not shown); u2 buys a (rank 1); u3 buys z (not shown);
    # u4 buys a (rank 3)
    cur = md.relevance_frame(_served(LISTS), _buys([("u1", "b"), ("u1", "d"), ("u2", "a"), ("u3", "z"),
                                                    ("u4", "a")]), horizon=horizon)
    # reference: u2 buys c (rank 2) instead
    ref = md.relevance_frame(_served(LISTS), _buys([("u1", "b"), ("u1", "d"), ("u2", "c"), ("u4", "e")]),
                             horizon=horizon)
    train = pd.DataFrame({"user_id": ["x", "y", "y"], "item_id": ["a", "a", "b"]})
    out = quality_report(ref, cur, train=train, k=3, out_dir=tmp_path, title="quality", subtitle="test")

    d = 1 / math.log2(3)  # discount of rank 2
    ndcg_u1 = d / (1 + d)  # b at rank 2; ideal: two relevant items at ranks 1, 2
    ndcg_u4 = 1 / math.log2(4)  # a at rank 3 (counts at k=3, not at k=2)
    assert out.current["ndcg_at_k"] == pytest.approx((ndcg_u1 + 1.0 + 0.0 + ndcg_u4) / 4)
    # reference: u3 has no purchase and is excluded from the ranking metrics; u4 scores 0
    assert out.reference["ndcg_at_k"] == pytest.approx((ndcg_u1 + d + 0.0) / 3)
    assert out.current["hit_rate_at_k"] == pytest.approx(3 / 4)
    assert out.reference["hit_rate_at_k"] == pytest.approx(2 / 3)
    assert out.current["recall_at_k"] == pytest.approx((0.5 + 1.0 + 0.0 + 1.0) / 4)
    assert out.current["mrr_at_k"] == pytest.approx((0.5 + 1.0 + 0.0 + 1 / 3) / 4)
    assert out.reference["mrr_at_k"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # novelty: -log2(share of the 2 training buyers): a -> 0 bits, b -> 1 bit, c/e unknown (ignored)
    assert out.current["novelty"] == pytest.approx((0.5 + 0.0 + 0.5 + 0.5) / 4)
    assert out.current["coverage"] == pytest.approx(1.0)  # a and b both shown
    assert out.users_with_feedback == (3, 4) and out.users == (4, 4)
    assert out.k == 3
    assert out.files.html.stat().st_size > 100_000


def test_quality_k_is_capped_at_the_longest_list(tmp_path) -> None:
    cur = md.relevance_frame(_served(LISTS), _buys([("u1", "b"), ("u2", "a")]), horizon=pd.Timedelta(days=7))
    out = quality_report(cur, cur, train=pd.DataFrame({"user_id": [], "item_id": []}), k=10, out_dir=tmp_path,
                         title="q", subtitle="s")
    assert out.k == 3 and "k capped at 3" in out.note
    assert "novelty" not in out.current and "novelty/popularity skipped" in out.note
    assert out.current["hit_rate_at_k"] == pytest.approx(1.0)


def test_topk_value_reads_the_kth_row_whatever_the_rank_labels() -> None:
    shifted = pd.DataFrame({"rank": [2, 3, 4], "value": [0.1, 0.2, 0.3]})  # Evidently's NDCG labels
    plain = pd.DataFrame({"rank": [1, 2, 3], "value": [0.1, 0.2, 0.3]})
    assert topk_value(shifted, 2) == topk_value(plain, 2) == pytest.approx(0.2)
    assert topk_value(plain, 10) == pytest.approx(0.3)
    assert topk_value(plain.iloc[0:0], 3) is None


def test_coverage_counts_only_top_k_training_items() -> None:
    long = pd.DataFrame({"item_id": ["a", "b", "z"], "rank": [1, 2, 4]})
    assert coverage(long, pd.Index(["a", "b", "z", "q"]), k=3) == pytest.approx(0.5)
    assert coverage(long, pd.Index([]), k=3) is None


def test_profiles_going_missing_is_drift(tmp_path) -> None:
    ref = pd.DataFrame({"age": ["25-34", "35-44"] * 800})
    cur = pd.DataFrame({"age": ["25-34", "35-44"] * 200 + [md.MISSING] * 1200})
    out = drift_report(ref, cur, numerical=[], categorical=["age"], out_dir=tmp_path, name="f", title="t",
                       subtitle="s", drift_share=0.3)
    assert out.drifted_columns == ["age"] and out.share == 1.0
