"""Point-in-time feature tables from the canonical tables, computed in DuckDB.

Timing semantics (what makes the tables point-in-time correct):
- Events are bucketed by UTC day. A row summarising day ``b`` is stamped ``b + 1 day`` at 00:00 UTC:
  it becomes valid only once the whole day is over, so a feature row never contains an event
  that happened after the moment it is joined to.
- Windowed values (purchases over 7/30/90 days, ...) change on the days events enter or leave the
  window, so rows are written on exactly those days ("change points"): activity days and activity
  days + w for each window w. Between two rows the value is constant, so the as-of join that Feast
  performs returns the exact windowed value at any moment.
- Sliding distinct counts (distinct items, categories, buyers) use +1/-1 deltas on the days an
  element enters and leaves the window, summed with a running total and read with an ASOF join.
- ``created_timestamp`` equals ``event_timestamp`` so that rebuilding gives identical files.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from recflow.event_log import EventLog
from recflow.progress import report as progress
from recflow.schemas import FEATURE_TABLES, feature_table_schema
from recflow.settings import Settings


@dataclass
class FeatureBuildReport:
    """Rows written per feature table, where, and how long each took."""

    tables: dict[str, int] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def connect(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection working in UTC."""
    spill = Path(tempfile.gettempdir()) / "recflow-duckdb"  # not DuckDB's default ./.tmp in the cwd
    con = duckdb.connect(config={"threads": threads or max(1, os.cpu_count() or 1), "temp_directory": str(spill)})
    con.execute("SET TimeZone='UTC'")
    con.execute("SET enable_progress_bar=false")
    return con


def _stage_events(con: duckdb.DuckDBPyConnection, events: Path, items: Path, feedback: list[Path]) -> None:
    """Canonical events plus flushed feedback segments (one row per event id, canonical first), with
    their UTC day, spend and category, as a temp table ``ev``."""
    sources = [str(events)] + [str(p) for p in feedback]
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE ev AS
        WITH all_events AS (
            SELECT * EXCLUDE (filename) FROM read_parquet({sources!r}, filename = true)
            QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY filename <> '{events}', filename) = 1
        )
        SELECT e.event_id, e.user_id, e.item_id, e.event_type,
               e.event_timestamp::TIMESTAMP AS ts,
               CAST(e.event_timestamp::TIMESTAMP AS DATE) AS day,
               coalesce(e.basket_id, e.user_id || '@' || CAST(e.event_timestamp AS VARCHAR)) AS basket,
               coalesce(e.quantity, 1.0) * coalesce(e.price, 0.0) AS spend,
               e.event_type = 'purchase' AS is_purchase,
               coalesce(i.category, i.department, '') AS category
        FROM all_events e
        LEFT JOIN read_parquet('{items}') i USING (item_id)
        """
    )


def _sliding_distinct(
    con: duckdb.DuckDBPyConnection, *, key: str, element: str, window: int, name: str, where: str
) -> None:
    """Temp table ``name(key, day, value)``: running count of distinct ``element`` in the last ``window``
    days, stepping at each delta day. Read it with an ASOF join on day."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {name} AS
        WITH seen AS (SELECT DISTINCT {key}, {element} AS el, day FROM ev WHERE {where}),
        nxt AS (
            SELECT {key}, el, day, lead(day) OVER (PARTITION BY {key}, el ORDER BY day) AS next_day FROM seen
        ),
        deltas AS (
            SELECT {key}, day, 1 AS d FROM nxt
            UNION ALL
            SELECT {key}, least(coalesce(next_day, day + {window}), day + {window}) AS day, -1 AS d FROM nxt
        ),
        per_day AS (SELECT {key}, day, sum(d) AS d FROM deltas GROUP BY ALL)
        SELECT {key}, day, sum(d) OVER (PARTITION BY {key} ORDER BY day ROWS UNBOUNDED PRECEDING) AS value
        FROM per_day
        """
    )


def _write(con: duckdb.DuckDBPyConnection, name: str, query: str | list[str], path: Path) -> int:
    """Run ``query`` (or each of a list of queries, whose results are written one after the other as
    row groups of one file) and write it atomically in exactly the contract schema of table ``name``."""
    schema = feature_table_schema(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for part in [query] if isinstance(query, str) else query:
            table = con.execute(part).fetch_arrow_table()
            missing = set(schema.names) - set(table.column_names)
            if missing:
                raise RuntimeError(f"feature table {name}: query lacks column(s) {sorted(missing)}")
            writer.write_table(table.select(schema.names).cast(schema))
            rows += table.num_rows
    os.replace(tmp, path)
    return rows


HISTORY_LINES_PER_PART = 400_000  # purchase lines per user_history query: bounds its memory (snapshots x history)


def user_ranges(con: duckdb.DuckDBPyConnection, lines_per_part: int | None = None) -> list[tuple[str, str | None] | None]:
    """Contiguous ranges ``[lo, hi)`` of user ids, in user-id order, each holding about ``lines_per_part``
    staged lines (``[None]``: one part, the whole table). ``user_history`` is built range by range: it
    holds one snapshot per (user, active day) with up to ``history_length`` items, and built at once it
    ran out of memory at 5.8 M lines on a 24 GB machine."""
    lines_per_part = lines_per_part or HISTORY_LINES_PER_PART
    total = con.execute("SELECT count(*) FROM ev").fetchone()[0]
    parts = -(-total // lines_per_part)
    if parts <= 1:
        return [None]
    bounds = con.execute(f"""
        WITH u AS (SELECT user_id, count(*) AS n FROM ev GROUP BY ALL),
        c AS (SELECT user_id, sum(n) OVER (ORDER BY user_id) AS cum FROM u)
        SELECT min(user_id) FROM c GROUP BY CAST(floor((cum - 1) * {parts} / {total}) AS BIGINT) ORDER BY 1
    """).fetchall()
    starts = [b[0] for b in bounds]
    return [(lo, hi) for lo, hi in zip(starts, [*starts[1:], None], strict=True)]  # type: ignore[misc]


def _user_activity_sql(windows: tuple[int, ...]) -> str:
    w_max = max(windows)
    sums = ",\n".join(
        f"sum(purchases) OVER (PARTITION BY user_id ORDER BY b RANGE BETWEEN INTERVAL {w - 1} DAYS PRECEDING AND CURRENT ROW) AS purchases_{w}d,\n"
        f"sum(spend) OVER (PARTITION BY user_id ORDER BY b RANGE BETWEEN INTERVAL {w - 1} DAYS PRECEDING AND CURRENT ROW) AS spend_{w}d"
        for w in windows
    )
    shifts = " UNION ".join(f"SELECT user_id, day + {w} AS b FROM ud" for w in (0, *windows))
    return f"""
    WITH ud AS (
        SELECT user_id, day,
               count(*) FILTER (WHERE is_purchase) AS purchases,
               coalesce(sum(spend) FILTER (WHERE is_purchase), 0) AS spend,
               count(*) AS interactions,
               count(DISTINCT basket) FILTER (WHERE is_purchase) AS baskets,
               max(ts) FILTER (WHERE is_purchase) AS last_purchase
        FROM ev GROUP BY ALL
    ),
    horizon AS (SELECT max(day) AS last_day FROM ev),
    cal AS (
        SELECT DISTINCT c.user_id, c.b FROM ({shifts}) c, horizon WHERE c.b <= horizon.last_day
    ),
    filled AS (
        SELECT cal.user_id, cal.b,
               coalesce(ud.purchases, 0) AS purchases, coalesce(ud.spend, 0) AS spend,
               coalesce(ud.interactions, 0) AS interactions, coalesce(ud.baskets, 0) AS baskets,
               ud.last_purchase
        FROM cal LEFT JOIN ud ON ud.user_id = cal.user_id AND ud.day = cal.b
    ),
    win AS (
        SELECT user_id, b,
               {sums},
               sum(interactions) OVER (PARTITION BY user_id ORDER BY b RANGE BETWEEN INTERVAL 29 DAYS PRECEDING AND CURRENT ROW) AS interactions_30d,
               sum(baskets) OVER (PARTITION BY user_id ORDER BY b RANGE BETWEEN INTERVAL {w_max - 1} DAYS PRECEDING AND CURRENT ROW) AS baskets_{w_max}d,
               max(last_purchase) OVER (PARTITION BY user_id ORDER BY b ROWS UNBOUNDED PRECEDING) AS last_purchase
        FROM filled
    )
    SELECT w.user_id,
           CAST(w.b + 1 AS TIMESTAMPTZ) AS event_timestamp,
           CAST(w.b + 1 AS TIMESTAMPTZ) AS created_timestamp,
           {", ".join(f"CAST(w.purchases_{x}d AS BIGINT) AS purchases_{x}d, round(w.spend_{x}d, 4) AS spend_{x}d" for x in windows)},
           CAST(w.interactions_30d AS BIGINT) AS interactions_30d,
           CAST(coalesce(di.value, 0) AS BIGINT) AS distinct_items_{w_max}d,
           CAST(coalesce(dc.value, 0) AS BIGINT) AS distinct_categories_{w_max}d,
           CASE WHEN w.baskets_{w_max}d > 0 THEN round(w.purchases_{w_max}d / w.baskets_{w_max}d, 4) END AS avg_basket_size_{w_max}d,
           CASE WHEN w.last_purchase IS NOT NULL
                THEN round(epoch(CAST(w.b + 1 AS TIMESTAMP) - w.last_purchase) / 86400.0, 4) END AS days_since_last_purchase,
           CAST(epoch(w.last_purchase) AS BIGINT) AS last_purchase_ts
    FROM win w
    ASOF LEFT JOIN u_items di ON di.user_id = w.user_id AND w.b >= di.day
    ASOF LEFT JOIN u_cats dc ON dc.user_id = w.user_id AND w.b >= dc.day
    ORDER BY w.user_id, event_timestamp
    """


def _user_history_sql(n: int, users: tuple[str, str | None] | None = None) -> str:
    where = ""
    if users is not None:
        lo, hi = (str(u).replace("'", "''") if u is not None else None for u in users)
        where = f"WHERE user_id >= '{lo}'" + (f" AND user_id < '{hi}'" if hi is not None else "")
    return f"""
    WITH r AS (
        SELECT user_id, item_id, event_type, ts, day,
               row_number() OVER (PARTITION BY user_id ORDER BY ts, event_id) AS rn
        FROM ev {where}
    ),
    ends AS (SELECT user_id, day, max(rn) AS rn_end FROM r GROUP BY ALL),
    wanted AS (
        SELECT user_id, day, unnest(range(greatest(rn_end - {n} + 1, 1), rn_end + 1)) AS rn FROM ends
    )
    SELECT w.user_id,
           CAST(w.day + 1 AS TIMESTAMPTZ) AS event_timestamp,
           CAST(w.day + 1 AS TIMESTAMPTZ) AS created_timestamp,
           list(r.item_id ORDER BY r.rn DESC) AS history_item_ids,
           list(CAST(epoch(r.ts) AS BIGINT) ORDER BY r.rn DESC) AS history_ts,
           list(r.event_type ORDER BY r.rn DESC) AS history_types
    FROM wanted w JOIN r ON r.user_id = w.user_id AND r.rn = w.rn
    GROUP BY w.user_id, w.day
    ORDER BY w.user_id, event_timestamp
    """


def _user_profile_sql(users: Path) -> str:
    from recflow.schemas import USER_PROFILE_COLUMNS

    cols = ", ".join(USER_PROFILE_COLUMNS)
    return f"""
    SELECT user_id,
           CAST(date_trunc('day', first_seen::TIMESTAMP) + INTERVAL 1 DAY AS TIMESTAMPTZ) AS event_timestamp,
           CAST(date_trunc('day', first_seen::TIMESTAMP) + INTERVAL 1 DAY AS TIMESTAMPTZ) AS created_timestamp,
           {cols}
    FROM read_parquet('{users}')
    WHERE first_seen IS NOT NULL
    ORDER BY user_id
    """


def _item_popularity_sql() -> str:
    return """
    WITH idy AS (
        SELECT item_id, day,
               count(*) FILTER (WHERE is_purchase) AS purchases,
               count(*) AS interactions
        FROM ev GROUP BY ALL
    ),
    horizon AS (SELECT max(day) AS last_day FROM ev),
    cal AS (
        SELECT DISTINCT c.item_id, c.b
        FROM (SELECT item_id, day AS b FROM idy UNION SELECT item_id, day + 7 FROM idy
              UNION SELECT item_id, day + 30 FROM idy) c, horizon
        WHERE c.b <= horizon.last_day
    ),
    win AS (
        SELECT cal.item_id, cal.b,
               sum(coalesce(idy.purchases, 0)) OVER w7 AS purchases_7d,
               sum(coalesce(idy.purchases, 0)) OVER w30 AS purchases_30d,
               sum(coalesce(idy.interactions, 0)) OVER w30 AS interactions_30d
        FROM cal LEFT JOIN idy ON idy.item_id = cal.item_id AND idy.day = cal.b
        WINDOW w7 AS (PARTITION BY cal.item_id ORDER BY cal.b RANGE BETWEEN INTERVAL 6 DAYS PRECEDING AND CURRENT ROW),
               w30 AS (PARTITION BY cal.item_id ORDER BY cal.b RANGE BETWEEN INTERVAL 29 DAYS PRECEDING AND CURRENT ROW)
    )
    SELECT w.item_id,
           CAST(w.b + 1 AS TIMESTAMPTZ) AS event_timestamp,
           CAST(w.b + 1 AS TIMESTAMPTZ) AS created_timestamp,
           CAST(w.purchases_7d AS BIGINT) AS purchases_7d,
           CAST(w.purchases_30d AS BIGINT) AS purchases_30d,
           CAST(coalesce(bu.value, 0) AS BIGINT) AS buyers_30d,
           CAST(w.interactions_30d AS BIGINT) AS interactions_30d,
           -- weekly rate over the 30-day weekly rate: > 1 means rising (0 when nothing was bought)
           round(CASE WHEN w.purchases_30d > 0 THEN (w.purchases_7d / 7.0) / (w.purchases_30d / 30.0) ELSE 0 END, 4) AS trend
    FROM win w
    ASOF LEFT JOIN i_buyers bu ON bu.item_id = w.item_id AND w.b >= bu.day
    ORDER BY w.item_id, event_timestamp
    """


def _item_catalog_sql(items: Path) -> str:
    return f"""
    WITH start AS (SELECT min(ts) AS t0 FROM ev)
    SELECT i.item_id,
           -- valid from the first sale; items never sold are in the catalogue from the data's start
           CAST(date_trunc('day', coalesce(i.first_seen::TIMESTAMP, start.t0)) AS TIMESTAMPTZ) AS event_timestamp,
           CAST(date_trunc('day', coalesce(i.first_seen::TIMESTAMP, start.t0)) AS TIMESTAMPTZ) AS created_timestamp,
           i.title, i.text, i.category, i.department, i.brand, i.price
    FROM read_parquet('{items}') i, start
    ORDER BY i.item_id
    """


def history_cut_note(con: duckdb.DuckDBPyConnection, history_length: int) -> str | None:
    """A warning when users of the staged events have more lines than the online history keeps:
    the two-stage ranker learns from whole histories, so those users are served with features of
    their latest ``history_length`` lines only (training-serving skew). None when nobody is cut."""
    cut, users, longest = con.sql(
        f"SELECT count(*) FILTER (WHERE n > {int(history_length)}), count(*), coalesce(max(n), 0) "
        "FROM (SELECT user_id, count(*) AS n FROM ev GROUP BY user_id)").fetchone()
    if not cut:
        return None
    return (f"{cut:,} of {users:,} users ({cut / users:.1%}) have more than features.history_length="
            f"{history_length:,} lines (the longest: {longest:,}); the ranker learns from whole histories, so "
            "these users are served with features of their latest lines only. Raise features.history_length "
            f"to {longest:,} to serve them exactly.")


def build_feature_tables(settings: Settings) -> FeatureBuildReport:
    """Compute every feature table from the canonical tables and write them as parquet.

    Raises ``FileNotFoundError`` with the command to run when the canonical tables are missing.
    """
    paths = settings.paths
    for p in (paths.events, paths.items, paths.users):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: run `recflow ingest` (or `recflow features`) first.")
    cfg = settings.features
    if tuple(sorted(cfg.user_windows_days)) != (7, 30, 90):
        raise ValueError(
            f"features.user_windows_days={cfg.user_windows_days}: the feature store schema is defined for (7, 30, 90)."
        )
    report = FeatureBuildReport()
    started = time.perf_counter()
    con = connect()
    try:
        t = time.perf_counter()
        progress("features", 0, len(FEATURE_TABLES) + 1, "staging events")
        feedback = EventLog(paths.event_log)
        feedback.flush()  # journal rows become a segment, so accepted feedback is part of this build
        _stage_events(con, paths.events, paths.items, feedback.segments())
        w_max = max(cfg.user_windows_days)
        _sliding_distinct(con, key="user_id", element="item_id", window=w_max, name="u_items", where="is_purchase")
        _sliding_distinct(con, key="user_id", element="category", window=w_max, name="u_cats", where="is_purchase")
        _sliding_distinct(con, key="item_id", element="user_id", window=30, name="i_buyers", where="is_purchase")
        report.seconds["stage"] = time.perf_counter() - t
        note = history_cut_note(con, cfg.history_length)
        if note:
            report.warnings.append(note)
        queries = {
            "user_activity": _user_activity_sql(tuple(sorted(cfg.user_windows_days))),
            "user_history": [_user_history_sql(cfg.history_length, r) for r in user_ranges(con)],
            "user_profile": _user_profile_sql(paths.users),
            "item_popularity": _item_popularity_sql(),
            "item_catalog": _item_catalog_sql(paths.items),
        }
        assert set(queries) == set(FEATURE_TABLES)
        for i, (name, query) in enumerate(queries.items(), start=1):
            progress("features", i, len(FEATURE_TABLES) + 1, f"building {name}")
            t = time.perf_counter()
            path = paths.feature_table(name)
            report.tables[name] = _write(con, name, query, path)
            report.paths[name] = str(path)
            report.seconds[name] = time.perf_counter() - t
    finally:
        con.close()
    report.total_seconds = time.perf_counter() - started
    progress("features", len(FEATURE_TABLES) + 1, len(FEATURE_TABLES) + 1, "done")
    return report
