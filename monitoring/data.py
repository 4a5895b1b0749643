"""Frames for monitoring: served requests, feedback, features, prediction descriptors, relevance.

Everything here is vectorised (Arrow / pandas / duckdb); nothing runs at import time.

- :func:`load_request_log` / :func:`load_events` read the parquet logs for a time window. A
  request-log file that cannot be read is set aside (renamed ``<name>.corrupt``, logged) and the
  monitor carries on with the others.
- :func:`flatten_features` turns the request log's ``features`` JSON into one column per feature.
- :func:`prediction_descriptors` summarises each served list (scores, category mix, popularity).
- :func:`relevance_frame` joins each user's first list with their later purchases (long format, the
  input of Evidently's ranking metrics).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recflow.schemas import EVENTS_SCHEMA, REQUEST_LOG_SCHEMA
from recflow.timeutil import to_utc

# Columns that identify something rather than describe it: never drift-tested.
ID_COLUMNS: frozenset[str] = frozenset(
    {"request_id", "user_id", "item_id", "event_id", "basket_id", "household_key", "product_id", "model_version"}
)
MISSING = "(missing)"
CORRUPT_SUFFIX = ".corrupt"
log = logging.getLogger("recflow.monitoring")
REQUIRED_LOG_COLUMNS: tuple[str, ...] = ("user_id", "ts", "features", "item_ids", "scores")


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if p.is_file())
    return []


def _read_window(files: Sequence[Path], ts_column: str, start: pd.Timestamp, end: pd.Timestamp,
                 where: str = "") -> pa.Table:
    """Rows of ``files`` with ``start <= ts_column < end`` (duckdb, union by column name)."""
    import duckdb

    con = duckdb.connect()
    try:
        con.execute("SET TimeZone='UTC'")
        query = (
            f"SELECT * FROM read_parquet($files, union_by_name=true) "
            f"WHERE {ts_column} >= $start AND {ts_column} < $end {where}"
        )
        params = {"files": [str(f) for f in files], "start": start.to_pydatetime(), "end": end.to_pydatetime()}
        relation = con.sql(query, params=params)
        to_arrow = getattr(relation, "to_arrow_table", None) or relation.arrow  # renamed in duckdb 2.0
        return to_arrow()
    finally:
        con.close()


def set_aside(path: Path, error: BaseException) -> Path:
    """Rename an unreadable log file to ``<name>.corrupt`` (out of every later read) and log it."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    path.replace(target)
    log.error("request-log file %s is unreadable (%s: %s); set aside as %s: inspect or delete it",
              path, type(error).__name__, str(error)[:200], target.name)
    return target


def _readable(files: Sequence[Path]) -> list[Path]:
    """``files`` whose whole content parquet can read; the others are set aside."""
    import pyarrow.parquet as pq

    good = []
    for f in files:
        try:
            pq.read_table(f)
        except (OSError, pa.ArrowException) as exc:
            set_aside(f, exc)
        else:
            good.append(f)
    return good


def _has_column(path: Path, column: str) -> bool:
    """Whether the parquet file ``path`` has ``column`` (False for a file that cannot be read)."""
    try:
        return column in pq.read_schema(path).names
    except (OSError, ValueError):
        return False


def load_request_log(path: Path, start: datetime | str, end: datetime | str,
                     endpoints: Iterable[str] | None = ("recommend",), *, arms_only: bool = False) -> pd.DataFrame:
    """Request-log rows with ``start <= ts < end`` from every parquet file under ``path`` (``arms_only``:
    only rows answered while a canary ran, those with an ``arm``).

    Returns an empty frame with the request-log columns when there are no files or no rows.
    """
    import duckdb

    empty = REQUEST_LOG_SCHEMA.empty_table().to_pandas()
    files = _parquet_files(Path(path))
    if arms_only:
        files = [f for f in files if _has_column(f, "arm")]
    if not files:
        return empty
    where = "AND arm IS NOT NULL" if arms_only else ""
    try:
        table = _read_window(files, "ts", to_utc(start), to_utc(end), where=where)
    except duckdb.Error:  # a damaged file: find it, set it aside, read the rest
        files = _readable(files)
        if not files:
            return empty
        table = _read_window(files, "ts", to_utc(start), to_utc(end), where=where)
    df = table.to_pandas()
    if endpoints is not None and "endpoint" in df.columns:
        df = df[df["endpoint"].isin(list(endpoints))]
    return df.reset_index(drop=True)


def load_events(paths: Iterable[Path], start: datetime | str, end: datetime | str,
                event_types: Sequence[str] = ("purchase",)) -> pd.DataFrame:
    """Canonical events with ``start <= event_timestamp < end`` and a type in ``event_types``.

    ``paths`` are parquet files or folders (the feedback event log, the canonical events file);
    missing paths are skipped. Rows are de-duplicated by ``event_id``.
    """
    columns = ["event_id", "user_id", "item_id", "event_type", "event_timestamp"]
    frames = []
    types = ", ".join("'" + t.replace("'", "''") + "'" for t in event_types)
    for path in paths:
        files = _parquet_files(Path(path))
        if files:
            table = _read_window(files, "event_timestamp", to_utc(start), to_utc(end),
                                 where=f"AND event_type IN ({types})")
            frames.append(table.select(columns).to_pandas())
    if not frames:
        return EVENTS_SCHEMA.empty_table().select(columns).to_pandas()
    out = pd.concat(frames, ignore_index=True).drop_duplicates("event_id")
    return out.reset_index(drop=True)


def check_log_frame(df: pd.DataFrame, *, name: str) -> None:
    """Raise ``ValueError`` naming the missing columns when ``df`` is not request-log shaped."""
    missing = [c for c in REQUIRED_LOG_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{name}: missing column(s) {missing}. Pass a request-log-shaped frame "
            f"(recflow.schemas.REQUEST_LOG_SCHEMA: at least {list(REQUIRED_LOG_COLUMNS)})."
        )


def log_problems(df: pd.DataFrame, *, name: str) -> list[str]:
    """Expectations on a request-log frame; returns one readable line per violated expectation.

    Checks: unique ``request_id``; ``item_ids`` and ``scores`` of equal length; scores non-increasing
    within a list (list order is taken as the served rank); no duplicate item within a list; no
    empty list; ``features`` present.
    """
    problems: list[str] = []
    n = len(df)
    if n == 0:
        return problems
    if "request_id" in df and df["request_id"].duplicated().any():
        problems.append(f"{name}: {int(df['request_id'].duplicated().sum())} duplicated request_id(s)")
    items = pa.array(df["item_ids"].tolist(), type=pa.list_(pa.string()))
    lengths = pc.fill_null(pc.list_value_length(items), 0).to_numpy()
    if (lengths == 0).any():
        problems.append(f"{name}: {int((lengths == 0).sum())} of {n} requests served an empty list")
    long = explode_lists(df)
    if len(long):
        if long.duplicated(["row", "item_id"]).any():
            rows = long.loc[long.duplicated(["row", "item_id"]), "row"].nunique()
            problems.append(f"{name}: {rows} request(s) list the same item twice")
        scored = long.dropna(subset=["score"])
        n_scores = scored.groupby("row").size().reindex(range(n), fill_value=0).to_numpy()
        mismatch = int(((n_scores != lengths) & (n_scores > 0)).sum())
        if mismatch:
            problems.append(f"{name}: {mismatch} request(s) with len(scores) != len(item_ids)")
        if (n_scores == 0).all():
            problems.append(f"{name}: no scores logged; score descriptors cannot be monitored")
        rising = scored.groupby("row")["score"].diff() > 1e-6
        if rising.any():
            problems.append(f"{name}: {scored.loc[rising, 'row'].nunique()} request(s) with scores not in "
                            "descending order (list order is taken as the served rank)")
    if df["features"].isna().all():
        problems.append(f"{name}: no features logged; feature drift cannot be monitored")
    return problems


def sample_rows(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """``df`` unchanged when it has at most ``cap`` rows, else a uniform sample of ``cap`` rows."""
    return df if len(df) <= cap else df.sample(n=cap, random_state=seed).sort_index()


# --- features ----------------------------------------------------------------------------------

def is_id_column(name: str) -> bool:
    """True for identifier-like or timestamp-like columns, which are never drift-tested."""
    return name in ID_COLUMNS or name.endswith(("_id", "_ids", "_key", "_ts")) or name in {"ts", "event_timestamp"}


def flatten_features(features: pd.Series) -> pd.DataFrame:
    """One column per key of the request log's ``features`` JSON objects (index kept).

    Nested objects become ``a.b`` columns (``pd.json_normalize``); null or empty strings give
    all-null rows; already-parsed dicts are accepted too. Raises ``ValueError`` with the offending row when a value is not a JSON object.
    """
    if features.empty:
        return pd.DataFrame(index=features.index)
    if features.map(lambda v: isinstance(v, dict)).any():  # already parsed (e.g. built in memory)
        flat = pd.json_normalize([v if isinstance(v, dict) else {} for v in features])
        flat.index = features.index
        return flat
    texts = features.where(features.notna() & (features.astype(str).str.len() > 0), "{}")
    try:
        parsed = json.loads("[" + ",".join(texts.astype(str)) + "]")
    except json.JSONDecodeError as exc:
        bad = next(i for i, t in texts.items() if not _is_json(t))
        raise ValueError(
            f"features: row {bad!r} is not valid JSON ({str(texts[bad])[:80]!r}); serving must write "
            "a JSON object {feature_name: value} per request."
        ) from exc
    if not all(isinstance(p, dict) for p in parsed):
        bad = texts.index[next(i for i, p in enumerate(parsed) if not isinstance(p, dict))]
        raise ValueError(f"features: row {bad!r} is not a JSON object ({str(texts[bad])[:80]!r}).")
    if len(parsed) != len(texts):
        raise ValueError("features: some rows hold several JSON values; write one JSON object per request.")
    flat = pd.json_normalize(parsed)
    flat.index = features.index
    return flat


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def split_feature_columns(flat: pd.DataFrame, *, max_categories: int = 100) -> tuple[list[str], list[str], dict[str, str]]:
    """Split flattened features into (numerical, categorical, skipped->reason).

    Skipped: id/timestamp-like names, list values, all-null columns, and string columns with more
    than ``max_categories`` distinct values (they behave like ids).
    """
    numerical: list[str] = []
    categorical: list[str] = []
    skipped: dict[str, str] = {}
    for col in flat.columns:
        series = flat[col]
        non_null = series.dropna()
        head = non_null.head(1000)
        if is_id_column(str(col)):
            skipped[col] = "identifier or timestamp"
        elif non_null.empty:
            skipped[col] = "always null"
        elif head.map(lambda v: isinstance(v, list | dict | np.ndarray)).any():
            skipped[col] = "list or object values"
        elif pd.api.types.is_bool_dtype(series) or head.map(type).eq(bool).all():
            categorical.append(col)
        elif pd.api.types.is_numeric_dtype(series):
            numerical.append(col)
        elif non_null.nunique() > max_categories:
            skipped[col] = f"{non_null.nunique()} distinct values (id-like)"
        else:
            categorical.append(col)
    return numerical, categorical, skipped


def feature_frames(reference: pd.DataFrame, current: pd.DataFrame,
                   lifetime: Iterable[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Flattened served features of both sides, restricted to drift-testable common columns; the
    ``lifetime`` accumulators (``monitoring.lifetime_features``) are skipped, since they grow with
    time whatever shoppers do.

    Returns ``(ref, cur, info)`` with ``info = {numerical, categorical, skipped, only_reference,
    only_current, null_share}``. Categorical columns are cast to ``str`` with nulls as the category
    ``"(missing)"`` (so a change in missing profiles counts as drift); numerical nulls stay NaN
    (Evidently ignores them) and their share per side is in ``info["null_share"]``.
    """
    ref = flatten_features(reference["features"]) if "features" in reference else pd.DataFrame(index=reference.index)
    cur = flatten_features(current["features"]) if "features" in current else pd.DataFrame(index=current.index)
    common = [c for c in ref.columns if c in set(cur.columns)]
    only_ref = sorted(set(ref.columns) - set(common))
    only_cur = sorted(set(cur.columns) - set(common))
    both = pd.concat([ref[common], cur[common]], ignore_index=True)
    numerical, categorical, skipped = split_feature_columns(both)
    for col in set(lifetime) & set(numerical + categorical):
        skipped[col] = "lifetime accumulator: grows as time passes (monitoring.lifetime_features)"
        (numerical if col in numerical else categorical).remove(col)
    for col in list(numerical + categorical):  # a column null on one side cannot be tested
        if ref[col].isna().all() or cur[col].isna().all():
            skipped[col] = "always null on one side"
            (numerical if col in numerical else categorical).remove(col)
    cols = numerical + categorical
    ref, cur = ref[cols].copy(), cur[cols].copy()
    null_share = {c: {"reference": float(ref[c].isna().mean()), "current": float(cur[c].isna().mean())}
                  for c in cols if ref[c].isna().any() or cur[c].isna().any()}
    for frame in (ref, cur):
        for col in numerical:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
        for col in categorical:
            frame[col] = frame[col].astype(str).where(frame[col].notna(), MISSING)
    info = {"numerical": numerical, "categorical": categorical, "skipped": skipped,
            "only_reference": only_ref, "only_current": only_cur, "null_share": null_share}
    return ref, cur, info


# --- predictions -------------------------------------------------------------------------------

def explode_lists(log: pd.DataFrame) -> pd.DataFrame:
    """Long frame ``row, rank (1-based), item_id, score`` from the ``item_ids``/``scores`` lists.

    ``row`` is the positional index of the request in ``log``. Scores are NaN when the request
    has no or a shorter ``scores`` list.
    """
    items = pa.array(log["item_ids"].tolist(), type=pa.list_(pa.string()))
    flat_items = pc.list_flatten(items)
    parents = pc.list_parent_indices(items).to_numpy()
    offsets = items.offsets.to_numpy()
    ranks = np.arange(len(flat_items)) - (offsets[parents] - offsets[0]) + 1
    out = pd.DataFrame({"row": parents, "rank": ranks.astype(np.int64), "item_id": flat_items.to_numpy(zero_copy_only=False)})
    scores_col = log["scores"] if "scores" in log else pd.Series([None] * len(log))
    scores = pa.array(scores_col.tolist(), type=pa.list_(pa.float64()))
    s_flat = pc.list_flatten(scores).to_numpy(zero_copy_only=False)
    s_parents = pc.list_parent_indices(scores).to_numpy()
    s_offsets = scores.offsets.to_numpy()
    s_ranks = np.arange(len(s_flat)) - (s_offsets[s_parents] - s_offsets[0]) + 1
    score_df = pd.DataFrame({"row": s_parents, "rank": s_ranks.astype(np.int64), "score": s_flat})
    return out.merge(score_df, on=["row", "rank"], how="left")


def _slug(value: object) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", str(value)).strip("_").lower() or "unknown"


def mix_groups(reference_long: pd.DataFrame, items: pd.DataFrame | None, level: str, top_n: int) -> list[str]:
    """The ``top_n`` most recommended values of ``items[level]`` in the reference lists."""
    if items is None or level not in items.columns or reference_long.empty:
        return []
    lookup = items.drop_duplicates("item_id").set_index("item_id")[level]
    groups = reference_long["item_id"].map(lookup).dropna()
    return [str(g) for g in groups.value_counts().head(top_n).index]


def prediction_descriptors(log: pd.DataFrame, *, item_popularity: pd.Series | None = None,
                           items: pd.DataFrame | None = None, level: str = "department",
                           groups: Sequence[str] = ()) -> pd.DataFrame:
    """One row per request describing what was served (index = ``log``'s index).

    Columns: ``top1_score``, ``mean_score``, ``min_score``, ``list_length``;
    ``mean_log_popularity`` = mean of ``log1p(item_popularity[item])`` over the list (unknown items
    count as 0; only with ``item_popularity``); with ``items``: ``top1_<level>`` (categorical) and
    ``share_<level>__<group>`` = share of the list in each of ``groups`` plus ``..._other``.
    """
    long = explode_lists(log)
    n = len(log)
    grouped = long.groupby("row")
    out = pd.DataFrame(index=pd.RangeIndex(n))
    out["top1_score"] = long.loc[long["rank"] == 1].set_index("row")["score"]
    out["mean_score"] = grouped["score"].mean()
    out["min_score"] = grouped["score"].min()
    out["list_length"] = grouped.size().reindex(out.index, fill_value=0).astype(float)
    if item_popularity is not None:
        pop = pd.to_numeric(item_popularity, errors="coerce").clip(lower=0)
        pop.index = pop.index.astype(str)
        long["log_pop"] = np.log1p(long["item_id"].map(pop).fillna(0.0).to_numpy(dtype=float))
        out["mean_log_popularity"] = long.groupby("row")["log_pop"].mean()
    if items is not None and level in items.columns:
        lookup = items.drop_duplicates("item_id").set_index("item_id")[level]
        long["group"] = long["item_id"].map(lookup).astype(object)
        top1 = long.loc[long["rank"] == 1].set_index("row")["group"]
        top1 = top1.reindex(out.index)
        out[f"top1_{level}"] = top1.astype(str).where(top1.notna(), None)
        names = long["group"].astype(str)
        bucket = names.where(names.isin(list(groups)), "other")
        counts = pd.crosstab(long["row"], bucket)
        shares = counts.div(counts.sum(axis=1), axis=0)
        for g in [*groups, "other"]:
            col = f"share_{level}__{_slug(g)}"
            out[col] = shares[g].reindex(out.index).fillna(0.0) if g in shares else 0.0
    out.index = log.index
    return out


# --- relevance ---------------------------------------------------------------------------------

def first_request_per_user(log: pd.DataFrame) -> pd.DataFrame:
    """The earliest request of each user (ties broken by ``request_id``), rows without a user dropped."""
    df = log[log["user_id"].notna()]
    order = ["user_id", "ts"] + (["request_id"] if "request_id" in df.columns else [])
    return df.sort_values(order, kind="stable").drop_duplicates("user_id", keep="first")


def relevance_frame(log: pd.DataFrame, purchases: pd.DataFrame, *, horizon: pd.Timedelta,
                    until: pd.Timestamp | None = None) -> pd.DataFrame:
    """Long ranking frame ``user_id, item_id, rank, target, recommended`` for Evidently's recsys metrics.

    One served list per user (their first request in ``log``). ``target`` = 1 when the user bought
    the item in ``[ts, ts + horizon)`` (capped at ``until``), else 0. Items bought but not
    recommended are added with ``rank = longest list + 1`` so that recall and ideal DCG count them.
    """
    first = first_request_per_user(log).reset_index(drop=True)
    long = explode_lists(first)
    long["user_id"] = first["user_id"].to_numpy()[long["row"].to_numpy()] if len(long) else []
    long = long.drop_duplicates(["user_id", "item_id"], keep="first")[["user_id", "item_id", "rank"]]
    starts = first[["user_id", "ts"]].rename(columns={"ts": "req_ts"})
    starts["req_ts"] = pd.to_datetime(starts["req_ts"], utc=True)
    buys = purchases[["user_id", "item_id", "event_timestamp"]].merge(starts, on="user_id", how="inner")
    ts = pd.to_datetime(buys["event_timestamp"], utc=True)
    stop = buys["req_ts"] + horizon
    if until is not None:
        stop = stop.clip(upper=until)
    relevant = buys.loc[(ts >= buys["req_ts"]) & (ts < stop), ["user_id", "item_id"]].drop_duplicates()
    relevant["target"] = 1
    out = long.merge(relevant, on=["user_id", "item_id"], how="outer")
    out["target"] = out["target"].fillna(0).astype(np.int64)
    out["recommended"] = out["rank"].notna()
    unseen_rank = int(long["rank"].max()) + 1 if len(long) else 1
    out["rank"] = out["rank"].fillna(unseen_rank).astype(np.int64)
    return out.sort_values(["user_id", "rank"], kind="stable").reset_index(drop=True)


def item_popularity_from(purchases: pd.DataFrame) -> pd.Series:
    """Distinct buyers per item (the popularity yardstick for novelty and popularity bias)."""
    if purchases.empty:
        return pd.Series(dtype=float, name="buyers")
    return purchases.groupby("item_id")["user_id"].nunique().astype(float).rename("buyers")
