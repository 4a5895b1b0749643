"""Online user features for serving: one Feast read for a batch of users, and what gets logged."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from recflow.schemas import USER_ACTIVITY_FEATURES, USER_PROFILE_FEATURES

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

TS_SUFFIX = "__ts"
# Timestamps that date a user's features (the freshest decides feature_age_s).
AGE_KEYS = ("user_activity__purchases_7d__ts", "user_history__history_item_ids__ts")
LOGGED_ACTIVITY = tuple(n for n in USER_ACTIVITY_FEATURES if n != "last_purchase_ts")


def fetch_user_features(store: FeatureStore, service: FeatureService, user_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per user: ``view__feature`` values (None when missing) and ``view__feature__ts``
    epoch seconds (0 when missing), from a single online read of ``service``."""
    got = store.get_online_features(
        features=service, entity_rows=[{"user_id": u} for u in user_ids], full_feature_names=True
    ).to_dict(include_event_timestamps=True)
    n = len(user_ids)
    return [{name: values[i] for name, values in got.items()} for i in range(n)]


def feature_age_s(features: Mapping[str, Any], now_s: float) -> float | None:
    """Seconds between ``now_s`` and the freshest user feature row (None when the user has none)."""
    stamps = [features.get(k) or 0 for k in AGE_KEYS]
    newest = max(stamps) if stamps else 0
    return max(0.0, now_s - float(newest)) if newest else None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def logged_features(features: Mapping[str, Any] | None, n_history: int) -> str:
    """JSON of the numeric and categorical serving features used (no ids, no free text)."""
    if not features:
        return json.dumps({"history_len": n_history})
    out: dict[str, Any] = {n: _clean(features.get(f"user_activity__{n}")) for n in LOGGED_ACTIVITY}
    out.update({n: features.get(f"user_profile__{n}") for n in USER_PROFILE_FEATURES})
    hist = features.get("user_history__history_item_ids") or []
    out["history_len"] = len(hist)
    out["history_known"] = n_history
    return json.dumps(out, separators=(",", ":"))
