"""User-side feature computation shared by training and serving (numpy only, vectorised).

Everything the user tower and the repeat head read is computed here from the user features of the
Feast services (``user_history__history_item_ids/_ts``, ``user_activity__*``, ``user_profile__*``),
so that training (a batch of rows from ``training_v1``) and serving (one row from ``serving_v1``)
run the same code on the same inputs.

Per (user, unique history item) features, with ``t_ref`` = the user's most recent history
timestamp (so nothing depends on the wall clock) and ``gap`` =
``user_activity__days_since_last_purchase``:

- log1p(count), and log1p of time-decayed counts with half-lives ``half_lives_days``;
- log1p(days since the item's last / first purchase, from ``t_ref``);
- share of the user's baskets containing the item; whether it was bought at least twice;
- log1p(mean inter-purchase interval) and log1p of how "due" it is, (age_last + gap) / interval;
- recency rank among the user's items (0 = most recent) / number of unique items;
- user level: log1p(number of baskets), log1p(history span in days), log1p(gap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DAY = 86400.0


@dataclass
class HistoryBatch:
    """Unique history items of a batch of users in CSR form (rows sorted by item index)."""

    offsets: np.ndarray  # [B + 1] int64 into items/feats
    items: np.ndarray  # [U] int64 catalogue positions
    feats: np.ndarray  # [U, F] float32
    n_lines: np.ndarray  # [B] history lines used (known items only)
    n_unique: np.ndarray  # [B]
    n_baskets: np.ndarray  # [B]

    @property
    def batch_size(self) -> int:
        return len(self.offsets) - 1

    def take(self, rows: np.ndarray) -> HistoryBatch:
        """The users ``rows`` of this batch (vectorised CSR gather)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lens = ends - starts
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        idx = np.repeat(starts - off[:-1], lens) + np.arange(off[-1])
        return HistoryBatch(off, self.items[idx], self.feats[idx], self.n_lines[rows], self.n_unique[rows], self.n_baskets[rows])

    def padded(self, max_items: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense ``items [B, H]`` (-1 = padding), ``feats [B, H, F]``, ``mask [B, H]``.

        With ``max_items`` a user keeps its ``max_items`` most recent items (recency rank order).
        """
        counts = np.diff(self.offsets)
        b = self.batch_size
        row = np.repeat(np.arange(b), counts)
        pos = np.arange(len(self.items)) - np.repeat(self.offsets[:-1], counts)
        keep = np.ones(len(self.items), dtype=bool)
        if max_items is not None and counts.size and counts.max() > max_items:
            # recency rank is feature column -4 scaled by n_unique; recompute exact ranks
            rank = np.rint(self.feats[:, -4] * np.repeat(np.maximum(counts, 1), counts)).astype(np.int64)
            keep = rank < max_items
            row, rank = row[keep], rank[keep]
            order = np.lexsort((rank, row))
            row = row[order]
            idx = np.flatnonzero(keep)[order]
            c2 = np.bincount(row, minlength=b)
            pos = np.arange(len(idx)) - np.repeat(np.concatenate([[0], np.cumsum(c2)[:-1]]), c2)
        else:
            idx = np.arange(len(self.items))
        h = int(pos.max()) + 1 if len(pos) else 1
        items = np.full((b, h), -1, dtype=np.int64)
        feats = np.zeros((b, h, self.feats.shape[1]), dtype=np.float32)
        mask = np.zeros((b, h), dtype=bool)
        items[row, pos] = self.items[idx]
        feats[row, pos] = self.feats[idx]
        mask[row, pos] = True
        return items, feats, mask


def history_features(
    offsets: np.ndarray,
    items: np.ndarray,
    ts: np.ndarray,
    gap_days: np.ndarray,
    *,
    history_length: int,
    half_lives_days: Sequence[float],
) -> HistoryBatch:
    """Repeat/recency features of every (user, unique history item) pair of a batch.

    ``offsets`` [B+1] delimit each user's history lines in ``items`` (catalogue positions, < 0 for
    items the model does not know) and ``ts`` (epoch seconds), most recent first, as Feast stores
    them. Only the first ``history_length`` lines of each user are used. ``gap_days`` [B] is
    ``days_since_last_purchase`` (NaN when unknown, read as 0).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.float64)
    b = len(offsets) - 1
    gap = np.nan_to_num(np.asarray(gap_days, dtype=np.float64), nan=0.0).clip(0, None)
    counts = np.diff(offsets)
    row = np.repeat(np.arange(b), counts)
    pos = np.arange(len(items)) - np.repeat(offsets[:-1], counts)
    keep = (pos < history_length) & (items >= 0)
    row, items, ts = row[keep], items[keep], ts[keep]
    n_lines = np.bincount(row, minlength=b)
    k = len(half_lives_days)
    n_feat = 11 + k
    if len(items) == 0:
        z = np.zeros(b, dtype=np.int64)
        return HistoryBatch(np.zeros(b + 1, np.int64), np.zeros(0, np.int64), np.zeros((0, n_feat), np.float32), z, z, z)
    t_ref = np.full(b, -np.inf)
    np.maximum.at(t_ref, row, ts)
    age = (t_ref[row] - ts) / DAY
    # baskets = distinct timestamps per user
    bkey = np.unique(row.astype(np.int64) * (1 << 33) + ts.astype(np.int64))
    n_baskets = np.bincount((bkey >> 33).astype(np.int64), minlength=b)
    span = np.zeros(b)
    t_min = np.full(b, np.inf)
    np.minimum.at(t_min, row, ts)
    has = n_lines > 0
    span[has] = (t_ref[has] - t_min[has]) / DAY

    m = int(items.max()) + 1
    key = row.astype(np.int64) * m + items
    order = np.argsort(key, kind="stable")
    key_s, age_s = key[order], age[order]
    starts = np.flatnonzero(np.concatenate([[True], key_s[1:] != key_s[:-1]]))
    ukey = key_s[starts]
    inv = np.cumsum(np.concatenate([[False], key_s[1:] != key_s[:-1]]))
    urow, uitem = ukey // m, ukey % m
    cnt = np.bincount(inv).astype(np.float64)
    age_last = np.minimum.reduceat(age_s, starts)
    age_first = np.maximum.reduceat(age_s, starts)
    decays = [np.bincount(inv, weights=np.exp2(-age_s / h)) for h in half_lives_days]
    n_unique = np.bincount(urow, minlength=b)
    rep = cnt >= 2
    interval = np.where(rep, (age_first - age_last) / np.maximum(cnt - 1, 1), 0.0)
    due = np.where(rep & (interval > 0), (age_last + gap[urow]) / np.maximum(interval, 1e-3), 0.0)
    # recency rank within user: sort by (row, age_last, item)
    rorder = np.lexsort((uitem, age_last, urow))
    rank = np.empty(len(ukey), dtype=np.float64)
    first = np.concatenate([[0], np.cumsum(n_unique)[:-1]])
    rank[rorder] = np.arange(len(ukey)) - np.repeat(first, n_unique)

    feats = np.empty((len(ukey), n_feat), dtype=np.float32)
    feats[:, 0] = np.log1p(cnt)
    for j, d in enumerate(decays):
        feats[:, 1 + j] = np.log1p(d)
    feats[:, k + 1] = np.log1p(age_last)
    feats[:, k + 2] = np.log1p(age_first)
    feats[:, k + 3] = cnt / np.maximum(n_baskets[urow], 1)
    feats[:, k + 4] = rep
    feats[:, k + 5] = np.log1p(interval)
    feats[:, k + 6] = np.log1p(np.clip(due, 0, 20))
    feats[:, k + 7] = rank / np.maximum(n_unique[urow], 1)
    feats[:, k + 8] = np.log1p(n_baskets[urow])
    feats[:, k + 9] = np.log1p(span[urow])
    feats[:, k + 10] = np.log1p(gap[urow])
    out_offsets = np.concatenate([[0], np.cumsum(n_unique)]).astype(np.int64)
    return HistoryBatch(out_offsets, uitem.astype(np.int64), feats, n_lines, n_unique, n_baskets)


def user_dense(activity: np.ndarray, hist: HistoryBatch) -> np.ndarray:
    """Raw dense user features ``[B, A + 4]``: log1p(activity) (NaN -> 0), a missing flag, and
    log1p of history lines, unique items and baskets. The model standardises them."""
    act = np.asarray(activity, dtype=np.float64)
    missing = np.isnan(act).all(axis=1, keepdims=True)
    act = np.log1p(np.nan_to_num(act, nan=0.0).clip(0, None))
    extra = np.log1p(np.stack([hist.n_lines, hist.n_unique, hist.n_baskets], axis=1).astype(np.float64))
    return np.concatenate([act, missing, extra], axis=1).astype(np.float32)


def popularity_transform(pop: np.ndarray) -> np.ndarray:
    """Raw item popularity ``[N, P]`` (counts and trend, NaN = unknown) to log1p space."""
    return np.log1p(np.nan_to_num(np.asarray(pop, dtype=np.float64), nan=0.0).clip(0, 1e9)).astype(np.float32)


def encode_profile(rows: Sequence[Sequence[Any]], vocab: Mapping[str, Sequence[str]], names: Sequence[str]) -> np.ndarray:
    """Profile bands to indices ``[B, P]``: 0 = missing, 1 = unseen in training, 2+ = vocabulary."""
    lookups = [{v: i + 2 for i, v in enumerate(vocab.get(n, []))} for n in names]
    out = np.zeros((len(rows), len(names)), dtype=np.int64)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
                continue
            out[i, j] = lookups[j].get(str(v), 1)
    return out


def get_feature(features: Mapping[str, Any], view: str, name: str) -> Any:
    """One feature from a Feast dict, with or without the ``view__`` prefix; lists of one row unwrapped."""
    for key in (f"{view}__{name}", name, f"{view}:{name}"):
        if key in features:
            value = features[key]
            break
    else:
        return None
    if name.startswith("history_"):
        # to_dict() of one entity row gives [[...]]; a plain row gives [...]
        if isinstance(value, list | tuple) and len(value) == 1 and isinstance(value[0], list | tuple | np.ndarray):
            value = value[0]
        if value is not None and isinstance(value, np.ndarray):
            value = value.tolist()
        return value
    if isinstance(value, list | tuple | np.ndarray):
        value = value[0] if len(value) else None
    return value
