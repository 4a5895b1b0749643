"""Serving pieces without a server: batching, request log, online feedback update, errors, ANN, model resolution."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recflow.schemas import REQUEST_LOG_SCHEMA


def test_micro_batcher_batches_concurrent_requests_and_isolates_errors() -> None:
    from serving.batching import MicroBatcher

    sizes: list[int] = []
    gate = threading.Event()

    def work(items: list[int]) -> list[object]:
        gate.wait(5)  # the first batch blocks until everything is queued
        sizes.append(len(items))
        return [ValueError(f"bad {i}") if i == 3 else i * 10 for i in items]

    async def main() -> list[object]:
        batcher = MicroBatcher(work, ThreadPoolExecutor(1), max_batch=4)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(9)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return out

    out = asyncio.run(main())
    assert [o for o in out if not isinstance(o, Exception)] == [0, 10, 20, 40, 50, 60, 70, 80]
    assert isinstance(out[3], ValueError) and str(out[3]) == "bad 3"
    assert sizes == [4, 4, 1], sizes  # queued requests were batched, at most max_batch at a time


def _row(i: int) -> dict[str, object]:
    return {"request_id": f"r{i}", "ts": pd.Timestamp("2024-05-01", tz="UTC"), "endpoint": "recommend",
            "user_id": "u", "k": 2, "model_version": "m", "fallback": False, "degraded": False,
            "feature_age_s": 1.0, "latency_ms": 3.0, "features": "{}", "item_ids": ["a", "b"], "scores": [2.0, 1.0]}


def test_request_log_rotates_by_rows_and_only_shows_complete_files(tmp_path: Path) -> None:
    from serving.request_log import RequestLogWriter

    writer = RequestLogWriter(tmp_path, flush_s=60, rotate_s=3600, max_rows=5)
    for i in range(7):
        writer.log(_row(i))
    writer.flush()  # 7 rows >= 5: this file is complete
    for i in range(7, 9):
        writer.log(_row(i))
    writer.flush()  # 2 rows in a new file, still in progress
    done = sorted(tmp_path.rglob("*.parquet"))
    assert len(done) == 1 and len(list(tmp_path.rglob("*.inprogress"))) == 1
    assert pq.read_table(done[0]).num_rows == 7
    writer.close()
    files = sorted(tmp_path.rglob("*.parquet"))
    table = pq.read_table(files)
    assert len(files) == 2 and table.num_rows == 9 and not list(tmp_path.rglob("*.inprogress"))
    assert table.schema.equals(REQUEST_LOG_SCHEMA, check_metadata=False)


def test_request_log_rotates_by_time(tmp_path: Path) -> None:
    from serving.request_log import RequestLogWriter

    writer = RequestLogWriter(tmp_path, flush_s=0.05, rotate_s=0.2)
    writer.start()
    writer.log(_row(0))
    deadline = time.monotonic() + 5
    while not list(tmp_path.rglob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.close()
    assert [pq.read_table(p).num_rows for p in tmp_path.rglob("*.parquet")] == [1]


def test_feedback_online_update_is_ordered_capped_and_idempotent() -> None:
    from serving.online_push import apply_events

    current = {"user_history__history_item_ids": ["b", "a"], "user_history__history_ts": [200, 100],
               "user_activity__purchases_7d": 2, "user_activity__spend_7d": 3.0, "user_activity__interactions_30d": 2,
               "user_activity__distinct_items_90d": 2, "user_activity__distinct_categories_90d": 1,
               "user_activity__last_purchase_ts": 200}
    events = pd.DataFrame({
        "item_id": ["c", "a"], "event_type": ["purchase", "view"],
        "event_timestamp": pd.to_datetime([300, 150], unit="s", utc=True), "quantity": [2.0, None], "price": [1.5, None],
    })
    cats = {"a": "dairy", "b": "dairy", "c": "bakery"}
    history, act = apply_events(current, events, history_length=3, category_of=cats.get)
    assert history == {"history_item_ids": ["c", "b", "a"], "history_ts": [300, 200, 150],  # most recent first, capped
                       "history_types": ["purchase", "purchase", "view"]}  # a row without types held purchases
    assert act["purchases_7d"] == 3 and act["purchases_90d"] == 1 and act["spend_7d"] == 6.0
    assert act["interactions_30d"] == 4 and act["distinct_items_90d"] == 3 and act["distinct_categories_90d"] == 2
    assert act["last_purchase_ts"] == 300 and act["days_since_last_purchase"] == 0.0
    applied = {**current, **{f"user_history__{n}": v for n, v in history.items()}}
    assert apply_events(applied, events.iloc[:1], history_length=3, category_of=cats.get) is None, "retry is a no-op"
    assert apply_events(applied, events.iloc[1:], history_length=3, category_of=cats.get) is None, "so is a view's"
    # a purchase of the item viewed at that very second is another event: applied
    bought = events.iloc[1:].assign(event_type="purchase", quantity=1.0, price=2.0)
    again, _ = apply_events(applied, bought, history_length=4, category_of=cats.get)
    assert list(zip(again["history_item_ids"], again["history_types"], strict=True))[-2:] == [("a", "purchase"), ("a", "view")]


def test_validation_errors_name_the_fields() -> None:
    from pydantic import ValidationError

    from serving.api import FeedbackRequest, RecommendRequest
    from serving.middleware import explain

    with pytest.raises(ValidationError) as err:
        RecommendRequest.model_validate({"user_id": "a", "k": 500, "colour": "red"})
    body = explain({"error": "2 validation errors", "detail": err.value.errors(include_url=False)})
    assert body["fields"] == ["k", "colour"] and body["error"].startswith("k: Input should be less than or equal to 100")
    with pytest.raises(ValidationError, match="more than one hour in the future"):
        RecommendRequest.model_validate({"user_id": "a", "timestamp": "2999-01-01T00:00:00Z"})
    naive = FeedbackRequest.model_validate({"user_id": "a", "item_id": "x", "event_type": "view",
                                            "timestamp": "2017-06-01T12:00:00"})
    assert naive.timestamp is not None and naive.timestamp.utcoffset().total_seconds() == 0


def test_ann_index_recall_against_exact() -> None:
    pytest.importorskip("faiss")
    import torch

    from recflow.modeling import ItemIndex, UserQuery
    from serving import ranking
    from serving.scorers import AnnScorer, ExactScorer
    from serving.serving_state import ItemCatalogue, ServingState

    rng = np.random.default_rng(0)
    n, d = 20_000, 16
    centers = rng.standard_normal((64, d))
    m = centers[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, d))
    m = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    index = ItemIndex([str(i) for i in range(n)], m, (0.1 * rng.standard_normal(n)).astype(np.float32),
                      np.zeros(n, np.float32))
    cat = ItemCatalogue(np.full(n, None, object), np.full(n, None, object), np.full(n, None, object), {},
                    np.arange(n), np.zeros(n, np.float32))

    def state(ann: AnnScorer | None) -> ServingState:
        return ServingState(None, index, ExactScorer(index), ann, cat, "v", None, "", 0.0)  # type: ignore[arg-type]

    users = m[rng.integers(0, n, 50)] * 10
    asks = [ranking.UserAsk(UserQuery(u, np.array([5]), np.array([100.0], np.float32), 1), 10) for u in users]
    exact = ranking.rank_users(state(None), asks)
    approx = ranking.rank_users(state(AnnScorer(index, nprobe=16)), asks)
    recall = np.mean([len({p.position for p in a} & {p.position for p in e}) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9, recall
    assert all(e[0].position == 5 and a[0].position == 5 for a, e in zip(approx, exact, strict=True)), "re-buy bonus is exact"
    full = torch.from_numpy(users[0] @ m.T + index.bias)
    full[5] = float("-inf")
    assert exact[0][1].score == pytest.approx(float(full.max()), rel=1e-5), "exact = the full matrix product"

    # A few items with a large bias (the most popular) are top-10 for every user, wherever IVF put them.
    hot = rng.choice(n, size=5, replace=False)
    popular_bias = index.bias.copy()
    popular_bias[hot] = 25.0
    index = ItemIndex(index.item_ids, m, popular_bias, np.zeros(n, np.float32))
    exact = ranking.rank_users(state(None), asks)
    approx = ranking.rank_users(state(AnnScorer(index, nprobe=1)), asks)
    assert all(set(hot) <= {p.position for p in e} for e in exact)
    assert all(set(hot) <= {p.position for p in a} for a in approx), "popular items are always ANN candidates"


def test_model_resolution_prefers_model_path_then_champion(make_settings, tmp_path: Path) -> None:
    from recflow import registry
    from recflow.modeling import build_tiny_model, save_model
    from serving.model_source import ModelNotFound, resolve_model

    settings = make_settings()
    with pytest.raises(ModelNotFound, match="no champion model yet"):
        resolve_model(settings)
    tag = registry.register(settings, build_tiny_model(n_items=6), {"note": "unit"})
    registry.set_champion(settings, tag, "unit test")
    champion = resolve_model(settings)
    assert (champion.source, champion.version) == ("champion", tag) and (champion.folder / "config.json").is_file()
    folder = save_model(build_tiny_model(n_items=6), tmp_path / "m", {"model_version": "pinned-7"})
    pinned = settings.model_copy(update={"serving": settings.serving.model_copy(update={"model_path": folder})})
    assert (resolve_model(pinned).source, resolve_model(pinned).version) == ("model_path", "pinned-7")
    with pytest.raises(ModelNotFound, match="not a saved recflow model"):
        resolve_model(settings, tmp_path / "missing")


def test_logged_features_hold_numbers_and_bands_only() -> None:
    from serving.online_reader import logged_features

    feats = {"user_activity__purchases_7d": 3, "user_activity__spend_7d": float("nan"), "user_profile__age": "25-34",
             "user_history__history_item_ids": ["x", "y"], "user_id": "secret-id"}
    out = json.loads(logged_features(feats, 2))
    assert out["purchases_7d"] == 3 and out["spend_7d"] is None
    assert not {"age", "income", "marital_status", "kids_count"} & set(out), "profile attributes stay out by default"
    assert out["history_len"] == 2 and "user_id" not in out and "history_item_ids" not in out
    assert json.loads(logged_features(feats, 2, profile=True))["age"] == "25-34"  # privacy.log_profile=true


def _tiny_state(n_items: int = 60):  # noqa: ANN202
    from recflow.modeling import build_index, build_tiny_model
    from serving.scorers import ExactScorer
    from serving.serving_state import ItemCatalogue, ServingState

    model = build_tiny_model(n_items=n_items, seed=3)
    index = build_index(model)
    cat = ItemCatalogue(np.array([f"t{i}" for i in range(n_items)], object), np.array(["c"] * n_items, object),
                    np.array(["d"] * n_items, object), {}, np.arange(n_items), np.zeros(n_items, np.float32))
    return model, ServingState(model, index, ExactScorer(index), None, cat, "v", None, "", 0.0)  # type: ignore[arg-type]


def _features(rng: np.random.Generator, n_items: int) -> dict[str, object]:
    n = int(rng.integers(0, 12))
    ids = [f"i{int(i)}" for i in rng.integers(0, n_items, n)] + (["unknown"] if n % 4 == 1 else [])
    ts = sorted(rng.integers(1_000_000, 2_000_000, len(ids)).tolist(), reverse=True)
    return {"user_history__history_item_ids": [ids], "user_history__history_ts": [ts],
            "user_activity__days_since_last_purchase": [float(rng.integers(0, 9))],
            "user_activity__purchases_7d": [int(rng.integers(0, 5))], "user_profile__age": ["a"],
            "user_profile__income": [None]}


def test_serving_tower_matches_the_model() -> None:
    """serving.tower (index vectors, batched id lookup) gives the model's own user queries."""
    from recflow.modeling import user_queries
    from serving import tower

    model, state = _tiny_state()
    rng = np.random.default_rng(0)
    feats = [_features(rng, 60) for _ in range(9)] + [{}]
    ours = tower.user_queries(model, state.index, state.lookup, feats)
    ref = user_queries(model, feats)
    for a, b in zip(ours, ref, strict=True):
        assert np.allclose(a.vector, b.vector, atol=1e-5)
        assert np.array_equal(a.bonus_positions, b.bonus_positions) and a.n_history == b.n_history
        assert np.allclose(a.bonus, b.bonus, atol=1e-5)
    assert state.lookup(["i3", "nope", "i0"]).tolist() == [3, -1, 0]
    assert state.lookup([]).tolist() == []


def test_rank_users_is_the_exact_float32_top_k_with_and_without_prefilter() -> None:
    """Batches large enough use the bfloat16 prefilter; results equal a brute-force float32 ranking
    of ``ItemIndex.scores`` (re-buy bonus with the item's repeat offset), with exclusions,
    category rows, k above the allowed items, and for a single user (no prefilter)."""
    import torch

    from recflow.modeling import ItemIndex, UserQuery
    from serving import ranking
    from serving.scorers import ExactScorer
    from serving.serving_state import ItemCatalogue, ServingState

    rng = np.random.default_rng(1)
    n, d = 5000, 16
    m = rng.standard_normal((n, d))
    m[:50] = m[0]  # exact ties
    m = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    index = ItemIndex([str(i) for i in range(n)], m, (0.3 * rng.standard_normal(n)).astype(np.float32),
                      (0.5 * rng.standard_normal(n)).astype(np.float32))
    cat = ItemCatalogue(np.full(n, None, object), np.full(n, None, object), np.full(n, None, object), {},
                    np.arange(n), np.zeros(n, np.float32))
    state = ServingState(None, index, ExactScorer(index), None, cat, "v", None, "", 0.0)  # type: ignore[arg-type]
    assert state.scorer.approx is not None, "the prefilter passes its own error check"
    asks = []
    for b in range(24):
        hist = rng.choice(n, int(rng.integers(0, 30)), replace=False).astype(np.int64)
        q = UserQuery((rng.standard_normal(d) * 10).astype(np.float32), hist,
                      rng.standard_normal(len(hist)).astype(np.float32), len(hist))
        rows = np.sort(rng.choice(n, 7, replace=False)) if b % 5 == 3 else None
        asks.append(ranking.UserAsk(q, 10 if b % 4 else 25, exclude_history=b % 3 == 1, rows=rows))
    assert len(asks) >= ranking.PREFILTER_MIN_BATCH
    for batch in (asks, asks[:1]):
        got = ranking.rank_users(state, batch)
        for a, picks in zip(batch, got, strict=True):
            s = index.scores(a.query).astype(np.float64)
            if a.exclude_history:
                s[a.query.history_positions] = -np.inf
            if a.rows is not None:
                keep = np.full(n, -np.inf)
                keep[a.rows] = s[a.rows]
                s = keep
            k = min(a.k, int(np.isfinite(s).sum()))
            ref = np.sort(s)[::-1][:k]
            assert len(picks) == k
            assert np.allclose([p.score for p in picks], ref, atol=1e-4), "the same scores, best first"
            assert np.allclose(s[[p.position for p in picks]], ref, atol=1e-4), "positions carry those scores"
            for p in picks:
                assert p.kind == ("repeat" if p.position in set(a.query.history_positions.tolist()) else "similar")
    # the prefilter's approximations stay within the bound it reports
    u = np.stack([a.query.vector for a in asks])
    err = (state.scorer.prefilter_scores(u) - state.scorer.scores(u)).abs().max(dim=1).values.numpy()
    assert np.all(err <= state.scorer.error_bound(u))
    assert isinstance(state.scorer.scores(u), torch.Tensor)


def test_request_ids_are_unique_and_uuid_shaped() -> None:
    from serving.request_log import RequestIds

    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_fast_json_matches_the_standard_library() -> None:
    from serving import jsonfast

    value = {"request_id": "x", "items": [{"item_id": "1", "score": 0.123456, "title": "Käse \"mild\"",
                                           "category": None, "reason": {"kind": "repeat", "item_id": "1"}}],
             "feature_age_s": None, "fallback": False, "k": 3}
    assert json.loads(jsonfast.dumps(value)) == value
    assert jsonfast.dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def test_service_env_asks_bentoml_for_the_configured_workers(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import os

    from recflow.settings import load_settings
    from serving.launcher import service_env

    monkeypatch.setenv("BENTOML_CONFIG_OPTIONS", "api_server.traffic.timeout=5")
    base = load_settings(home=tmp_path)
    one = base.model_copy(update={"serving": base.serving.model_copy(update={"workers": 1})})
    assert service_env(one)["BENTOML_CONFIG_OPTIONS"] == "api_server.traffic.timeout=5"
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    auto = base.model_copy(update={"serving": base.serving.model_copy(update={"workers": 0})})
    assert service_env(auto)["BENTOML_CONFIG_OPTIONS"].endswith("services.recflow.workers=2")  # 0: one per core
    three = one.model_copy(update={"serving": one.serving.model_copy(update={"workers": 3})})
    env = service_env(three)
    assert env["BENTOML_CONFIG_OPTIONS"] == "api_server.traffic.timeout=5 services.recflow.workers=3"
    from recflow.settings import load_snapshot
    from serving.launcher import settings_file

    assert load_snapshot(settings_file(three, 3000)).serving.workers == 3  # and the service's own settings say so


def test_request_log_leftovers_exclude_files_of_live_workers(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from serving.request_log import _writer_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f"requests-20261123T000000000000Z-{child.pid}-0.parquet.inprogress"
        assert _writer_alive(live)
    finally:
        child.kill()
        child.wait()
    assert not _writer_alive(live)  # the writer is gone: a crash leftover
    assert not _writer_alive(tmp_path / f"requests-20261123T000000000000Z-{os.getpid()}-0.parquet.inprogress")
    assert not _writer_alive(tmp_path / "requests-garbled.parquet.inprogress")


def test_freeze_heap_takes_live_objects_out_of_the_collector() -> None:
    import gc

    from serving.model_holder import freeze_heap

    keep = [[i] for i in range(100_000)]  # a model's worth of small objects
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= len(keep)
    finally:
        gc.unfreeze()


def test_user_query_cache_reuses_only_unchanged_rows(monkeypatch) -> None:
    from recflow.modeling import UserQuery
    from serving import tower

    calls: list[list[str]] = []

    def compute(feats: list[dict]) -> list[UserQuery]:
        calls.append([f["user_id"] for f in feats])
        return [UserQuery(np.full(2, f["v"], np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32), 1) for f in feats]

    def row(user: str, ts: int, v: float = 1.0) -> dict:
        return {"user_id": user, "h__ts": ts, "a__ts": 5, "v": v}

    clock = [100.0]
    monkeypatch.setattr(tower.time, "monotonic", lambda: clock[0])
    cache = tower.UserQueryCache("m1", ["h__ts", "a__ts"], max_users=2, ttl_s=60)
    first = cache.queries(["a", "b"], [row("a", 1), row("b", 1)], compute)
    again = cache.queries(["a", "b"], [row("a", 1), row("b", 1)], compute)
    assert calls == [["a", "b"]] and again[0] is first[0] and (cache.hits, cache.misses) == (2, 2)
    pushed = cache.queries(["a"], [row("a", 2, v=7.0)], compute)  # a new row timestamp: recomputed
    assert calls[-1] == ["a"] and pushed[0].vector[0] == 7.0
    cache.queries(["c"], [row("c", 1)], compute)  # over max_users: b, least recently used, goes
    cache.queries(["b", "a"], [row("b", 1), row("a", 2)], compute)
    assert calls[-2:] == [["c"], ["b"]] and len(cache) == 2
    clock[0] += 61  # past the TTL: recomputed even with unchanged timestamps
    cache.queries(["b"], [row("b", 1)], compute)
    assert calls[-1] == ["b"]
    off = tower.UserQueryCache("m1", ["h__ts"], max_users=0, ttl_s=60)
    off.queries(["a"], [row("a", 1)], compute)
    off.queries(["a"], [row("a", 1)], compute)
    assert calls[-2:] == [["a"], ["a"]] and len(off) == 0


def test_answer_cache_hits_only_for_the_same_history_and_a_recent_answer() -> None:
    from serving.ranking import AnswerCache, Pick

    c = AnswerCache("v1", max_users=2, max_age_s=60)
    fp = c.fingerprint(["x", "y"], [10, 20])
    assert fp != c.fingerprint(["x", "y"], [10, 21]) and fp != c.fingerprint(["y", "x"], [10, 20])
    picks = [Pick(3, 1.0, "repeat", 3)]
    key = ("u", 10, False, None)
    assert c.get(key, fp, 1_000) is None
    c.put(key, fp, 1_000, picks)
    assert c.get(key, fp, 1_030) is picks  # 30 s later, same history
    assert c.get(key, fp, 1_061) is None  # older than max_age_s
    assert c.get(key, c.fingerprint(["x", "y", "z"], [10, 20, 30]), 1_010) is None  # a push changed the history
    assert c.get(("u", 5, False, None), fp, 1_010) is None  # other options: another key
    assert c.get(key, fp, 999) is None  # an answer from the future is not reused
    c.put(("v", 10, False, None), fp, 1_000, picks)
    c.put(("w", 10, False, None), fp, 1_000, picks)  # beyond max_users: the least recently used goes
    assert len(c) == 2 and c.get(key, fp, 1_010) is None
    assert (c.hits, c.misses) == (1, 6)
    off = AnswerCache("v1", max_users=10, max_age_s=0)
    off.put(key, fp, 1_000, picks)
    assert not off.enabled and off.get(key, fp, 1_000) is None and len(off) == 0


def test_answer_cache_entries_expire_spread_over_the_last_quarter_of_max_age() -> None:
    from serving.ranking import AnswerCache, Pick, answer_key

    c = AnswerCache("v1", max_users=1000, max_age_s=100)
    picks = [Pick(1, 1.0, "repeat", 1)]
    lives = []
    for n in range(200):
        key = answer_key(f"u{n}", 10)
        c.put(key, 7, 0, picks)
        assert c.get(key, 7, 75) is picks and c.get(key, 7, 101) is None
        lives.append(max(t for t in range(75, 101) if c.get(key, 7, t) is picks))
    assert min(lives) < 85 and max(lives) > 95  # spread, not one cliff


def test_recent_users_are_the_latest_rows_first(tmp_path) -> None:  # noqa: ANN001
    from serving.prefill import recent_users

    ts = pd.to_datetime(["2024-01-01", "2024-03-01", "2024-02-01", "2024-01-15"], utc=True)
    pd.DataFrame({"user_id": ["a", "a", "b", "c"], "event_timestamp": ts}).to_parquet(tmp_path / "h.parquet")
    assert recent_users(tmp_path / "h.parquet", 10) == ["a", "b", "c"]
    assert recent_users(tmp_path / "h.parquet", 2) == ["a", "b"]
    assert recent_users(tmp_path / "h.parquet", 0) == [] and recent_users(tmp_path / "missing.parquet", 5) == []


def test_prefill_puts_exactly_what_a_request_would_look_up() -> None:
    from serving.prefill import prefill
    from serving.ranking import AnswerCache, Pick, answer_key

    rows = {f"u{n}": {"user_history__history_item_ids": ["x", f"i{n}"], "user_history__history_ts": [20, 10]}
            for n in range(5)}
    rows["u3"] = {"user_history__history_item_ids": [], "user_history__history_ts": []}  # no history: skipped
    fetched, ranked = [], []

    def fetch(users: list[str]) -> dict:
        fetched.append(users)
        return {u: rows.get(u) for u in users}

    def rank(asks: list) -> list:
        ranked.extend(asks)
        return [[Pick(n, 1.0, "repeat", 0)] for n, _ in enumerate(asks)]

    cache = AnswerCache("v1", max_users=100, max_age_s=900)
    users = [*rows, "unknown"]
    done = prefill(cache, users, fetch, rank, k=10, budget_s=60, batch=2, clock=lambda: 1_000.0)
    assert (done.users, done.answered, done.stopped) == (6, 4, None)
    assert fetched == [["u0", "u1"], ["u2", "u3"], ["u4", "unknown"]]
    assert {a.user_id for a in ranked} == {"u0", "u1", "u2", "u4"}
    assert all(a.k == 10 and a.as_of == 1_000 and not a.exclude_history and a.rows is None for a in ranked)
    fp = cache.fingerprint(["x", "i4"], [20, 10], ["purchase", "purchase"])
    assert cache.get(answer_key("u4", 10), fp, 1_010) is not None  # what /recommend {"user_id": "u4"} looks up
    assert cache.get(answer_key("u4", 5), fp, 1_010) is None  # other options are not prefilled
    assert cache.get(answer_key("u4", 10), cache.fingerprint(["y", "x", "i4"], [30, 20, 10], ["purchase"] * 3), 1_010) is None

    down = prefill(AnswerCache("v1", 100, 900), users, lambda u: None, rank, 10, 60)
    assert down.answered == 0 and down.stopped == "the online store did not answer"
    spent = prefill(AnswerCache("v1", 100, 900), users, fetch, rank, 10, budget_s=-1)
    assert spent.answered == 0 and spent.stopped and "budget" in spent.stopped
    off = prefill(AnswerCache("v1", 100, 0), users, fetch, rank, 10, 60)
    assert off.answered == 0 and off.stopped == "the answer cache is off"
    calls = iter([False, True])  # a stop asked after the first batch: the prefill ends at the next one
    halted = prefill(AnswerCache("v1", 100, 900), users, fetch, rank, 10, 60, batch=2, stop=lambda: next(calls))
    assert halted.answered == 2 and halted.stopped == "the service is stopping"


def test_stop_signals_sets_the_event_and_still_calls_the_handler_in_place() -> None:
    """The start-up wait's signal hook (serving.aio.stop_signals): a SIGTERM inside the block sets
    the event and reaches the handler that was in place (uvicorn's shutdown); afterwards that
    handler is back."""
    import asyncio
    import os
    import signal

    from serving.aio import stop_signals

    got: list[int] = []

    def before(signum: int, frame: object) -> None:
        got.append(signum)

    old = signal.signal(signal.SIGTERM, before)
    try:
        async def main() -> bool:
            with stop_signals() as stop:
                assert not stop.is_set()
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(stop.wait(), 5)
                return stop.is_set()

        assert asyncio.run(main()) is True
        assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, old)


def test_reload_client_sends_the_write_token_and_the_configured_timeout(make_settings, monkeypatch) -> None:  # noqa: ANN001
    import httpx

    from recflow.reload import reload_service

    settings = make_settings(serving={"token": "s3cret", "reload_timeout_s": 42.0})
    seen: dict = {}

    def fake_post(url: str, **kwargs: object) -> httpx.Response:
        seen.update(url=url, **kwargs)
        status = 200 if kwargs.get("json") == {} else 404
        return httpx.Response(status, json={"ok": status == 200}, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", fake_post)
    assert reload_service(settings, "http://127.0.0.1:1/") == {"ok": True}
    assert seen["url"] == "http://127.0.0.1:1/reload"
    assert seen["timeout"] == 42.0
    assert seen["headers"] == {"Authorization": "Bearer s3cret"}
    with pytest.raises(httpx.HTTPStatusError):
        reload_service(settings, "http://127.0.0.1:1", model_tag="recflow:missing")
