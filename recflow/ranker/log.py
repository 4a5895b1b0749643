"""Purchase logs: the one input every ranker feature is computed from.

A :class:`PurchaseLog` is a set of timestamped purchase lines ``(user, item, ts)`` with integer
codes, sorted by ``(user, ts)``. Offline it comes from the canonical events (all users, cut at an
as-of time); online it comes from the purchases of one user's ``user_history`` row (item ids,
epoch-second timestamps and event types, which a push appends to exactly; :func:`purchase_history`). A shopping trip is one user's purchases on one UTC
day, so the online history (which carries no basket ids) gives the same trips as the event log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

DAY_S = 86400


def epoch_seconds(values: pd.Series | pd.DatetimeIndex | np.ndarray) -> np.ndarray:
    """UTC timestamps as int64 seconds since the epoch (any input resolution; naive = UTC)."""
    idx = pd.DatetimeIndex(pd.to_datetime(values, utc=True))
    return (idx.as_unit("us").asi8 // 10**6).astype(np.int64)


def purchase_history(features: Mapping[str, Any]) -> tuple[list[str], list[int]] | None:
    """The purchases of a user's online ``user_history`` row (item ids and epoch seconds, most recent
    first): what the ranker reads in the service and the monitor, as training reads the event log's
    purchase lines (:meth:`PurchaseLog.from_events`); the row's views and carts are left out. None
    when it holds no purchase, or is malformed (ids and times of unequal length)."""
    from recflow.modeling.features import get_feature
    from recflow.schemas import history_types

    ids = get_feature(features, "user_history", "history_item_ids") or []
    stamps = get_feature(features, "user_history", "history_ts") or []
    if not ids or len(ids) != len(stamps):
        return None
    kinds = history_types(list(ids), get_feature(features, "user_history", "history_types"))
    keep = [n for n, kind in enumerate(kinds) if kind == "purchase"]
    if not keep:
        return None
    return [str(ids[n]) for n in keep], [int(stamps[n]) for n in keep]


@dataclass(frozen=True)
class PurchaseLog:
    """Purchase lines sorted by ``(user, ts)``; ``user`` indexes ``user_ids``, ``item`` the catalogue."""

    user: np.ndarray  # [L] int64
    item: np.ndarray  # [L] int64 catalogue position
    ts: np.ndarray  # [L] int64 epoch seconds
    user_ids: np.ndarray  # [U] str
    n_items: int

    def __len__(self) -> int:
        return len(self.user)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @classmethod
    def build(cls, user: np.ndarray, item: np.ndarray, ts: np.ndarray, user_ids: np.ndarray, n_items: int) -> PurchaseLog:
        """A log from unsorted arrays; lines with an unknown item (position < 0) are left out."""
        user, item, ts = (np.asarray(a, dtype=np.int64) for a in (user, item, ts))
        keep = item >= 0
        user, item, ts = user[keep], item[keep], ts[keep]
        order = np.lexsort((item, ts, user))
        return cls(user[order], item[order], ts[order], np.asarray(user_ids).astype(str), int(n_items))

    @classmethod
    def from_events(cls, events: pd.DataFrame, item_index: pd.Index, user_ids: Sequence[str] | None = None) -> PurchaseLog:
        """The purchase lines of canonical ``events`` (``event_type`` purchase, when the column exists).

        ``item_index`` maps item ids to catalogue positions; ``user_ids`` fixes the user codes (users
        not in it are dropped), by default every purchasing user in sorted order.
        """
        ev = events[events["event_type"] == "purchase"] if "event_type" in events.columns else events
        uid = ev["user_id"].astype(str).to_numpy()
        users = np.asarray(sorted(set(uid)) if user_ids is None else list(user_ids), dtype=object).astype(str)
        u = pd.Index(users).get_indexer(uid)
        i = item_index.get_indexer(pd.Index(ev["item_id"].astype(str).to_numpy()))
        t = epoch_seconds(ev["event_timestamp"])
        ok = u >= 0
        return cls.build(u[ok], i[ok], t[ok], users, len(item_index))

    @classmethod
    def from_histories(
        cls, histories: Sequence[tuple[Sequence[str], Sequence[int]]], item_index: pd.Index, user_ids: Sequence[str] | None = None
    ) -> PurchaseLog:
        """A log from online ``user_history`` rows: one ``(item_ids, epoch_seconds)`` pair per user."""
        lens = np.array([len(h[0]) for h in histories], dtype=np.int64)
        if any(len(h[0]) != len(h[1]) for h in histories):
            raise ValueError("user_history: history_item_ids and history_ts have different lengths")
        ids = [str(x) for h in histories for x in h[0]]
        ts = np.array([int(x) for h in histories for x in h[1]], dtype=np.int64)
        user = np.repeat(np.arange(len(histories), dtype=np.int64), lens)
        item = item_index.get_indexer(pd.Index(ids, dtype=object)) if ids else np.zeros(0, np.int64)
        users = np.asarray(user_ids if user_ids is not None else [str(n) for n in range(len(histories))]).astype(str)
        return cls.build(user, item, ts, users, len(item_index))

    def select(self, mask: np.ndarray) -> PurchaseLog:
        return PurchaseLog(self.user[mask], self.item[mask], self.ts[mask], self.user_ids, self.n_items)

    def before(self, as_of: int) -> PurchaseLog:
        """Lines strictly before ``as_of`` (epoch seconds): what is known at that time."""
        return self.select(self.ts < as_of)

    def window(self, start: int, end: int) -> PurchaseLog:
        """Lines in ``[start, end)``."""
        return self.select((self.ts >= start) & (self.ts < end))

    def recent(self, n_lines: int) -> PurchaseLog:
        """Each user's ``n_lines`` most recent lines (the online history keeps the same ones)."""
        if len(self) == 0:
            return self
        ends = np.searchsorted(self.user, self.user, side="right")
        return self.select((ends - np.arange(len(self))) <= n_lines)

    def for_users(self, user_ids: Sequence[str]) -> PurchaseLog:
        """The lines of ``user_ids``, re-coded so that user ``k`` is ``user_ids[k]``."""
        ids = np.asarray(list(user_ids), dtype=object).astype(str)
        new = pd.Index(ids).get_indexer(self.user_ids)
        code = new[self.user] if len(self) else np.zeros(0, np.int64)
        keep = code >= 0
        return PurchaseLog.build(code[keep], self.item[keep], self.ts[keep], ids, self.n_items)

    def offsets(self) -> np.ndarray:
        """CSR offsets ``[U + 1]`` of each user's lines."""
        return np.searchsorted(self.user, np.arange(self.n_users + 1)).astype(np.int64)
