"""Feedback events: canonical rows for the event log, and the online update pushed to Feast.

The event log (``recflow.event_log``) is the source of truth: an event is appended (durable)
before anything else, and :func:`push_events` then updates the users' online rows through the
``user_history_push`` and ``user_activity_push`` sources. Pending events are retried from the log.

The online update is incremental and approximate until the next feature build recomputes the
rows from the log: history gets the item (most recent first, capped at
``features.history_length``); activity counts and spend grow (windows do not slide online); the
distinct item/category counts grow when the item/category is new to the user's history. An event
already in the user's online history (same item and second) is not applied again, so retries are
idempotent. Writers serialise their read-merge-write, so none overwrites another's update: the
workers of one machine on ``<home>/locks/online-push.lock`` (``push_events(lock_path=...)``), and,
with the Redis online store, the workers of every machine on a Redis lock next to the rows
(``push_events(lock=...)``, :func:`serving.pusher.push_lock`). The pushed rows are stamped with the event time, or one second after the stored row
when that is later (the Redis store ignores rows that are not newer).

Cost: the service turns requests into journal records without a data frame per event
(:func:`event_records`), and pushes through :class:`OnlineRows`, which resolves the push sources'
feature views once and reads and writes them through the online store's own calls (Feast's
``push`` re-reads the registry's protos on every call: most of a push's time), writing value
protos made straight from the merged rows (:meth:`OnlineRows.write_rows`; Feast's ingestion of a
data frame goes through Arrow first, a third of a push's time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from recflow.feature_store import provider
from recflow.schemas import EVENTS_SCHEMA, USER_ACTIVITY_FEATURES, USER_HISTORY_FEATURES, history_types

if TYPE_CHECKING:
    from feast import FeatureStore

    from recflow.event_log import Record
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def event_records(reqs: Sequence[FeedbackRequest], now: datetime) -> list[Record]:
    """The journal records (``recflow.event_log.Record``) of feedback requests, as :func:`event_frame`
    would give them, without a data frame per event (only a keyless event's derived id needs one)."""
    out: list[Record] = []
    for r in reqs:
        ts = r.timestamp or now
        ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        event_id = r.event_id if r.event_id is not None else str(event_frame(r, now)["event_id"].iloc[0])
        out.append((event_id, r.user_id, r.item_id, r.event_type, (ts - _EPOCH) // _US, r.basket_id,
                    None if r.quantity is None else float(r.quantity), None if r.price is None else float(r.price)))
    return out


def records_frame(records: Sequence[Record]) -> pd.DataFrame:
    """Journal records as canonical events (``EVENTS_SCHEMA`` columns)."""
    df = pd.DataFrame.from_records(list(records), columns=["event_id", "user_id", "item_id", "event_type", "event_ts_us",
                                                           "basket_id", "quantity", "price"])
    df.insert(4, "event_timestamp", pd.to_datetime(df.pop("event_ts_us"), unit="us", utc=True))
    return df[EVENTS_SCHEMA.names]


class OnlineRows:
    """The users' ``user_history`` and ``user_activity`` online rows, read and written lean.

    ``FeatureStore.push`` resolves the push source's feature views from the registry's protos on
    every call (tens of milliseconds, more than the write). This resolves them once and then calls
    what ``push`` ends in, ``Provider.ingest_df`` (the same conversion and online write), and reads
    with ``OnlineStore.online_read`` as ``serving.online_reader.OnlineUserReader`` does, so the values equal
    :func:`_read_online`'s. When a feature service precomputes online vectors (which ``push`` would
    refresh) it falls back to ``push``. Views are resolved at the first call; rebuild it when the
    registry changes."""

    def __init__(self, store: FeatureStore) -> None:
        self._store = store
        self._resolved = False

    def resolve(self) -> None:
        """Resolve the feature views once, at the first read or write."""
        if self._resolved:
            return
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        store = self._store
        self._entity_key, self._value = EntityKey, Value
        self._config = store.config
        self._provider = provider(store)
        views = store.list_feature_views()
        self._targets = {
            push: [v for v in views if getattr(v.stream_source, "name", None) == push] for push in (HISTORY_PUSH, ACTIVITY_PUSH)
        }
        targets = {v.name for vs in self._targets.values() for v in vs}
        self._precompute = any(getattr(svc, "precompute_online", False) and
                               any(p.name in targets for p in svc.feature_view_projections)
                               for svc in store.list_feature_services())
        self._reads: list[tuple[Any, list[str], list[tuple[str, str, Any]]]] = []
        for name, features in (("user_activity", USER_ACTIVITY_FEATURES), ("user_history", USER_HISTORY_FEATURES)):
            view = store.get_feature_view(name)
            types = {f.name: f.dtype.to_value_type() for f in view.features}
            self._reads.append((view, list(features), [(n, f"{name}__{n}", types.get(n)) for n in features]))
        self._resolved = True

    def read(self, user_ids: Sequence[str]) -> list[dict[str, Any]]:
        """One dict per user: ``view__feature`` values and ``view__feature__ts`` (epoch seconds, 0 when
        the user has no row), as :func:`_read_online` returns them."""
        from feast.type_map import feast_value_type_to_python_type as to_python

        self.resolve()
        keys = [self._entity_key(join_keys=["user_id"], entity_values=[self._value(string_val=str(u))]) for u in user_ids]
        out: list[dict[str, Any]] = [{"user_id": u, "user_id__ts": 0} for u in user_ids]
        online = self._provider.online_store
        for view, names, columns in self._reads:
            rows = online.online_read(config=self._config, table=view, entity_keys=keys, requested_features=names)
            for row, (ts, values) in zip(out, rows, strict=True):
                stamp = int(ts.timestamp()) if ts is not None else 0
                for name, key, vtype in columns:
                    v = values.get(name) if values else None
                    row[key] = to_python(v, vtype) if v is not None else None
                    row[key + "__ts"] = stamp
        return out

    def write(self, push_source: str, df: pd.DataFrame) -> None:
        """What ``store.push(push_source, df)`` writes online."""
        self.resolve()
        if self._precompute:
            self._store.push(push_source, df)
            return
        if not self._targets[push_source]:
            raise ValueError(f"no feature view is fed by the push source {push_source!r}")
        for view in self._targets[push_source]:
            self._provider.ingest_df(view, df)

    def write_rows(self, push_source: str, rows: Sequence[dict[str, Any]]) -> None:
        """What :meth:`write` writes for ``pd.DataFrame(rows)``, without the data frame: Feast's
        ingestion turns a frame into Arrow and Arrow into value protos, most of a push's time; here
        each feature's values go straight to ``feast.type_map.python_values_to_proto_values`` (the
        function that ingestion ends in) and the rows to the online store's ``online_write_batch``.
        ``rows``: the entity key, ``event_timestamp``, ``created_timestamp`` and every feature of
        the views the push source feeds (None or NaN: null, as a frame's missing value)."""
        from feast.type_map import python_values_to_proto_values

        self.resolve()
        if self._precompute or not rows:
            self.write(push_source, pd.DataFrame(list(rows)))
            return
        if not self._targets[push_source]:
            raise ValueError(f"no feature view is fed by the push source {push_source!r}")
        for view in self._targets[push_source]:
            keys = [(e.name, e.dtype.to_value_type()) for e in view.entity_columns]
            entity = [python_values_to_proto_values([_null(r[k]) for r in rows], t) for k, t in keys]
            entity_keys = [self._entity_key(join_keys=[k for k, _ in keys], entity_values=[col[i] for col in entity])
                           for i in range(len(rows))]
            columns = {f.name: python_values_to_proto_values([_null(r[f.name]) for r in rows], f.dtype.to_value_type())
                       for f in view.features}
            data = [(entity_keys[i], {name: col[i] for name, col in columns.items()},
                     _datetime(r["event_timestamp"]), _datetime(r.get("created_timestamp")))
                    for i, r in enumerate(rows)]
            self._provider.online_write_batch(self._config, view, data, progress=None)


def _null(value: Any) -> Any:
    """None for a missing scalar (None, NaN, pandas NA), else ``value`` (lists pass as they are)."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    return None if pd.isna(value) else value


def _datetime(value: Any) -> datetime | None:
    """A timezone-aware ``datetime`` (what Feast's ingestion hands its online stores)."""
    return None if value is None else pd.Timestamp(value).to_pydatetime()


def _read_online(store: FeatureStore, user_ids: list[str]) -> list[dict[str, Any]]:
    refs = [f"user_activity:{n}" for n in USER_ACTIVITY_FEATURES] + [f"user_history:{n}" for n in USER_HISTORY_FEATURES]
    got = store.get_online_features(
        features=refs, entity_rows=[{"user_id": u} for u in user_ids], full_feature_names=True
    ).to_dict(include_event_timestamps=True)
    return [{k: v[i] for k, v in got.items()} for i in range(len(user_ids))]


def _num(value: Any, default: float) -> float:
    return default if value is None or pd.isna(value) else float(value)


def apply_events(
    current: dict[str, Any],
    events: pd.DataFrame,
    history_length: int,
    category_of: Callable[[str], str | None],
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """New ``(history, activity)`` feature values of one user after ``events`` (oldest first), or
    None when every event is already applied. ``current`` is the user's online read."""
    seconds = [int(pd.Timestamp(t).timestamp()) for t in events["event_timestamp"]]
    rows = list(zip(events["item_id"].astype(str), seconds, events["event_type"], events["quantity"], events["price"],
                    strict=True))
    return _apply(current, rows, history_length, category_of)


def _apply(
    current: dict[str, Any],
    events: Sequence[tuple[str, int, str, Any, Any]],
    history_length: int,
    category_of: Callable[[str], str | None],
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """:func:`apply_events` over ``(item_id, epoch seconds, event_type, quantity, price)`` tuples."""
    ids = list(current.get("user_history__history_item_ids") or [])
    tss = list(map(int, current.get("user_history__history_ts") or []))
    kinds = history_types(ids, current.get("user_history__history_types"))
    act = {n: current.get(f"user_activity__{n}") for n in USER_ACTIVITY_FEATURES}
    for n in _INT - {"last_purchase_ts"}:
        act[n] = int(act[n] or 0)
    for n in ("spend_7d", "spend_30d", "spend_90d"):
        act[n] = float(act[n] or 0.0)
    times = {e[1] for e in events}
    seen = {(i, t, k) for i, t, k in zip(ids, tss, kinds, strict=False) if t in times}  # only these can repeat an event
    known_items = set(ids)
    known_cats: set[str | None] | None = None  # the history's categories, computed at the first new item
    changed = False
    for item, ts, event_type, quantity, price in events:
        if (item, ts, event_type) in seen:
            continue
        new_item = item not in known_items
        cat = category_of(item)
        if new_item and known_cats is None:
            known_cats = set(map(category_of, ids))
        new_cat = new_item and cat is not None and cat not in known_cats  # type: ignore[operator]
        pos = next((j for j, t in enumerate(tss) if t <= ts), len(tss))
        ids.insert(pos, item)
        tss.insert(pos, ts)
        kinds.insert(pos, event_type)
        seen.add((item, ts, event_type))
        known_items.add(item)
        if known_cats is not None:
            known_cats.add(cat)
        act["interactions_30d"] += 1
        if event_type == "purchase":
            qty, cost = _num(quantity, 1.0), _num(price, 0.0)
            for w in (7, 30, 90):
                act[f"purchases_{w}d"] += 1
                act[f"spend_{w}d"] = round(act[f"spend_{w}d"] + qty * cost, 4)
            act["distinct_items_90d"] += int(new_item)
            act["distinct_categories_90d"] += int(new_cat)
            if act["last_purchase_ts"] is None or ts >= int(act["last_purchase_ts"]):
                act["last_purchase_ts"] = ts
                act["days_since_last_purchase"] = 0.0
        changed = True
    if not changed:
        return None
    history = {"history_item_ids": ids[:history_length], "history_ts": tss[:history_length],
               "history_types": kinds[:history_length]}
    return history, act


def _stamp(newest_us: int, stored_s: Any) -> pd.Timestamp:
    newest = pd.Timestamp(newest_us, unit="us", tz="UTC")
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
    rows: OnlineRows | None = None,
    lock: Callable[[], AbstractContextManager[Any]] | None = None,
) -> int:
    """Apply accepted ``events`` (canonical columns) to their users' online rows and push them.

    With ``lock_path`` the read-merge-write runs under an exclusive ``flock`` on that file
    (``recflow.locks``), so workers of one machine pushing the same user never overwrite each
    other's update; the lock is waited for at most ``lock_timeout_s`` (then ``LockTimeout``).
    ``lock`` (a factory of a context manager, e.g. a Redis lock shared by several machines) is used
    instead of ``lock_path`` when given.
    ``rows``: the :class:`OnlineRows` of ``store`` (built here when not given). Returns how many
    users were updated. Raises whatever the store raises: the caller keeps the events pending in
    the log and retries.
    """
    if events.empty:
        return 0
    if lock is None and lock_path is None:
        return _merge_and_push(rows or OnlineRows(store), events, history_length, category_of)
    from recflow.locks import file_lock

    with lock() if lock is not None else file_lock(lock_path, lock_timeout_s):  # type: ignore[arg-type]
        return _merge_and_push(rows or OnlineRows(store), events, history_length, category_of)


def _merge_and_push(rows: OnlineRows, events: pd.DataFrame, history_length: int,
                    category_of: Callable[[str], str | None]) -> int:
    events = events.sort_values("event_timestamp", kind="stable")
    stamps_us = pd.to_datetime(events["event_timestamp"], utc=True).astype("datetime64[us, UTC]").astype("int64").tolist()
    by_user: dict[str, list[tuple[str, int, str, Any, Any]]] = {}
    newest: dict[str, int] = {}
    for user, item, us, kind, qty, price in zip(events["user_id"].astype(str).tolist(), events["item_id"].astype(str).tolist(),
                                               stamps_us, events["event_type"].tolist(), events["quantity"].tolist(),
                                               events["price"].tolist(), strict=True):
        by_user.setdefault(user, []).append((item, us // 1_000_000, kind, qty, price))
        newest[user] = max(newest.get(user, us), us)
    users = list(by_user)
    current = rows.read(users)
    now = pd.Timestamp.now(tz="UTC")
    hist_rows, act_rows = [], []
    for user, cur in zip(users, current, strict=True):
        new = _apply(cur, by_user[user], history_length, category_of)
        if new is None:
            continue
        history, activity = new
        hist_rows.append({"user_id": user, "event_timestamp": _stamp(newest[user], cur.get("user_history__history_item_ids__ts")),
                          "created_timestamp": now, **history})
        act_rows.append({"user_id": user, "event_timestamp": _stamp(newest[user], cur.get("user_activity__purchases_7d__ts")),
                         "created_timestamp": now, **activity})
    if not hist_rows:
        return 0
    rows.write_rows(HISTORY_PUSH, hist_rows)
    for act in act_rows:  # the views' types; last_purchase_ts is null for a user who only viewed
        for n in USER_ACTIVITY_FEATURES:
            v = _null(act[n])
            act[n] = None if v is None else int(v) if n in _INT else float(v)
    rows.write_rows(ACTIVITY_PUSH, act_rows)
    return len(hist_rows)
