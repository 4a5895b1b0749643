"""Data preparation: temporal split, weekly training examples, catalogue, popularity grid.

Inputs are plain tables (pandas / pyarrow) that a flow builds: canonical events and items, the
``item_popularity`` feature table, and the training set returned by Feast for an entity frame
made here (:func:`entity_frame`). No Feast here: ``training/`` runs where Feast is not installed.

Time layout (``cutoff`` at midnight UTC, ``eval_days`` = 7 by default)::

    ... train week -2 | train week -1 | cutoff | validation week | test week |
    anchors: cutoff - 7k            cutoff          cutoff + 7

A training example is one (user, anchor): the user's features as of the anchor (point in time,
from Feast) and, as targets, the distinct items the user bought in [anchor, anchor + 7 days).
Validation and test use the same construction at the two evaluation anchors, so training and
evaluation ask the same question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recflow.modeling.config import ACTIVITY_FEATURES, POPULARITY_FEATURES, PROFILE_FEATURES
from recflow.timeutil import to_utc  # noqa: F401 - re-exported: training modules import it from here

DAY_S = 86400


def epoch_us(values: pd.Series | pd.DatetimeIndex | np.ndarray) -> np.ndarray:
    """UTC timestamps as int64 microseconds since the epoch (any input resolution)."""
    idx = pd.DatetimeIndex(pd.to_datetime(values, utc=True))
    return idx.as_unit("us").asi8.astype(np.int64)


def default_cutoff(events: pd.DataFrame, eval_days: int = 7) -> pd.Timestamp:
    """Midnight UTC of (last event day + 1 - 2 * eval_days): room for a validation and a test week."""
    last = to_utc(events["event_timestamp"].max()).normalize()
    return last + pd.Timedelta(days=1) - pd.Timedelta(days=2 * eval_days)


def split_anchors(cutoff: pd.Timestamp, train_weeks: int, eval_days: int = 7) -> tuple[list[pd.Timestamp], pd.Timestamp, pd.Timestamp]:
    """Training anchors (oldest first), the validation anchor (= cutoff) and the test anchor."""
    cutoff = to_utc(cutoff)
    step = pd.Timedelta(days=eval_days)
    train = [cutoff - step * w for w in range(train_weeks, 0, -1)]
    return train, cutoff, cutoff + step


def purchases(events: pd.DataFrame) -> pd.DataFrame:
    """Purchase events only, with ``ts`` in epoch seconds."""
    ev = events
    if "event_type" in ev.columns:
        ev = ev[ev["event_type"] == "purchase"]
    out = ev[["user_id", "item_id", "event_timestamp"]].copy()
    out["event_timestamp"] = pd.to_datetime(out["event_timestamp"], utc=True)
    out["ts"] = epoch_us(out["event_timestamp"]) // 10**6
    if "basket_id" in ev.columns:
        out["basket_id"] = ev["basket_id"].to_numpy()
    return out


def week_purchases(events: pd.DataFrame, anchors: list[pd.Timestamp], eval_days: int = 7) -> pd.DataFrame:
    """Distinct ``(anchor_idx, user_id, item_id)`` bought in ``[anchor, anchor + eval_days)`` for every anchor."""
    ev = purchases(events)
    frames = []
    for a_idx, a in enumerate(anchors):
        a = to_utc(a)
        w = ev[(ev["event_timestamp"] >= a) & (ev["event_timestamp"] < a + pd.Timedelta(days=eval_days))]
        f = w.sort_values("event_timestamp", kind="stable")[["user_id", "item_id"]].drop_duplicates()
        frames.append(f.assign(anchor_idx=a_idx))
    if not frames:
        return pd.DataFrame({"anchor_idx": [], "user_id": [], "item_id": []})
    out = pd.concat(frames, ignore_index=True)
    out["user_id"] = out["user_id"].astype(str)
    out["item_id"] = out["item_id"].astype(str)
    return out[["anchor_idx", "user_id", "item_id"]]


def entity_frame(events: pd.DataFrame, anchors: list[pd.Timestamp], eval_days: int = 7) -> pd.DataFrame:
    """Feast entity rows, one per (user, anchor) where the user bought something in the following
    ``eval_days``: ``(user_id, item_id, event_timestamp=anchor)``. ``item_id`` is the first item bought
    that week (the builder needs one); the full target set comes from :func:`week_purchases`."""
    wp = week_purchases(events, anchors, eval_days)
    first = wp.drop_duplicates(["anchor_idx", "user_id"])
    ts = pd.DatetimeIndex([to_utc(a) for a in anchors])
    return pd.DataFrame(
        {"user_id": first["user_id"].to_numpy(), "item_id": first["item_id"].to_numpy(),
         "event_timestamp": ts[first["anchor_idx"].to_numpy()]}
    )


@dataclass
class Catalogue:
    """Every item that can be ranked: the items table, in a fixed order."""

    item_ids: np.ndarray  # [N] str
    texts: list[str]
    first_seen: np.ndarray  # [N] int64 epoch seconds, or int64 max when unknown
    index: pd.Index = field(repr=False)

    @classmethod
    def from_items(cls, items: pd.DataFrame) -> Catalogue:
        if items["item_id"].duplicated().any():
            raise ValueError("items: duplicate item_id values")
        ids = items["item_id"].astype(str).to_numpy()
        text = items["text"] if "text" in items.columns else items.get("title")
        texts = ["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in text.tolist()]
        fs = pd.to_datetime(items["first_seen"], utc=True) if "first_seen" in items.columns else pd.Series(pd.NaT, index=items.index)
        first = np.full(len(ids), np.iinfo(np.int64).max, dtype=np.int64)
        ok = fs.notna().to_numpy()
        first[ok] = epoch_us(fs[ok]) // 10**6
        return cls(ids, texts, first, pd.Index(ids))

    def __len__(self) -> int:
        return len(self.item_ids)

    def positions(self, ids: np.ndarray | pd.Series | list[str]) -> np.ndarray:
        """Catalogue positions of ``ids`` (-1 for unknown ones)."""
        return self.index.get_indexer(pd.Index(np.asarray(ids, dtype=object).astype(str)))


def popularity_grid(table: pd.DataFrame, catalogue: Catalogue, anchors: list[pd.Timestamp]) -> np.ndarray:
    """Raw item popularity ``[A, N, P]`` as of each anchor: the latest ``item_popularity`` row with
    ``event_timestamp <= anchor`` (Feast's point-in-time rule; NaN when there is none)."""
    pos = catalogue.positions(table["item_id"].to_numpy())
    ts = epoch_us(table["event_timestamp"])
    vals = table[list(POPULARITY_FEATURES)].to_numpy(dtype=np.float32)
    keep = pos >= 0
    pos, ts, vals = pos[keep], ts[keep], vals[keep]
    order = np.lexsort((ts, pos))
    pos, ts, vals = pos[order], ts[order], vals[order]
    grid = np.full((len(anchors), len(catalogue), len(POPULARITY_FEATURES)), np.nan, dtype=np.float32)
    for a, anchor in enumerate(anchors):
        t = to_utc(anchor).value // 1000
        ok = ts <= t
        p, v = pos[ok], vals[ok]
        # rows are sorted by (item, ts): the last row of each item is its latest value
        last = np.flatnonzero(np.concatenate([p[1:] != p[:-1], [True]])) if len(p) else np.zeros(0, int)
        grid[a, p[last]] = v[last]
    return grid


@dataclass
class UserRows:
    """One row per (user, anchor): point-in-time user features and the week's target items."""

    user_ids: np.ndarray  # [R] str
    anchor: np.ndarray  # [R] int64 index into the anchor list
    hist_offsets: np.ndarray  # [R + 1] int64
    hist_items: np.ndarray  # [L] int64 catalogue positions (-1 = unknown item)
    hist_ts: np.ndarray  # [L] int64 epoch seconds
    activity: np.ndarray  # [R, A] float64 (NaN = missing)
    profile: list[list[str | None]]  # [R][P]
    target_offsets: np.ndarray  # [R + 1]
    targets: np.ndarray  # [T] int64 catalogue positions

    def __len__(self) -> int:
        return len(self.user_ids)

    def select(self, rows: np.ndarray) -> UserRows:
        """The rows ``rows`` (vectorised CSR gather)."""
        ho, hi = _csr_take(self.hist_offsets, rows)
        to, ti = _csr_take(self.target_offsets, rows)
        return UserRows(
            self.user_ids[rows], self.anchor[rows], ho, self.hist_items[hi], self.hist_ts[hi],
            self.activity[rows], [self.profile[r] for r in rows], to, self.targets[ti],
        )


def _csr_take(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts, ends = offsets[rows], offsets[rows + 1]
    lens = ends - starts
    new_off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    idx = np.repeat(starts - new_off[:-1], lens) + np.arange(new_off[-1])
    return new_off, idx


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, pa.Array]:
    col = table.column(name).combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty table
        col = pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], type=col.type)
    col = col.fill_null(pa.scalar([], type=col.type))
    offsets = col.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    return offsets, col.flatten()


def user_rows(
    training_set: pd.DataFrame | pa.Table,
    catalogue: Catalogue,
    anchors: list[pd.Timestamp],
    targets: pd.DataFrame | None = None,
) -> UserRows:
    """:class:`UserRows` from a Feast training set (rows of :func:`entity_frame` with their features).

    ``targets`` (from :func:`week_purchases`) gives each example's target items; without it the
    training set's own ``item_id`` rows are the targets. Rows whose ``event_timestamp`` is not one of
    ``anchors`` are rejected with a clear error.
    """
    table = training_set if isinstance(training_set, pa.Table) else pa.Table.from_pandas(training_set, preserve_index=False)
    ts = epoch_us(table.column("event_timestamp").to_pandas())
    keys = pd.DataFrame(
        {
            "user_id": table.column("user_id").to_pandas().astype(str).to_numpy(),
            "item_id": table.column("item_id").to_pandas().astype(str).to_numpy(),
        }
    )
    # The last anchor ("end") may equal the test anchor when no test week exists: first match wins.
    anchor_us = pd.Index(epoch_us(pd.DatetimeIndex([to_utc(a) for a in anchors])))
    a_idx = anchor_us.drop_duplicates(keep="first").get_indexer(ts)
    if (a_idx < 0).any():
        bad = pd.Timestamp(int(ts[a_idx < 0][0]), unit="us", tz="UTC")
        raise ValueError(f"training set: event_timestamp {bad} is not one of the {len(anchors)} anchors")
    keys["a"] = a_idx
    keys["row"] = np.arange(len(keys))
    keys = keys.sort_values(["a", "user_id", "row"], kind="stable")
    first = ~keys.duplicated(["a", "user_id"])
    head = keys[first]
    group = np.cumsum(first.to_numpy()) - 1  # example id of every sorted row
    if targets is not None:
        ex = pd.DataFrame({"anchor_idx": head["a"].to_numpy(), "user_id": head["user_id"].to_numpy(),
                           "ex": np.arange(len(head))})
        tg = targets.merge(ex, on=["anchor_idx", "user_id"], how="inner").sort_values("ex", kind="stable")
        group = tg["ex"].to_numpy()
        t_pos = catalogue.positions(tg["item_id"].to_numpy())
    else:
        t_pos = catalogue.positions(keys["item_id"].to_numpy())
    ok = t_pos >= 0
    t_counts = np.bincount(group[ok], minlength=len(head))
    target_offsets = np.concatenate([[0], np.cumsum(t_counts)]).astype(np.int64)
    targets = t_pos[ok].astype(np.int64)

    take = pa.array(head["row"].to_numpy())
    sub = table.take(take)
    h_off, h_ids = _list_column(sub, "user_history__history_item_ids")
    t_off, h_ts = _list_column(sub, "user_history__history_ts")
    if not np.array_equal(h_off, t_off):
        raise ValueError("training set: history_item_ids and history_ts have different lengths")
    id_index = pa.array(catalogue.item_ids.astype(str))
    hist_items = pc.index_in(h_ids.cast(pa.string()), value_set=id_index).fill_null(-1).to_numpy().astype(np.int64)
    hist_ts = h_ts.cast(pa.int64()).fill_null(0).to_numpy().astype(np.int64)
    act_cols = [f"user_activity__{n}" for n in ACTIVITY_FEATURES]
    activity = np.stack(
        [sub.column(c).to_pandas().astype("float64").to_numpy() if c in sub.column_names else np.full(len(head), np.nan) for c in act_cols],
        axis=1,
    ) if len(head) else np.zeros((0, len(act_cols)))
    prof_cols = [sub.column(f"user_profile__{n}").to_pylist() if f"user_profile__{n}" in sub.column_names else [None] * len(head) for n in PROFILE_FEATURES]
    profile = [list(r) for r in zip(*prof_cols, strict=True)] if len(head) else []
    return UserRows(
        head["user_id"].to_numpy().astype(str), head["a"].to_numpy().astype(np.int64), h_off, hist_items, hist_ts,
        activity, profile, target_offsets, targets,
    )


def seen_before(events: pd.DataFrame, catalogue: Catalogue, user_ids: np.ndarray, anchor: pd.Timestamp) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(offsets, positions)``: the distinct items each user bought before ``anchor``."""
    ev = purchases(events)
    ev = ev[ev["event_timestamp"] < to_utc(anchor)]
    u_index = pd.Index(np.asarray(user_ids).astype(str))
    u = u_index.get_indexer(ev["user_id"].astype(str).to_numpy())
    p = catalogue.positions(ev["item_id"].to_numpy())
    ok = (u >= 0) & (p >= 0)
    pairs = np.unique(u[ok].astype(np.int64) * len(catalogue) + p[ok])
    rows, items = pairs // len(catalogue), pairs % len(catalogue)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(u_index)))]).astype(np.int64)
    return offsets, items.astype(np.int64)


def profile_vocabulary(profile: list[list[str | None]], names: tuple[str, ...] = PROFILE_FEATURES) -> dict[str, list[str]]:
    """Sorted distinct non-null values of each profile feature."""
    vocab: dict[str, list[str]] = {}
    for j, n in enumerate(names):
        vocab[n] = sorted({str(r[j]) for r in profile if r[j] not in (None, "")})
    return vocab
