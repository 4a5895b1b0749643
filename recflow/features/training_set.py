"""Training-set builder: an entity frame through the training FeatureService, out as parquet.

The entity frame has one row per training example: ``user_id``, ``event_timestamp`` and
``item_id`` (the target). Feast performs the point-in-time join: every feature value is the
latest one stamped at or before the row's ``event_timestamp``, never a later one.

The service's feature views are joined per entity (user views on unique ``(user_id,
event_timestamp)``, item views on unique ``(item_id, event_timestamp)``) and merged back, so a
basket of 20 lines costs one user lookup, not 20. Output columns are ``<view>__<feature>``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from recflow.schemas import LOG_COLUMNS
from recflow.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

@dataclass
class TrainingSetResult:
    """Where the training set went and what it holds."""

    path: Path
    rows: int
    columns: list[str]
    seconds: float
    lookups: dict[str, int]


def _validate(entity_df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    required = [*keys, "event_timestamp"]
    missing = [c for c in required if c not in entity_df.columns]
    if missing:
        raise ValueError(f"entity frame: missing column(s) {missing}; it needs {required}")
    df = entity_df.copy()
    ts = pd.to_datetime(df["event_timestamp"], utc=True, errors="coerce")
    if ts.isna().any():
        bad = df.loc[ts.isna(), "event_timestamp"].head(3).tolist()
        raise ValueError(f"entity frame: {int(ts.isna().sum())} unparsable event_timestamp value(s), e.g. {bad}")
    df["event_timestamp"] = ts
    for col in keys:
        if df[col].isna().any():
            raise ValueError(f"entity frame: {int(df[col].isna().sum())} null {col} value(s)")
        df[col] = df[col].astype("string")
    return df


def _refs_by_key(store: FeatureStore, service_name: str) -> dict[str, list[str]]:
    """Feature references of a FeatureService grouped by the join key of their view."""
    service = store.get_feature_service(service_name)
    by_key: dict[str, list[str]] = {}
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        keys = [e.name for e in view.entity_columns]
        if len(keys) != 1 or keys[0] not in ("user_id", "item_id"):
            raise ValueError(f"feature view {view.name}: recflow expects one user_id or item_id key, got {keys}")
        by_key.setdefault(keys[0], []).extend(f"{projection.name}:{f.name}" for f in projection.features)
    return by_key


def get_historical(
    settings: Settings, entity_df: pd.DataFrame, service: str | None = None, store: FeatureStore | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Point-in-time features of a FeatureService (default: the training service) for every row.

    ``entity_df`` needs ``event_timestamp`` and the join keys the service's views use
    (``user_id`` and/or ``item_id``). Returns the frame (entity columns first, original row order
    kept) and the number of unique lookups made per join key. Feast is asked ``feast.historical_batch_rows``
    lookups at a time, which bounds the offline store's memory.
    """
    from recflow.feature_store import get_store

    store = store or get_store(settings)
    by_key = _refs_by_key(store, service or settings.feast.training_service)
    out = _validate(entity_df, sorted(by_key)).reset_index(drop=True)
    lookups: dict[str, int] = {}
    batch = settings.feast.historical_batch_rows
    for key, refs in by_key.items():
        unique = out[[key, "event_timestamp"]].drop_duplicates().reset_index(drop=True)
        lookups[key] = len(unique)
        # in batches (feast.historical_batch_rows): each row is joined with every earlier snapshot of its entity
        parts = [store.get_historical_features(entity_df=unique.iloc[i:i + batch], features=refs,
                                               full_feature_names=True).to_df()
                 for i in range(0, len(unique), batch)]
        joined = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        joined["event_timestamp"] = pd.to_datetime(joined["event_timestamp"], utc=True)
        joined[key] = joined[key].astype("string")
        out = out.merge(joined, on=[key, "event_timestamp"], how="left", validate="many_to_one")
    return out, lookups


def get_training_features(
    settings: Settings, entity_df: pd.DataFrame, store: FeatureStore | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Point-in-time features of the training FeatureService for (user_id, item_id, event_timestamp) rows."""
    return get_historical(settings, entity_df, settings.feast.training_service, store=store)


def build_training_set(
    settings: Settings, entity_df: pd.DataFrame, out_path: Path | None = None, store: FeatureStore | None = None
) -> TrainingSetResult:
    """Join the training features to ``entity_df`` and write the result to parquet (atomically)."""
    started = time.perf_counter()
    frame, lookups = get_training_features(settings, entity_df, store=store)
    path = out_path or settings.paths.training_sets / f"{settings.feast.training_service}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return TrainingSetResult(
        path=path,
        rows=len(frame),
        columns=list(frame.columns),
        seconds=time.perf_counter() - started,
        lookups=lookups,
    )


EVENT_COLUMNS = ["event_id", *LOG_COLUMNS]


def load_events(settings: Settings, *, include_holdout: bool = False) -> pd.DataFrame:
    """Canonical events plus the feedback in the event log (one row per event id, canonical first);
    with ``include_holdout``, also the events ``ingest --until`` kept back (evaluation of the future)."""
    from recflow.event_log import EventLog

    paths = settings.paths
    if not paths.events.exists():
        raise FileNotFoundError(f"{paths.events} does not exist: run `recflow features` first")
    frames = [pd.read_parquet(paths.events, columns=EVENT_COLUMNS)]
    feedback = EventLog(paths.event_log).read()
    if len(feedback):
        frames.append(feedback[EVENT_COLUMNS])
    if include_holdout and paths.holdout_events.exists():
        frames.append(pd.read_parquet(paths.holdout_events, columns=EVENT_COLUMNS))
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    events["event_timestamp"] = pd.to_datetime(events["event_timestamp"], utc=True)
    return events.drop_duplicates("event_id", keep="first").reset_index(drop=True)
