"""Synthetic request logs, catalogues and purchases for tests and demos of the monitor.

``shift`` moves the served user features (more activity, other age bands), ``pop_shift`` moves
recommendations towards other departments and more popular items, and ``hit_rate`` sets how
often a user buys one of the items they were shown (recommendation quality).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

AGE_BANDS = ("19-24", "25-34", "35-44", "45-54", "55-64", "65+")


def synthetic_items(n_items: int = 400, n_departments: int = 8, seed: int = 0) -> pd.DataFrame:
    """Catalogue ``item_id, category, department, brand, price``; items sorted by popularity rank."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"i{i:05d}" for i in range(n_items)])
    dept = np.array([f"DEPT {i}" for i in range(n_departments)])[np.arange(n_items) % n_departments]
    return pd.DataFrame({
        "item_id": ids, "category": [f"{d} / C{i % 5}" for i, d in enumerate(dept)], "department": dept,
        "brand": np.where(rng.random(n_items) < 0.3, "Private", "National"),
        "price": np.round(rng.gamma(2.0, 2.0, n_items), 2),
    })


def synthetic_log(n_requests: int, n_users: int, start: str | pd.Timestamp, days: float = 7.0, *,
                  items: pd.DataFrame, k: int = 10, shift: float = 0.0, pop_shift: float = 0.0,
                  seed: int = 0, user_offset: int = 0) -> pd.DataFrame:
    """A request-log frame (``recflow.schemas.REQUEST_LOG_SCHEMA`` columns) for ``/recommend``."""
    rng = np.random.default_rng(seed)
    start_ts = pd.Timestamp(start, tz="UTC") if pd.Timestamp(start).tzinfo is None else pd.Timestamp(start)
    user_idx = rng.integers(0, n_users, n_requests) + user_offset
    ts = (start_ts + pd.to_timedelta(np.sort(rng.random(n_requests)) * days * 86400, unit="s")).floor("ms")
    act = 1.0 + shift
    age_p = np.array([0.05, 0.2, 0.3, 0.25, 0.15, 0.05])
    if shift:
        age_p = age_p[::-1]
    feats = pd.DataFrame({
        "user_id": [f"u{u}" for u in user_idx],
        "purchases_7d": rng.poisson(3 * act, n_requests),
        "purchases_30d": rng.poisson(12 * act, n_requests),
        "spend_30d": np.round(rng.gamma(2.0, 20.0 * act, n_requests), 2),
        "days_since_last_purchase": np.round(rng.exponential(4.0 / act, n_requests), 3),
        "last_purchase_ts": (ts.asi8 // 10**9) - rng.integers(0, 10**6, n_requests),
        "age": np.array(AGE_BANDS)[rng.choice(len(AGE_BANDS), n_requests, p=age_p / age_p.sum())],
        "income": np.array(["low", "mid", "high"])[rng.choice(3, n_requests, p=[0.3, 0.5, 0.2])],
    })
    feats["history_item_ids"] = [[]] * n_requests
    features = feats.to_json(orient="records", lines=True).splitlines()

    n_items = len(items)
    weights = 1.0 / np.arange(1, n_items + 1) ** (0.8 + pop_shift)
    if pop_shift:
        dept = items["department"].to_numpy()
        weights = weights * np.where(dept == dept[0], 5.0, 1.0)
    weights = weights / weights.sum()
    # k distinct items per request: Gumbel top-k over log-weights (vectorised sampling without replacement)
    keys = np.log(weights)[None, :] - np.log(-np.log(rng.random((n_requests, n_items))))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    scores = np.sort(rng.normal(0.6 + 0.2 * pop_shift, 0.1, (n_requests, k)), axis=1)[:, ::-1].astype(np.float32)
    ids = items["item_id"].to_numpy()
    return pd.DataFrame({
        "request_id": [f"r{seed}-{i}" for i in range(n_requests)],
        "ts": ts,
        "endpoint": "recommend",
        "user_id": feats["user_id"],
        "item_id": None,
        "k": np.int32(k),
        "model_version": "v1",
        "fallback": rng.random(n_requests) < 0.02,
        "degraded": False,
        "feature_age_s": rng.exponential(3600.0, n_requests),
        "latency_ms": rng.gamma(2.0, 6.0, n_requests),
        "features": features,
        "item_ids": list(ids[top]),
        "scores": list(scores),
        "arm": None,
    })


def synthetic_purchases(log: pd.DataFrame, *, hit_rate: float, items: pd.DataFrame, seed: int = 0,
                        within_days: float = 3.0, noise_per_user: int = 2) -> pd.DataFrame:
    """Purchase events (canonical events columns) following each user's first request.

    Each user buys their first list's top item with probability ``hit_rate`` (within
    ``within_days``) and ``noise_per_user`` random catalogue items.
    """
    rng = np.random.default_rng(seed)
    first = log.sort_values("ts").drop_duplicates("user_id")
    n = len(first)
    hit = rng.random(n) < hit_rate
    top_item = np.array([lst[0] for lst in first["item_ids"]]) if n else np.array([], dtype=object)
    delay = pd.to_timedelta(rng.random(n) * within_days * 86400, unit="s")
    hits = pd.DataFrame({"user_id": first["user_id"].to_numpy()[hit], "item_id": top_item[hit],
                         "event_timestamp": (pd.DatetimeIndex(pd.to_datetime(first["ts"], utc=True)) + delay)[hit]})
    users = np.repeat(first["user_id"].to_numpy(), noise_per_user)
    first_ts = pd.DatetimeIndex(pd.to_datetime(first["ts"], utc=True)).repeat(noise_per_user)
    noise = pd.DataFrame({
        "user_id": users,
        "item_id": items["item_id"].to_numpy()[rng.integers(0, len(items), len(users))],
        "event_timestamp": first_ts + pd.to_timedelta(rng.random(len(users)) * within_days * 86400, unit="s"),
    })
    ev = pd.concat([hits, noise], ignore_index=True)
    ev["event_timestamp"] = pd.to_datetime(ev["event_timestamp"], utc=True).dt.floor("ms")
    ev.insert(0, "event_id", [f"e{seed}-{i}" for i in range(len(ev))])
    ev["event_type"] = "purchase"
    ev["basket_id"] = None
    ev["quantity"] = 1.0
    ev["price"] = 1.0
    return ev[["event_id", "user_id", "item_id", "event_type", "event_timestamp", "basket_id", "quantity", "price"]]
