"""Purchase logs: the one input every ranker feature is computed from.

A :class:`PurchaseLog` is a set of timestamped purchase lines ``(user, item, ts)`` with integer
codes, sorted by ``(user, ts)``. Offline it comes from the canonical events (all users, cut at an
as-of time); online it comes from one user's ``user_history`` row (item ids, epoch-second
timestamps and event types, which a push appends to exactly; :func:`history_lines`). A shopping
trip is one user's purchases on one UTC day, so the online history (which carries no basket ids)
gives the same trips as the event log. Views and carts ride along as :class:`Engagement`.
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


ENGAGEMENT_KINDS: dict[str, int] = {"view": 1, "cart": 2}  # the non-purchase events a log keeps beside its purchases


def history_lines(features: Mapping[str, Any], engagement: bool = False
                  ) -> tuple[list[str], list[int], list[str]] | None:
    """A user's online ``user_history`` row as the ranker reads it (item ids, epoch seconds and event
    types, most recent first): the purchases, and with ``engagement`` (a ranker that reads views and
    carts) those too; other entries are left out, as training reads the event log
    (:meth:`PurchaseLog.from_events`). None when the row holds no purchase (the ranker needs one), or
    is malformed (ids and times of unequal length)."""
    from recflow.modeling.features import get_feature
    from recflow.schemas import history_types

    ids = get_feature(features, "user_history", "history_item_ids") or []
    stamps = get_feature(features, "user_history", "history_ts") or []
    if not ids or len(ids) != len(stamps):
        return None
    kinds = history_types(list(ids), get_feature(features, "user_history", "history_types"))
    wanted = {"purchase", *ENGAGEMENT_KINDS} if engagement else {"purchase"}
    keep = [n for n, kind in enumerate(kinds) if kind in wanted]
    if "purchase" not in {kinds[n] for n in keep}:
        return None
    return [str(ids[n]) for n in keep], [int(stamps[n]) for n in keep], [kinds[n] for n in keep]


def purchase_history(features: Mapping[str, Any]) -> tuple[list[str], list[int]] | None:
    """The purchases of a user's online ``user_history`` row (item ids and epoch seconds, most recent
    first; :func:`history_lines` without engagement)."""
    lines = history_lines(features)
    return None if lines is None else (lines[0], lines[1])


@dataclass(frozen=True)
class Engagement:
    """Views and carts ``(user, item, ts, kind)`` sorted by ``(user, ts)``, with the user codes of the
    :class:`PurchaseLog` they belong to (``kind``: :data:`ENGAGEMENT_KINDS`)."""

    user: np.ndarray  # [E] int64
    item: np.ndarray  # [E] int64 catalogue position
    ts: np.ndarray  # [E] int64 epoch seconds
    kind: np.ndarray  # [E] int8

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def build(cls, user: np.ndarray, item: np.ndarray, ts: np.ndarray, kind: np.ndarray) -> Engagement:
        """Lines from unsorted arrays; unknown items (position < 0) and users (code < 0) are left out."""
        user, item, ts = (np.asarray(a, dtype=np.int64) for a in (user, item, ts))
        kind = np.asarray(kind, dtype=np.int8)
        keep = (item >= 0) & (user >= 0)
        user, item, ts, kind = user[keep], item[keep], ts[keep], kind[keep]
        order = np.lexsort((item, ts, user))
        return cls(user[order], item[order], ts[order], kind[order])

    def select(self, mask: np.ndarray) -> Engagement:
        return Engagement(self.user[mask], self.item[mask], self.ts[mask], self.kind[mask])


@dataclass(frozen=True)
class PurchaseLog:
    """Purchase lines sorted by ``(user, ts)``; ``user`` indexes ``user_ids``, ``item`` the catalogue."""

    user: np.ndarray  # [L] int64
    item: np.ndarray  # [L] int64 catalogue position
    ts: np.ndarray  # [L] int64 epoch seconds
    user_ids: np.ndarray  # [U] str
    n_items: int
    # the users' views and carts (None: a log of purchases only, e.g. events without an event type)
    engaged: Engagement | None = None

    def __len__(self) -> int:
        return len(self.user)

    @property
    def has_engagement(self) -> bool:
        """Whether the log holds any view or cart."""
        return self.engaged is not None and len(self.engaged) > 0

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @classmethod
    def build(cls, user: np.ndarray, item: np.ndarray, ts: np.ndarray, user_ids: np.ndarray, n_items: int,
              engaged: Engagement | None = None) -> PurchaseLog:
        """A log from unsorted arrays; lines with an unknown item (position < 0) are left out."""
        user, item, ts = (np.asarray(a, dtype=np.int64) for a in (user, item, ts))
        keep = item >= 0
        user, item, ts = user[keep], item[keep], ts[keep]
        order = np.lexsort((item, ts, user))
        return cls(user[order], item[order], ts[order], np.asarray(user_ids).astype(str), int(n_items), engaged)

    @classmethod
    def from_events(cls, events: pd.DataFrame, item_index: pd.Index, user_ids: Sequence[str] | None = None) -> PurchaseLog:
        """The purchase lines of canonical ``events`` (``event_type`` purchase, when the column exists),
        with the same users' views and carts as :attr:`engaged`.

        ``item_index`` maps item ids to catalogue positions; ``user_ids`` fixes the user codes (users
        not in it are dropped), by default every purchasing user in sorted order.
        """
        typed = "event_type" in events.columns
        ev = events[events["event_type"] == "purchase"] if typed else events
        uid = ev["user_id"].astype(str).to_numpy()
        users = np.asarray(sorted(set(uid)) if user_ids is None else list(user_ids), dtype=object).astype(str)
        index = pd.Index(users)
        u = index.get_indexer(uid)
        i = item_index.get_indexer(pd.Index(ev["item_id"].astype(str).to_numpy()))
        t = epoch_seconds(ev["event_timestamp"])
        ok = u >= 0
        engaged = None
        if typed:
            en = events[events["event_type"].isin(list(ENGAGEMENT_KINDS))]
            engaged = Engagement.build(index.get_indexer(en["user_id"].astype(str).to_numpy()),
                                       item_index.get_indexer(pd.Index(en["item_id"].astype(str).to_numpy())),
                                       epoch_seconds(en["event_timestamp"]),
                                       en["event_type"].map(ENGAGEMENT_KINDS).to_numpy(np.int8))
        return cls.build(u[ok], i[ok], t[ok], users, len(item_index), engaged)

    @classmethod
    def from_histories(
        cls, histories: Sequence[tuple[Sequence[str], Sequence[int]]], item_index: pd.Index, user_ids: Sequence[str] | None = None,
        types: Sequence[Sequence[str] | None] | None = None,
    ) -> PurchaseLog:
        """A log from online ``user_history`` rows: one ``(item_ids, epoch_seconds)`` pair per user, and
        with ``types`` each entry's event type (a user's None: purchases only); the views and carts
        become :attr:`engaged`, other types are left out."""
        lens = np.array([len(h[0]) for h in histories], dtype=np.int64)
        if any(len(h[0]) != len(h[1]) for h in histories):
            raise ValueError("user_history: history_item_ids and history_ts have different lengths")
        ids = [str(x) for h in histories for x in h[0]]
        ts = np.array([int(x) for h in histories for x in h[1]], dtype=np.int64)
        user = np.repeat(np.arange(len(histories), dtype=np.int64), lens)
        item = item_index.get_indexer(pd.Index(ids, dtype=object)) if ids else np.zeros(0, np.int64)
        users = np.asarray(user_ids if user_ids is not None else [str(n) for n in range(len(histories))]).astype(str)
        if types is None:
            return cls.build(user, item, ts, users, len(item_index))
        if any(t is not None and len(t) != len(h[0]) for h, t in zip(histories, types, strict=True)):
            raise ValueError("user_history: history_types and history_item_ids have different lengths")
        kinds = [str(k) for h, t in zip(histories, types, strict=True) for k in (t if t is not None else ["purchase"] * len(h[0]))]
        code = np.array([ENGAGEMENT_KINDS.get(k, 0) for k in kinds], np.int8)
        bought = np.array([k == "purchase" for k in kinds], bool)
        eng = code > 0
        return cls.build(user[bought], item[bought], ts[bought], users, len(item_index),
                         Engagement.build(user[eng], item[eng], ts[eng], code[eng]))

    def select(self, mask: np.ndarray, engaged: Engagement | None = None) -> PurchaseLog:
        """The purchase lines of ``mask``, with ``engaged`` (default: this log's, unchanged)."""
        return PurchaseLog(self.user[mask], self.item[mask], self.ts[mask], self.user_ids, self.n_items,
                           self.engaged if engaged is None else engaged)

    def before(self, as_of: int) -> PurchaseLog:
        """Lines strictly before ``as_of`` (epoch seconds): what is known at that time (views and carts too)."""
        e = self.engaged
        return self.select(self.ts < as_of, None if e is None else e.select(e.ts < as_of))

    def window(self, start: int, end: int) -> PurchaseLog:
        """Lines in ``[start, end)`` (views and carts too)."""
        e = self.engaged
        return self.select((self.ts >= start) & (self.ts < end), None if e is None else e.select((e.ts >= start) & (e.ts < end)))

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
        e = self.engaged
        engaged = None if e is None else Engagement.build(new[e.user] if len(e) else e.user, e.item, e.ts, e.kind)
        return PurchaseLog.build(code[keep], self.item[keep], self.ts[keep], ids, self.n_items, engaged)

    def offsets(self) -> np.ndarray:
        """CSR offsets ``[U + 1]`` of each user's lines."""
        return np.searchsorted(self.user, np.arange(self.n_users + 1)).astype(np.int64)
