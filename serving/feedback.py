"""Feedback events: canonical rows for the event log, and the online update pushed to Feast.

The event log (``recflow.event_log``) is the source of truth: an event is appended (durable)
before anything else, and :func:`push_events` then updates the users' online rows through the
``user_history_push`` and ``user_activity_push`` sources. Pending events are retried from the log.

The online update is incremental and approximate until the next feature build recomputes the
rows from the log: history gets the item (most recent first, capped at
``features.history_length``); activity counts and spend grow (windows do not slide online); the
distinct item/category counts grow when the item/category is new to the user's history. An event
already in the user's online history (same item and second) is not applied again, so retries are
idempotent. Several workers of one machine serialise their read-merge-write on
``<home>/locks/online-push.lock`` (``push_events(lock_path=...)``), so none overwrites another's
update. The pushed rows are stamped with the event time, or one second after the stored row
when that is later (the Redis store ignores rows that are not newer).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from recflow.schemas import EVENTS_SCHEMA, USER_ACTIVITY_FEATURES, USER_HISTORY_FEATURES

if TYPE_CHECKING:
    from feast import FeatureStore

    from serving.api import FeedbackRequest

FEEDBACK_ID_PREFIX = "fb"
ACTIVITY_PUSH = "user_activity_push"
HISTORY_PUSH = "user_history_push"
ONLINE_PUSH_LOCK = "online-push.lock"  # under Settings.paths.locks
_INT = {n for n, t in USER_ACTIVITY_FEATURES.items() if str(t) == "int64"}


def event_frame(req: FeedbackRequest, now: datetime | None = None) -> pd.DataFrame:
    """The canonical event (``recflow.schemas.EVENTS_SCHEMA`` columns) for a feedback request.

    Without an ``event_id`` the id is derived from the content (``recflow.datasets.validation.
    content_event_ids``, as ingest does: ``fb-<hash>``), which needs the request's own timestamp;
    ``ValueError`` when it has neither (the service answers 422 before it gets here)."""
    ts = req.timestamp or now or datetime.now(UTC)
    if req.event_id is None and req.timestamp is None:
        raise ValueError("a feedback event needs an event_id or a timestamp to derive one from")
    row = {
        "event_id": req.event_id,
        "user_id": req.user_id,
        "item_id": req.item_id,
        "event_type": req.event_type,
        "event_timestamp": pd.Timestamp(ts).tz_convert("UTC"),
        "basket_id": req.basket_id,
        "quantity": req.quantity,
        "price": req.price,
    }
    df = pd.DataFrame([row], columns=EVENTS_SCHEMA.names)
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    if req.event_id is None:  # derived from the content, exactly as ingest derives it
        from recflow.datasets.validation import content_event_ids

        df["event_id"] = content_event_ids(df, FEEDBACK_ID_PREFIX)
    return df


def _read_online(store: FeatureStore, user_ids: list[str]) -> list[dict[str, Any]]:
    refs = [f"user_activity:{n}" for n in USER_ACTIVITY_FEATURES] + [f"user_history:{n}" for n in USER_HISTORY_FEATURES]
    got = store.get_online_features(
        features=refs, entity_rows=[{"user_id": u} for u in user_ids], full_feature_names=True
    ).to_dict(include_event_timestamps=True)
    return [{k: v[i] for k, v in got.items()} for i in range(len(user_ids))]


def apply_events(
    current: dict[str, Any],
    events: pd.DataFrame,
    history_length: int,
    category_of: Callable[[str], str | None],
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """New ``(history, activity)`` feature values of one user after ``events`` (oldest first), or
    None when every event is already applied. ``current`` is the user's online read."""
    ids = list(current.get("user_history__history_item_ids") or [])
    tss = [int(t) for t in (current.get("user_history__history_ts") or [])]
    act = {n: current.get(f"user_activity__{n}") for n in USER_ACTIVITY_FEATURES}
    for n in _INT - {"last_purchase_ts"}:
        act[n] = int(act[n] or 0)
    for n in ("spend_7d", "spend_30d", "spend_90d"):
        act[n] = float(act[n] or 0.0)
    seen = set(zip(ids, tss, strict=False))
    changed = False
    for ev in events.itertuples(index=False):
        ts = int(pd.Timestamp(ev.event_timestamp).timestamp())
        if (ev.item_id, ts) in seen:
            continue
        new_item = ev.item_id not in ids
        cat = category_of(ev.item_id)
        new_cat = cat is not None and cat not in {category_of(i) for i in ids}
        pos = next((j for j, t in enumerate(tss) if t <= ts), len(tss))
        ids.insert(pos, ev.item_id)
        tss.insert(pos, ts)
        seen.add((ev.item_id, ts))
        act["interactions_30d"] += 1
        if ev.event_type == "purchase":
            qty = 1.0 if pd.isna(ev.quantity) else float(ev.quantity)
            price = 0.0 if pd.isna(ev.price) else float(ev.price)
            for w in (7, 30, 90):
                act[f"purchases_{w}d"] += 1
                act[f"spend_{w}d"] = round(act[f"spend_{w}d"] + qty * price, 4)
            act["distinct_items_90d"] += int(new_item)
            act["distinct_categories_90d"] += int(new_cat)
            if act["last_purchase_ts"] is None or ts >= int(act["last_purchase_ts"]):
                act["last_purchase_ts"] = ts
                act["days_since_last_purchase"] = 0.0
        changed = True
    if not changed:
        return None
    history = {"history_item_ids": ids[:history_length], "history_ts": tss[:history_length]}
    return history, act


def _stamp(events: pd.DataFrame, stored_s: Any) -> pd.Timestamp:
    newest = pd.Timestamp(events["event_timestamp"].max())
    stored = pd.Timestamp(int(stored_s or 0) + 1, unit="s", tz="UTC")
    return max(newest, stored)


def push_events(
    store: FeatureStore,
    events: pd.DataFrame,
    *,
    history_length: int,
    category_of: Callable[[str], str | None],
    lock_path: Path | None = None,
    lock_timeout_s: float = 2.0,
) -> int:
    """Apply accepted ``events`` (canonical columns) to their users' online rows and push them.

    With ``lock_path`` the read-merge-write runs under an exclusive ``flock`` on that file
    (``recflow.locks``), so workers of one machine pushing the same user never overwrite each
    other's update; the lock is waited for at most ``lock_timeout_s`` (then ``LockTimeout``).
    Returns how many users were updated. Raises whatever the store raises: the caller keeps the
    events pending in the log and retries.
    """
    if events.empty:
        return 0
    if lock_path is None:
        return _merge_and_push(store, events, history_length, category_of)
    from recflow.locks import file_lock

    with file_lock(lock_path, lock_timeout_s):
        return _merge_and_push(store, events, history_length, category_of)


def _merge_and_push(store: FeatureStore, events: pd.DataFrame, history_length: int,
                    category_of: Callable[[str], str | None]) -> int:
    events = events.sort_values("event_timestamp", kind="stable")
    users = list(dict.fromkeys(events["user_id"].astype(str)))
    current = _read_online(store, users)
    now = pd.Timestamp.now(tz="UTC")
    hist_rows, act_rows = [], []
    for user, cur in zip(users, current, strict=True):
        evs = events[events["user_id"] == user]
        new = apply_events(cur, evs, history_length, category_of)
        if new is None:
            continue
        history, activity = new
        hist_rows.append({"user_id": user, "event_timestamp": _stamp(evs, cur.get("user_history__history_item_ids__ts")),
                          "created_timestamp": now, **history})
        act_rows.append({"user_id": user, "event_timestamp": _stamp(evs, cur.get("user_activity__purchases_7d__ts")),
                         "created_timestamp": now, **activity})
    if not hist_rows:
        return 0
    store.push(HISTORY_PUSH, pd.DataFrame(hist_rows))
    act = pd.DataFrame(act_rows)
    for n in USER_ACTIVITY_FEATURES:  # last_purchase_ts is null for a user who only viewed
        act[n] = act[n].astype(("Int64" if n == "last_purchase_ts" else "int64") if n in _INT else "float64")
    store.push(ACTIVITY_PUSH, act)
    return len(hist_rows)
