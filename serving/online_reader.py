"""Online user features for serving: one Feast read for a batch of users, and what gets logged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from recflow.feature_store import online_store
from recflow.schemas import LOGGED_ACTIVITY, logged_features  # noqa: F401 - re-exported for the service

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

TS_SUFFIX = "__ts"
# Timestamps that date a user's features (the freshest decides feature_age_s).
AGE_KEYS = ("user_activity__purchases_7d__ts", "user_history__history_item_ids__ts")


class OnlineUserReader:
    """The serving FeatureService's user features through Feast's online-store read API, lean.

    ``FeatureStore.get_online_features`` builds a columnar protobuf response, then a dict of
    columns; for one user that generic machinery costs more than the store reads themselves. This
    resolves the service's feature views once and calls ``OnlineStore.online_read`` per view (the
    API Feast's own precompute path uses), converting values with Feast's type map, so the answer
    equals :func:`fetch_user_features` (``tests/integration/test_feature_store.py`` checks it) at
    about a third of the cost (``benchmarks/results/serving.json``). Rebuild it when the registry
    changes (``Runtime`` does on reload).
    """

    def __init__(self, store: FeatureStore, service: FeatureService) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self._entity_key, self._value = EntityKey, Value
        self._config = store.config
        self._online = online_store(store)
        self._views: list[tuple[Any, list[str], list[tuple[str, str, Any]]]] = []
        join_keys: set[str] = set()
        for proj in service.feature_view_projections:
            view = store.get_feature_view(proj.name)
            join_keys.update(view.join_keys)
            names = [f.name for f in proj.features]
            types = {f.name: f.dtype.to_value_type() for f in view.features}
            prefix = proj.name_to_use()
            self._views.append((view, names, [(n, f"{prefix}__{n}", types.get(n)) for n in names]))
        if join_keys != {"user_id"}:
            raise ValueError(f"feature service {service.name!r} must be keyed by user_id alone, not {sorted(join_keys)}")

    @property
    def stamp_keys(self) -> list[str]:
        """One ``__ts`` key per feature view: together they date every row a user's answer reads."""
        return [columns[0][1] + TS_SUFFIX for _, _, columns in self._views if columns]

    def __call__(self, user_ids: Sequence[str]) -> list[dict[str, Any]]:
        """One dict per user, as :func:`fetch_user_features` returns it."""
        from feast.type_map import feast_value_type_to_python_type as to_python

        keys = [self._entity_key(join_keys=["user_id"], entity_values=[self._value(string_val=str(u))]) for u in user_ids]
        out: list[dict[str, Any]] = [{"user_id": u, "user_id" + TS_SUFFIX: 0} for u in user_ids]
        for view, names, columns in self._views:
            rows = self._online.online_read(config=self._config, table=view, entity_keys=keys, requested_features=names)
            for row, (ts, values) in zip(out, rows, strict=True):
                stamp = int(ts.timestamp()) if ts is not None else 0
                for name, key, vtype in columns:
                    v = values.get(name) if values else None
                    row[key] = to_python(v, vtype) if v is not None else None
                    row[key + TS_SUFFIX] = stamp
        return out


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


