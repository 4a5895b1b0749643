"""The Feast feature store as recflow uses it: config from settings, apply, materialise, push, read.

The Feast objects are built by a function of the settings (``recflow.feature_definitions``);
``feature_repo/`` holds ``feature_store.yaml`` and, for the plain Feast CLI, ``definitions.py``,
which exposes the same objects.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from recflow.progress import report
from recflow.settings import Settings
from recflow.timeutil import to_utc

if TYPE_CHECKING:
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

def feature_repo_path() -> Path:
    """Folder of the Feast definitions (inside the installed ``feature_repo`` package)."""
    import feature_repo

    return Path(feature_repo.__file__).resolve().parent


def repo_config(settings: Settings) -> RepoConfig:
    """Feast RepoConfig: ``feature_repo/feature_store.yaml`` with recflow's settings applied."""
    from feast.repo_config import RepoConfig

    repo = feature_repo_path()
    text = (repo / "feature_store.yaml").read_text().replace("${RECFLOW_HOME}", str(settings.home))
    raw: dict[str, Any] = yaml.safe_load(text)
    raw["project"] = settings.feast.project
    if settings.feast.online_store == "redis":
        raw["online_store"] = {"type": "redis", "connection_string": redis_connection(settings)}
    return RepoConfig(repo_path=repo, **raw)


def redis_connection(settings: Settings) -> str:
    """The Redis connection string with a socket timeout on every call (``feast.store_timeout_s``),
    unless the string sets its own: a hung Redis then fails a call instead of holding it forever."""
    from recflow.security import reveal

    text = reveal(settings.feast.redis_connection_string) or ""
    options = {part.split("=", 1)[0].strip().lower() for part in text.split(",") if "=" in part}
    timeout = settings.feast.store_timeout_s
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name not in options:
            text += f",{name}={timeout}"
    return text


def forget_user(settings: Settings, user_id: str, store: FeatureStore | None = None) -> int:
    """Delete ``user_id``'s rows from the online store (every user-keyed feature view, pushes included);
    returns how many rows (SQLite) or keys (Redis) went. Every call has a timeout
    (``feast.store_timeout_s``); SQLite is vacuumed and its WAL checkpointed so the bytes leave the files."""
    import sqlite3

    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import compute_table_id
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    store = store or get_store(settings)
    config = store.config
    key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=str(user_id))])
    if settings.feast.online_store == "redis":
        from feast.infra.online_stores.helpers import _redis_key

        client = redis_client(store)
        redis_key = _redis_key(config.project, key, entity_key_serialization_version=config.entity_key_serialization_version)
        return int(client.delete(redis_key))
    blob = serialize_entity_key(key, entity_key_serialization_version=config.entity_key_serialization_version)
    path = settings.paths.feast_online
    if not path.exists():
        return 0
    views = [v for v in store.list_feature_views() if "user_id" in v.join_keys]
    removed = 0
    con = sqlite3.connect(path, timeout=settings.feast.store_timeout_s, isolation_level=None)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for view in views:
            table = compute_table_id(config.project, view)
            if table in tables:
                removed += con.execute(f'DELETE FROM "{table}" WHERE entity_key = ?', (blob,)).rowcount
        con.execute("VACUUM")
        # WAL mode (bound_sqlite): the vacuumed pages are in the WAL until a checkpoint copies them
        # into the database and empties the WAL, which leaves no old page in either file
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    return removed


def get_store(settings: Settings) -> FeatureStore:
    """A FeatureStore on recflow's configuration. Creates the store's folder if needed."""
    import warnings

    from feast import FeatureStore

    # Feast's modules put a "once" DeprecationWarning filter first at import, above the CLI's; ibis's
    # DuckDB backend (Feast's offline store) warns about its own DuckDB calls, which is not the user's
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ibis(\.|$)")
    settings.paths.feast.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(config=repo_config(settings))
    if settings.feast.online_store != "redis":
        bound_sqlite(store, settings.feast.store_timeout_s)
    return store


def provider(store: FeatureStore) -> Any:
    """The store's Feast provider (``ingest_df``, ``online_store``).

    Feast exposes no public accessor for it; this function and :func:`online_store` are recflow's only
    uses of ``FeatureStore._get_provider``, and ``tests/code/test_adapters.py`` pins the behaviour relied
    upon (``online_read`` and ``ingest_df`` round-trip a row), so an upgrade that changes it fails there."""
    return store._get_provider()  # noqa: SLF001 - Feast exposes no public accessor


def redis_client(store: FeatureStore) -> Any:
    """The ``redis.Redis`` client of a store whose online store is Redis (the one its reads and writes
    use, with the connection string's timeouts), through the online store's own ``_get_client``."""
    return online_store(store)._get_client(store.config.online_store)  # noqa: SLF001 - no public API


def online_store(store: FeatureStore) -> Any:
    """The store's online store object (``online_read``), read without Feast's per-call overhead."""
    return provider(store).online_store


def bound_sqlite(store: FeatureStore, timeout_s: float) -> None:
    """Give the SQLite online store's connection a busy timeout of ``timeout_s`` (Feast opens it with
    sqlite3's default and no setting of its own), so a locked store fails a call instead of holding it,
    and put the database in WAL mode (persistent in the file; Feast leaves SQLite's rollback journal).

    In the rollback-journal mode every online write (a feedback push, twice) locks readers out while
    it commits, and a ``/recommend`` read that meets the lock sleeps in SQLite's busy handler (1 to
    100 ms steps); in WAL mode reads never wait for a writer, and a commit syncs one file instead of
    a journal and the database. ``synchronous`` stays SQLite's FULL."""
    import sqlite3

    online = online_store(store)
    get_conn = getattr(online, "_get_conn", None)
    if get_conn is not None:
        conn = get_conn(store.config)
        conn.execute(f"PRAGMA busy_timeout = {max(1, int(timeout_s * 1000))}")
        with contextlib.suppress(sqlite3.OperationalError):  # another process holds a lock: it switches later
            conn.execute("PRAGMA journal_mode=WAL")


def load_definitions(settings: Settings) -> list[Any]:
    """recflow's Feast objects for ``settings`` (``recflow.feature_definitions``), in apply order."""
    from recflow.feature_definitions import build_definitions

    return build_definitions(settings).objects()


@dataclass
class ApplyResult:
    """Names of what ``apply`` registered."""

    entities: list[str]
    feature_views: list[str]
    feature_services: list[str]
    data_sources: list[str]


def apply(settings: Settings, store: FeatureStore | None = None) -> ApplyResult:
    """Register the definitions in the registry and create online tables (idempotent, like ``feast apply``)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    store = store or get_store(settings)
    objects = load_definitions(settings)
    store.apply(objects)
    return ApplyResult(
        entities=sorted(o.name for o in objects if isinstance(o, Entity)),
        feature_views=sorted(o.name for o in objects if isinstance(o, FeatureView)),
        feature_services=sorted(o.name for o in objects if isinstance(o, FeatureService)),
        data_sources=sorted(o.name for o in objects if isinstance(o, DataSource)),
    )


@dataclass
class MaterializeResult:
    """Rows read from the offline tables inside the window, and how long materialisation took."""

    start: datetime
    end: datetime
    rows_in_window: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows_in_window / self.seconds if self.seconds else 0.0


def _utc(ts: datetime | pd.Timestamp | str) -> datetime:
    return to_utc(ts).to_pydatetime()


def feature_time_range(settings: Settings) -> tuple[datetime, datetime]:
    """[first, last] event_timestamp over all feature tables (for the default materialisation window)."""
    import duckdb

    from recflow.schemas import FEATURE_TABLES

    files = [str(settings.paths.feature_table(n)) for n in FEATURE_TABLES]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"feature tables missing: {missing}; run `recflow features` first.")
    lo, hi = duckdb.execute(
        f"SELECT min(event_timestamp), max(event_timestamp) FROM read_parquet({files!r}, union_by_name=true)"
    ).fetchone()  # type: ignore[misc]
    return _utc(lo), _utc(hi)


def default_window(settings: Settings) -> tuple[datetime, datetime]:
    """[first feature timestamp, last feature timestamp + 1 s): everything the tables hold."""
    lo, hi = feature_time_range(settings)
    return lo, hi + timedelta(seconds=1)


def materialize(
    settings: Settings,
    start: datetime | str,
    end: datetime | str,
    store: FeatureStore | None = None,
    feature_views: list[str] | None = None,
) -> MaterializeResult:
    """Load the latest feature values with event_timestamp in [start, end) into the online store.

    Idempotent: the same window over the same tables always writes the same online values.
    """
    import duckdb

    from recflow.schemas import FEATURE_TABLES

    start_dt, end_dt = _utc(start), _utc(end)
    if end_dt <= start_dt:
        raise ValueError(f"materialisation window is empty: start={start_dt} end={end_dt}; end must be after start.")
    names = feature_views or list(FEATURE_TABLES)
    files = [str(settings.paths.feature_table(n)) for n in names]
    rows = duckdb.execute(
        f"SELECT count(*) FROM read_parquet({files!r}, union_by_name=true) "
        "WHERE event_timestamp >= ? AND event_timestamp < ?",
        [start_dt, end_dt],
    ).fetchone()[0]  # type: ignore[index]
    store = store or get_store(settings)
    # Feast's window is inclusive of its end; recflow's contract is [start, end).
    feast_end = end_dt - timedelta(microseconds=1)
    t = time.perf_counter()
    for i, name in enumerate(names):
        report("materialize", i, len(names), f"materialising {name}")
        store.materialize(start_date=start_dt, end_date=feast_end, feature_views=[name])
    report("materialize", len(names), len(names), "done")
    return MaterializeResult(start_dt, end_dt, int(rows), time.perf_counter() - t)


def online_features(
    settings: Settings,
    entity_rows: list[dict[str, Any]],
    service: str | None = None,
    store: FeatureStore | None = None,
) -> pd.DataFrame:
    """Online values of a feature service (default: the serving service) for the given entity rows."""
    store = store or get_store(settings)
    fs = store.get_feature_service(service or settings.feast.serving_service)
    return store.get_online_features(features=fs, entity_rows=entity_rows, full_feature_names=True).to_df()


def push(settings: Settings, push_source: str, df: pd.DataFrame, store: FeatureStore | None = None) -> None:
    """Write rows straight to the online store through a push source (visible to the next read)."""
    store = store or get_store(settings)
    store.push(push_source, df)
