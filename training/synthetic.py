"""A small synthetic shop with re-buying habits, and a Feast-like training set built from it.

For tests and demos of ``training/`` where Feast is not available. :func:`features_frame` follows
the semantics of the ``training_v1`` user features at midnight anchors: the history is the
user's last ``history_length`` purchase lines before the anchor, most recent first;
``purchases_*d``/``spend_*d`` count the windows before the anchor; the other activity features
are left null (the model reads null as missing).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.data import purchases, to_utc

WORDS = ("milk", "bread", "cheese", "apple", "soap", "juice", "rice", "beans", "coffee", "pasta", "tea", "eggs")


def synthetic_shop(
    n_users: int = 60, n_items: int = 120, days: int = 84, seed: int = 0, start: str = "2024-01-01"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(events, items)`` in the canonical schema. Every user has a few staple items re-bought
    on a cycle, plus random popular items; 10% of the items first sell in the last two weeks."""
    rng = np.random.default_rng(seed)
    t0 = to_utc(start)
    item_ids = np.array([f"p{n:04d}" for n in range(n_items)])
    pop = rng.zipf(1.6, n_items).astype(float)
    pop /= pop.sum()
    late = rng.random(n_items) < 0.1
    rows = []
    for u in range(n_users):
        staples = rng.choice(n_items, size=rng.integers(3, 8), replace=False, p=pop)
        cycle = rng.integers(3, 15, size=len(staples))
        day = int(rng.integers(0, 5))
        basket = 0
        while day < days:
            items = [s for s, c in zip(staples, cycle, strict=True) if day % c < 4 and rng.random() < 0.7]
            items += list(rng.choice(n_items, size=rng.integers(1, 5), p=pop))
            ts = t0 + pd.Timedelta(days=day, hours=int(rng.integers(8, 20)), minutes=int(rng.integers(0, 60)))
            for i in dict.fromkeys(int(x) for x in items):
                if late[i] and day < days - 14:
                    continue
                rows.append((f"u{u:03d}", item_ids[i], ts, f"u{u:03d}-{basket}", 1.0, 1.0 + i % 7))
            basket += 1
            day += int(rng.integers(2, 7))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_timestamp", "basket_id", "quantity", "price"])
    events["event_id"] = [f"e{n}" for n in range(len(events))]
    events["event_type"] = "purchase"
    events = events[["event_id", "user_id", "item_id", "event_type", "event_timestamp", "basket_id", "quantity", "price"]]
    first = events.groupby("item_id")["event_timestamp"].min()
    texts = [f"{WORDS[n % len(WORDS)]} {WORDS[(n * 7) % len(WORDS)]}; size {n % 4}" for n in range(n_items)]
    items = pd.DataFrame({"item_id": item_ids, "text": texts, "title": texts})
    items["first_seen"] = items["item_id"].map(first)
    return events, items


def features_frame(entities: pd.DataFrame, events: pd.DataFrame, history_length: int = 50) -> pd.DataFrame:
    """Training-set-like frame for ``entities`` (user_id, item_id, event_timestamp at midnight)."""
    ev = purchases(events).sort_values(["user_id", "event_timestamp"], kind="stable")
    out = []
    for (user, ts), grp in entities.groupby(["user_id", "event_timestamp"], sort=False):
        before = ev[(ev["user_id"] == user) & (ev["event_timestamp"] < ts)]
        hist = before.iloc[::-1].head(history_length)
        row = {
            "user_history__history_item_ids": hist["item_id"].astype(str).tolist(),
            "user_history__history_ts": hist["ts"].astype("int64").tolist(),
        }
        for w in (7, 30, 90):
            win = before[before["event_timestamp"] >= ts - pd.Timedelta(days=w)]
            row[f"user_activity__purchases_{w}d"] = float(len(win))
        row["user_activity__days_since_last_purchase"] = (
            (ts - before["event_timestamp"].max()).total_seconds() / 86400 if len(before) else np.nan
        )
        row["user_profile__age"] = "25-34" if sum(map(ord, str(user))) % 2 else None
        for _, r in grp.iterrows():
            out.append({"user_id": user, "item_id": r["item_id"], "event_timestamp": ts, **row})
    return pd.DataFrame(out)
