"""Canonical data contracts shared by every recflow package.

- events: one row per user action, append-only, unique ``event_id``;
- items: the catalogue, one row per ``item_id``;
- users: one row per ``user_id`` with optional profile columns;
- quarantine: rejected input rows with the reason they were rejected.

Ids are strings everywhere so that any shop's ids (numeric, UUID, SKU) fit. Timestamps are UTC.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import pandas as pd
import pyarrow as pa

EVENT_TYPES: Final[tuple[str, ...]] = ("view", "cart", "purchase")
TS = pa.timestamp("us", tz="UTC")

EVENTS_SCHEMA: Final = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("event_timestamp", TS, nullable=False),
        pa.field("basket_id", pa.string()),
        pa.field("quantity", pa.float64()),
        pa.field("price", pa.float64()),
    ]
)
# The events columns the purchase log and the models read (training, the benchmarks; with
# ``event_id`` the training-set window's). One list, so a reader never asks for a column another lacks.
LOG_COLUMNS: Final[tuple[str, ...]] = ("user_id", "item_id", "event_type", "event_timestamp", "basket_id")

# Profile columns a users table may carry; all optional strings (categorical bands).
USER_PROFILE_COLUMNS: Final[tuple[str, ...]] = (
    "age",
    "income",
    "home_ownership",
    "marital_status",
    "household_size",
    "household_comp",
    "kids_count",
)

USERS_SCHEMA: Final = pa.schema(
    [pa.field("user_id", pa.string(), nullable=False), pa.field("first_seen", TS)]
    + [pa.field(c, pa.string()) for c in USER_PROFILE_COLUMNS]
)

ITEMS_SCHEMA: Final = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("text", pa.string()),
        pa.field("category", pa.string()),
        pa.field("department", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("first_seen", TS),
    ]
)

QUARANTINE_REASONS: Final[tuple[str, ...]] = (
    "missing_user_id",
    "missing_item_id",
    "unparsable_timestamp",
    "future_timestamp",
    "negative_quantity",
    "unparsable_number",
    "unknown_event_type",
    "duplicate_event_id",
    "unknown_item_id",
)


def conform(df: pd.DataFrame, schema: pa.Schema, *, name: str) -> pa.Table:
    """Return ``df`` as an Arrow table with exactly ``schema``'s columns, in order.

    Raises ``ValueError`` naming the table and column when a required column is missing, a
    non-nullable column has nulls, or a value cannot be represented in the column's type.
    Extra columns are not allowed: adapters decide explicitly what they keep.
    """
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; expected {schema.names}")
    extra = [c for c in df.columns if c not in schema.names]
    if extra:
        raise ValueError(f"{name}: unexpected column(s) {extra}; expected {schema.names}")
    arrays = []
    for field in schema:
        col = df[field.name]
        if not field.nullable and col.isna().any():
            raise ValueError(f"{name}.{field.name}: {int(col.isna().sum())} null value(s) in a required column")
        try:
            arrays.append(pa.Array.from_pandas(col, type=field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"{name}.{field.name}: cannot store values as {field.type}: {exc}") from exc
    return pa.Table.from_arrays(arrays, schema=schema)


# --- Feature tables (recflow.features) -------------------------------------------------------
# Every feature table has the entity key, ``event_timestamp`` (the moment the row becomes valid:
# the end of the daily bucket it summarises) and ``created_timestamp``.
USER_ACTIVITY_FEATURES: Final[dict[str, pa.DataType]] = {
    "purchases_7d": pa.int64(),
    "purchases_30d": pa.int64(),
    "purchases_90d": pa.int64(),
    "spend_7d": pa.float64(),
    "spend_30d": pa.float64(),
    "spend_90d": pa.float64(),
    "interactions_30d": pa.int64(),
    "distinct_items_90d": pa.int64(),
    "distinct_categories_90d": pa.int64(),
    "avg_basket_size_90d": pa.float64(),
    "days_since_last_purchase": pa.float64(),
    "last_purchase_ts": pa.int64(),
}
USER_HISTORY_FEATURES: Final[dict[str, pa.DataType]] = {
    "history_item_ids": pa.list_(pa.string()),  # most recent first
    "history_ts": pa.list_(pa.int64()),  # epoch seconds, aligned with history_item_ids
    # each entry's event type (view, cart, purchase), aligned: the two-stage ranker reads the purchases only
    "history_types": pa.list_(pa.string()),
}
USER_PROFILE_FEATURES: Final[dict[str, pa.DataType]] = {c: pa.string() for c in USER_PROFILE_COLUMNS}
ITEM_POPULARITY_FEATURES: Final[dict[str, pa.DataType]] = {
    "purchases_7d": pa.int64(),
    "purchases_30d": pa.int64(),
    "buyers_30d": pa.int64(),
    "interactions_30d": pa.int64(),
    "trend": pa.float64(),
}
ITEM_CATALOG_FEATURES: Final[dict[str, pa.DataType]] = {
    "title": pa.string(),
    "text": pa.string(),
    "category": pa.string(),
    "department": pa.string(),
    "brand": pa.string(),
    "price": pa.float64(),
}
FEATURE_TABLES: Final[dict[str, tuple[str, dict[str, pa.DataType]]]] = {
    "user_activity": ("user_id", USER_ACTIVITY_FEATURES),
    "user_history": ("user_id", USER_HISTORY_FEATURES),
    "user_profile": ("user_id", USER_PROFILE_FEATURES),
    "item_popularity": ("item_id", ITEM_POPULARITY_FEATURES),
    "item_catalog": ("item_id", ITEM_CATALOG_FEATURES),
}


def history_types(item_ids: list[Any], types: Any) -> list[str]:
    """The event type of each entry of a ``user_history`` row, aligned with ``item_ids``. A row
    written before ``history_types`` existed (None, or a list of another length) counts every entry
    as a purchase, which is how the ranker read such rows; ``recflow features`` rewrites them."""
    if types is None or len(types) != len(item_ids):
        return ["purchase"] * len(item_ids)
    return [str(t) for t in types]


def feature_table_schema(name: str) -> pa.Schema:
    """Arrow schema of a feature table: key, timestamps, then features."""
    key, features = FEATURE_TABLES[name]
    return pa.schema(
        [pa.field(key, pa.string(), nullable=False), pa.field("event_timestamp", TS, nullable=False),
         pa.field("created_timestamp", TS)]
        + [pa.field(n, t) for n, t in features.items()]
    )


# --- Request log (written by serving, read by monitoring) ------------------------------------
REQUEST_LOG_SCHEMA: Final = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),
        pa.field("endpoint", pa.string(), nullable=False),  # recommend | similar | search
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),  # the query item for /similar
        pa.field("k", pa.int32()),
        pa.field("model_version", pa.string()),
        pa.field("fallback", pa.bool_()),
        pa.field("degraded", pa.bool_()),
        pa.field("feature_age_s", pa.float64()),
        pa.field("latency_ms", pa.float64()),
        # Serving features actually used, as a JSON object {feature_name: value} (ids and numbers only,
        # never free text): monitoring flattens it for drift reports.
        pa.field("features", pa.string()),
        pa.field("item_ids", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.float32())),
        # "champion" or "canary" while a canary runs (recflow.canary), else null
        pa.field("arm", pa.string()),
    ]
)


def request_log_row(
    *, request_id: str, ts: Any, user_id: str | None, model_version: str, k: int, item_ids: list[str],
    scores: list[float], features: str | None, endpoint: str = "recommend", item_id: str | None = None,
    fallback: bool = False, degraded: bool = False, feature_age_s: float | None = None, latency_ms: float | None = None,
    arm: str | None = None,
) -> dict[str, Any]:
    """One request-log row (:data:`REQUEST_LOG_SCHEMA`), as the service writes it and the monitoring reference
    builds it. ``user_id`` must already be the keyed pseudonym (``recflow.privacy``), never the raw id."""
    return {
        "request_id": request_id, "ts": ts, "endpoint": endpoint, "user_id": user_id, "item_id": item_id, "k": k,
        "model_version": model_version, "fallback": fallback, "degraded": degraded, "feature_age_s": feature_age_s,
        "latency_ms": latency_ms, "features": features, "item_ids": item_ids, "scores": scores, "arm": arm,
    }


# --- the request log's ``features`` column: written by the service and the monitoring reference ---
LOGGED_ACTIVITY = tuple(n for n in USER_ACTIVITY_FEATURES if n != "last_purchase_ts")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def logged_features(features: Mapping[str, Any] | None, n_history: int, *, profile: bool = False,
                    model_features: Mapping[str, Any] | None = None) -> str:
    """JSON of the numeric serving features used (no ids, no free text); profile attributes (age,
    income, marital status, kids ...) only with ``profile`` (``privacy.log_profile``).

    ``model_features`` (the two-stage model: the user-level ranker features it ranked with, computed
    from the online history as of the request) replace the online activity counts, which that
    model does not read and whose windows do not slide between materialisations."""
    if not features:
        return json.dumps({"history_len": n_history})
    out: dict[str, Any] = ({n: _clean(v) for n, v in model_features.items()} if model_features is not None else
                           {n: _clean(features.get(f"user_activity__{n}")) for n in LOGGED_ACTIVITY})
    if profile:
        out.update({n: features.get(f"user_profile__{n}") for n in USER_PROFILE_FEATURES})
    hist = features.get("user_history__history_item_ids") or []
    out["history_len"] = len(hist)
    out["history_known"] = n_history
    return json.dumps(out, separators=(",", ":"))


# --- events between flows ---------------------------------------------------------------------
DRIFT_EVENT: Final = "recflow.drift.detected"  # emitted by the monitor flow, triggers retrain/on-drift
