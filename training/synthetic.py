"""A small synthetic shop with re-buying habits, and a Feast-like training set built from it.

For tests and demos of ``training/`` where Feast is not available. :func:`features_frame` follows
the semantics of the ``training_v1`` user features at midnight anchors: the history is the
user's last ``history_length`` purchase lines before the anchor, most recent first;
``purchases_*d``/``spend_*d`` count the windows before the anchor; the other activity features
are left null (the model reads null as missing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from training.examples import purchases, to_utc

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


def with_views(events: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``events`` with browsing added: every purchase preceded by a view of the item up to 5 days
    before (half of them also by a cart in between), plus as many views of other items as half the
    purchases. For tests of the ranker's views-and-carts features and candidates."""
    rng = np.random.default_rng(seed)
    p = events[events["event_type"] == "purchase"]
    before = pd.to_timedelta(rng.uniform(0.1, 5, len(p)), unit="D")
    views = p.assign(event_type="view", event_timestamp=p["event_timestamp"] - before, basket_id=None)
    carts = p.assign(event_type="cart", event_timestamp=p["event_timestamp"] - before / 2, basket_id=None)[rng.random(len(p)) < 0.5]
    other = p.sample(frac=0.5, random_state=seed)
    browse = other.assign(event_type="view", item_id=rng.permutation(p["item_id"].to_numpy())[: len(other)], basket_id=None,
                          event_timestamp=other["event_timestamp"] - pd.to_timedelta(rng.uniform(0, 3, len(other)), unit="D"))
    out = pd.concat([events, views, carts, browse], ignore_index=True)
    out["event_id"] = [f"e{n}" for n in range(len(out))]
    return out


def features_frame(entities: pd.DataFrame, events: pd.DataFrame, history_length: int = 50) -> pd.DataFrame:
    """Training-set-like frame for ``entities`` (user_id, item_id, event_timestamp at midnight)."""
    ev = purchases(events).sort_values(["user_id", "event_timestamp"], kind="stable")
    by_user = {u: (g["item_id"].astype(str).to_numpy(), g["ts"].to_numpy(), g["event_timestamp"].to_numpy())
               for u, g in ev.groupby("user_id")}
    empty = (np.array([], dtype=object), np.array([], dtype=np.int64), np.array([], dtype="datetime64[ns]"))
    rows = []
    for user, ts, item in zip(entities["user_id"], entities["event_timestamp"], entities["item_id"], strict=True):
        ids, secs, stamps = by_user.get(user, empty)
        t = to_utc(ts)
        n = int(np.searchsorted(secs, t.value // 10**9, side="left"))
        lo = max(0, n - history_length)
        row = {
            "user_id": user, "item_id": item, "event_timestamp": t,
            "user_history__history_item_ids": ids[lo:n][::-1].tolist(),
            "user_history__history_ts": secs[lo:n][::-1].astype("int64").tolist(),
        }
        for w in (7, 30, 90):
            start = (t - pd.Timedelta(days=w)).value // 10**9
            row[f"user_activity__purchases_{w}d"] = float(n - np.searchsorted(secs, start, side="left"))
        row["user_activity__days_since_last_purchase"] = (t.value // 10**9 - secs[n - 1]) / 86400 if n else np.nan
        row["user_profile__age"] = "25-34" if sum(map(ord, str(user))) % 2 else None
        rows.append(row)
    return pd.DataFrame(rows)


def popularity_table(events: pd.DataFrame) -> pd.DataFrame:
    """An ``item_popularity``-shaped table: one row per (item, day after a sale), with trailing
    7/30-day purchase counts as of that day (buyers and interactions approximated by purchases)."""
    ev = purchases(events)
    daily = ev.assign(day=ev["event_timestamp"].dt.floor("D")).groupby(["item_id", "day"]).size().rename("n").reset_index()
    out = []
    for item, g in daily.groupby("item_id"):
        s = g.set_index("day")["n"].asfreq("D", fill_value=0)
        p7, p30 = s.rolling(7, min_periods=1).sum(), s.rolling(30, min_periods=1).sum()
        out.append(pd.DataFrame({"item_id": item, "event_timestamp": s.index + pd.Timedelta(days=1),
                                 "purchases_7d": p7.to_numpy(), "purchases_30d": p30.to_numpy()}))
    t = pd.concat(out, ignore_index=True)
    t["buyers_30d"] = t["purchases_30d"]
    t["interactions_30d"] = t["purchases_30d"]
    t["trend"] = (t["purchases_7d"] / 7) / (t["purchases_30d"] / 30).where(t["purchases_30d"] > 0)
    t["trend"] = t["trend"].fillna(0.0)
    return t


def synthetic_data(
    n_users: int = 40, n_items: int = 80, train_weeks: int = 6, seed: int = 0, history_length: int = 100
) -> tuple[Any, pd.DataFrame]:
    """``(TrainData, events)`` of a synthetic shop with a tiny random text encoder (no weights, no Feast)."""
    import torch

    from recflow.modeling.build import TINY_BERT, tiny_tokenizer, unique_texts
    from recflow.modeling.model import TextEncoder
    from training.examples import Catalogue, entity_frame, split_anchors
    from training.train_data import prepare_data

    days = 7 * (train_weeks + 3)
    events, items = synthetic_shop(n_users=n_users, n_items=n_items, days=days, seed=seed)
    cut = to_utc("2024-01-01") + pd.Timedelta(days=days - 14)
    tr, val, test = split_anchors(cut, train_weeks)
    frame = features_frame(entity_frame(events, [*tr, val, test]), events, history_length)
    texts, _ = unique_texts(Catalogue.from_items(items).texts)
    torch.manual_seed(seed)
    enc = TextEncoder(TINY_BERT).eval()
    tok = tiny_tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = enc(tok["input_ids"], tok["attention_mask"]).numpy()
    data = prepare_data(
        events=events, items=items, training_set=frame, item_popularity=popularity_table(events), cutoff=cut,
        train_weeks=train_weeks, text_emb=emb, encoder=dict(TINY_BERT),
    )
    return data, events
