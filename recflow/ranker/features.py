"""Ranker features: one function of (purchase lines, item statistics, as-of time), online and offline.

Every value here is a pure function of the lines strictly before ``as_of`` and of ``as_of``
itself, so the same call gives the same number in training (weekly anchors), evaluation (each
test week's start) and serving (the user's pushed history at request time). Nothing is a fixed
window that a push can only add to: recency enters as ages and exponentially decayed counts
evaluated at ``as_of``.

- :func:`item_stats`: per-item statistics over every user's lines (popularity windows, trend,
  re-buy rate, median re-buy gap, age, the popularity of the item's text group and category).
- :func:`user_item_stats`: per (user, item) re-buy statistics (counts, decayed counts at several
  half-lives, purchase occasions, first/last purchase, mean and std of the re-buy gap).
- :func:`engagement_stats`: per (user, item) views and carts (counts, decayed views, last times), for
  shops whose events hold them; :data:`ENGAGEMENT_FEATURES` are read only by a ranker trained on such a shop.
- :func:`pair_features`: the ranker's feature matrix for candidate pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recflow.ranker.log import DAY_S, Engagement, PurchaseLog

HALF_LIVES_DAYS: tuple[float, ...] = (7.0, 30.0, 90.0, 365.0)
TRIP_DECAYS: tuple[float, ...] = (0.9, 0.7)  # per-trip decay of the trip-decayed counts (TIFU's within-user decay)
RECENT_TRIPS: tuple[int, ...] = (3, 10)
HAZARD_DAYS = 7  # the horizon of the re-buy hazards: the week a recommendation is for
HAZARD_PRIOR = 2.0  # pseudo-gaps of the item's hazard in the user's shrunk hazard
ITEM_HAZARD_SMOOTHING = (0.1, 1.0)  # (re-buys, gaps) added to an item's pooled counts: an item without gaps gets 0.1
HAZARD_FEATURES: tuple[str, ...] = ("ui_hazard_7d", "ui_gaps_open", "ui_hazard_7d_shrunk", "item_hazard_7d", "item_gaps_open")
_GAP_KEY = 2**20  # group * _GAP_KEY + gap (days): a sortable (pair or item, gap) key
ITEM_FEATURES: tuple[str, ...] = (
    "item_pop_7d", "item_pop_30d", "item_pop_90d", "item_pop_all", "item_buyers_all", "item_buyers_30d",
    "item_trend", "item_rebuy_rate", "item_gap_median_d", "item_age_d", "item_text_pop_30d", "item_cat_pop_30d",
)


_DAY_KEY = 2**33  # user * _DAY_KEY + day: a sortable (user, day) key


def _segments(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices of runs of equal ``keys`` (sorted) and the run id of every element."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.concatenate([[True], keys[1:] != keys[:-1]])
    return np.flatnonzero(new), np.cumsum(new) - 1


@dataclass
class UserItemStats:
    """Per (user, item) re-buy statistics, sorted by ``key = user * n_items + item``."""

    key: np.ndarray
    cnt: np.ndarray  # purchase lines
    occasions: np.ndarray  # distinct purchase days (shopping trips)
    first: np.ndarray  # epoch s
    last: np.ndarray
    gap_mean_d: np.ndarray  # days between purchase days; NaN with fewer than two
    gap_std_d: np.ndarray
    decayed: np.ndarray  # [P, len(half_lives)]
    trip_decayed: np.ndarray  # [P, len(TRIP_DECAYS)]: sum over the trips with the item of decay ** (trips since)
    recent_trips: np.ndarray  # [P, len(RECENT_TRIPS)]: how many of the user's last k trips hold the item
    trips_since_last: np.ndarray  # [P]: the user's trips after the last one with the item
    gap_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted row * _GAP_KEY + gap (days)

    def lookup(self, key: np.ndarray) -> np.ndarray:
        """Row of each ``key`` (-1 where the user never bought the item)."""
        pos = np.searchsorted(self.key, key)
        pos = np.minimum(pos, max(len(self.key) - 1, 0))
        ok = (len(self.key) > 0) & (self.key[pos] == key) if len(self.key) else np.zeros(len(key), bool)
        return np.where(ok, pos, -1)


def user_item_stats(log: PurchaseLog, as_of: int, half_lives: tuple[float, ...] = HALF_LIVES_DAYS) -> UserItemStats:
    """Re-buy statistics of every (user, item) pair in ``log`` as of ``as_of`` (lines after it are ignored)."""
    log = log.before(as_of)
    key = log.user * log.n_items + log.item
    order = np.lexsort((log.ts, key))
    key, ts = key[order], log.ts[order]
    starts, run = _segments(key)
    n = len(starts)
    cnt = np.diff(np.append(starts, len(key))).astype(np.float64)
    first = ts[starts] if n else np.zeros(0, np.int64)
    last = np.maximum.reduceat(ts, starts) if n else np.zeros(0, np.int64)
    day = ts // DAY_S
    d = np.diff(day, prepend=day[:1]) if len(day) else day
    new_occ = np.ones(len(ts), bool)
    new_occ[1:] = (d[1:] > 0) | (run[1:] != run[:-1])
    occasions = np.bincount(run, weights=new_occ, minlength=n)
    is_gap = new_occ.copy()
    is_gap[starts] = False
    g = np.where(is_gap, d, 0).astype(np.float64)
    n_gap = np.bincount(run, weights=is_gap, minlength=n)
    s1 = np.bincount(run, weights=g, minlength=n)
    s2 = np.bincount(run, weights=g * g, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_gap > 0, s1 / np.maximum(n_gap, 1), np.nan)
        std = np.where(n_gap > 1, np.sqrt(np.maximum(s2 / np.maximum(n_gap, 1) - mean**2, 0.0)), np.nan)
    age = (as_of - ts) / DAY_S
    dec = np.stack([np.bincount(run, weights=np.exp2(-age / h), minlength=n) for h in half_lives], axis=1) if n else np.zeros((0, len(half_lives)))
    # trip recency: a trip is one user's purchases on one UTC day; ``from_end`` counts the user's trips after it
    user = key // max(log.n_items, 1)
    trips = np.unique(user * _DAY_KEY + day)
    user_end = np.searchsorted(trips // _DAY_KEY, user, side="right")
    from_end = (user_end - 1 - np.searchsorted(trips, user * _DAY_KEY + day)).astype(np.float64)
    occ_w = new_occ.astype(np.float64)
    tdec = np.stack([np.bincount(run, weights=occ_w * r ** from_end, minlength=n) for r in TRIP_DECAYS], axis=1) if n else np.zeros((0, len(TRIP_DECAYS)))
    recent = np.stack([np.bincount(run, weights=occ_w * (from_end < k), minlength=n) for k in RECENT_TRIPS], axis=1) if n else np.zeros((0, len(RECENT_TRIPS)))
    since = np.minimum.reduceat(from_end, starts) if n else np.zeros(0)
    gap_keys = np.sort(run[is_gap].astype(np.int64) * _GAP_KEY + d[is_gap].astype(np.int64))
    return UserItemStats(key[starts] if n else key, cnt, occasions, first, last, mean, std, dec, tdec, recent, since,
                         gap_keys)


def gaps_from(gap_keys: np.ndarray, group: np.ndarray, days: np.ndarray, horizon: int = HAZARD_DAYS
              ) -> tuple[np.ndarray, np.ndarray]:
    """For each ``(group[k], days[k])``: how many of the group's gaps (``gap_keys``, sorted
    ``group * _GAP_KEY + gap``) are at least ``days``, and how many of those end within ``horizon``
    days (``days <= gap < days + horizon``): the empirical hazard's denominator and numerator."""
    g = np.asarray(group, np.int64) * _GAP_KEY
    d = np.asarray(days, np.int64)
    lo = np.searchsorted(gap_keys, g + d, "left")
    hi = np.searchsorted(gap_keys, g + d + horizon, "left")
    end = np.searchsorted(gap_keys, g + (_GAP_KEY - 1), "right")
    return (end - lo).astype(np.float64), (hi - lo).astype(np.float64)


@dataclass
class ItemStats:
    """Per-item statistics as of ``as_of`` over every user's lines: ``columns[name]`` is ``[N]`` float64."""

    as_of: int
    columns: dict[str, np.ndarray]
    # sorted item * _GAP_KEY + gap (days) over every user's re-buys: each item's pooled re-buy gaps
    gap_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def n_items(self) -> int:
        return len(next(iter(self.columns.values())))

    @property
    def sold(self) -> np.ndarray:
        """Items with at least one purchase before ``as_of`` (the others are cold)."""
        return self.columns["item_pop_all"] > 0

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, as_of: int, gap_keys: np.ndarray | None = None) -> ItemStats:
        missing = set(ITEM_FEATURES) - set(frame.columns)
        if missing:
            raise ValueError(f"item statistics: missing columns {sorted(missing)}")
        gaps = np.zeros(0, np.int64) if gap_keys is None else np.asarray(gap_keys, np.int64)
        return cls(int(as_of), {c: frame[c].to_numpy(dtype=np.float64) for c in ITEM_FEATURES}, gaps)


def _group_sum(values: np.ndarray, group: np.ndarray | None) -> np.ndarray:
    """Each item's value summed over the items of its group (``group`` -1 = no group: itself)."""
    if group is None:
        return values.copy()
    g = np.asarray(group, dtype=np.int64)
    ok = g >= 0
    tot = np.bincount(g[ok], weights=values[ok], minlength=int(g.max()) + 1 if ok.any() else 0)
    return np.where(ok, tot[np.maximum(g, 0)] if len(tot) else 0.0, values)


def item_stats(
    log: PurchaseLog, as_of: int, *, text_group: np.ndarray | None = None, category: np.ndarray | None = None,
    uis: UserItemStats | None = None,
) -> ItemStats:
    """Item statistics as of ``as_of`` from every user's lines before it.

    ``text_group`` (an item's unique-text row) and ``category`` (a category code, -1 unknown) give
    the popularity of the item's text group and category: the prior a cold item inherits.
    """
    log = log.before(as_of)
    n = log.n_items
    age = (as_of - log.ts) / DAY_S
    pop = {w: np.bincount(log.item[age < w], minlength=n).astype(np.float64) for w in (7, 30, 90)}
    pop_all = np.bincount(log.item, minlength=n).astype(np.float64)
    uis = uis if uis is not None else user_item_stats(log, as_of)
    ui_item = uis.key % n
    buyers = np.bincount(ui_item, minlength=n).astype(np.float64)
    buyers_30 = np.bincount(ui_item[(as_of - uis.last) / DAY_S < 30], minlength=n).astype(np.float64)
    repeaters = np.bincount(ui_item[uis.occasions >= 2], minlength=n).astype(np.float64)
    gaps = pd.Series(uis.gap_mean_d).groupby(ui_item).median()
    gap_median = np.full(n, np.nan)
    gap_median[gaps.index.to_numpy()] = gaps.to_numpy()
    first = np.full(n, np.iinfo(np.int64).max)
    if len(log):
        np.minimum.at(first, log.item, log.ts)
    with np.errstate(invalid="ignore", divide="ignore"):
        cols = {
            "item_pop_7d": pop[7],
            "item_pop_30d": pop[30],
            "item_pop_90d": pop[90],
            "item_pop_all": pop_all,
            "item_buyers_all": buyers,
            "item_buyers_30d": buyers_30,
            "item_trend": (pop[7] + 1.0) / (pop[30] * 7.0 / 30.0 + 1.0),
            "item_rebuy_rate": np.where(buyers > 0, repeaters / np.maximum(buyers, 1), np.nan),
            "item_gap_median_d": gap_median,
            "item_age_d": np.where(pop_all > 0, (as_of - first) / DAY_S, np.nan),
            "item_text_pop_30d": _group_sum(pop[30], text_group),
            "item_cat_pop_30d": _group_sum(pop[30], category),
        }
    item_gaps = np.sort(ui_item[uis.gap_keys // _GAP_KEY] * _GAP_KEY + uis.gap_keys % _GAP_KEY)
    return ItemStats(int(as_of), cols, item_gaps)


@dataclass
class UserStats:
    """Per-user summaries as of an as-of time, ``[U]`` each."""

    n_lines: np.ndarray
    n_baskets: np.ndarray
    first: np.ndarray
    last: np.ndarray
    n_items: np.ndarray
    baskets_30d: np.ndarray
    repeat_share: np.ndarray  # share of the user's (item, trip) purchases that re-bought an item (NaN: none)
    new_share_28d: np.ndarray  # share of the items bought in the last 28 days that were first bought then


def user_stats(log: PurchaseLog, as_of: int, uis: UserItemStats) -> UserStats:
    log = log.before(as_of)
    u = log.n_users
    n_lines = np.bincount(log.user, minlength=u).astype(np.float64)
    ub = np.unique(log.user * _DAY_KEY + log.ts // DAY_S)  # a shopping trip: one user's purchases on one UTC day
    b_user = ub // _DAY_KEY
    b_day = ub % _DAY_KEY
    n_baskets = np.bincount(b_user, minlength=u).astype(np.float64)
    baskets_30 = np.bincount(b_user[(as_of // DAY_S - b_day) < 30], minlength=u).astype(np.float64)
    first = np.full(u, np.nan)
    last = np.full(u, np.nan)
    off = log.offsets()
    has = np.diff(off) > 0
    first[has] = log.ts[off[:-1][has]]
    last[has] = log.ts[off[1:][has] - 1]
    pair_user = uis.key // log.n_items
    n_items = np.bincount(pair_user, minlength=u).astype(np.float64)
    occ = np.bincount(pair_user, weights=uis.occasions, minlength=u)
    rep = np.bincount(pair_user, weights=uis.occasions - 1, minlength=u)
    recent = np.bincount(pair_user, weights=(as_of - uis.last) < 28 * DAY_S, minlength=u)
    new_recent = np.bincount(pair_user, weights=(as_of - uis.first) < 28 * DAY_S, minlength=u)
    with np.errstate(invalid="ignore", divide="ignore"):
        repeat_share = np.where(occ > 0, rep / occ, np.nan)
        new_share = np.where(recent > 0, new_recent / recent, np.nan)
    return UserStats(n_lines, n_baskets, first, last, n_items, baskets_30, repeat_share, new_share)


def user_category_counts(log: PurchaseLog, as_of: int, category: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted ``(user * C + category)`` keys and line counts, or None without categories."""
    if category is None:
        return None
    log = log.before(as_of)
    c = np.asarray(category, dtype=np.int64)[log.item]
    n_c = int(np.max(category)) + 2
    key = log.user * n_c + (c + 1)
    k, cnt = np.unique(key, return_counts=True)
    return k, cnt.astype(np.float64)


ENGAGEMENT_HALF_LIFE_DAYS = 7.0
ENGAGEMENT_FEATURES: tuple[str, ...] = (
    "ue_views", "ue_view_dec_7d", "ue_days_since_view", "ue_carts", "ue_days_since_cart", "ue_after_buy",
)


@dataclass
class EngagementStats:
    """Per (user, item) views and carts before an as-of time, sorted by ``key = user * n_items + item``."""

    key: np.ndarray
    views: np.ndarray
    view_dec: np.ndarray  # views weighted 2^(-age / ENGAGEMENT_HALF_LIFE_DAYS)
    carts: np.ndarray
    last_view: np.ndarray  # epoch s; NaN without a view
    last_cart: np.ndarray  # NaN without a cart
    last: np.ndarray  # the later of the two

    def lookup(self, key: np.ndarray) -> np.ndarray:
        """Row of each ``key`` (-1 where the user neither viewed nor carted the item)."""
        if not len(self.key):
            return np.full(len(key), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.key, key), len(self.key) - 1)
        return np.where(self.key[pos] == key, pos, -1)


def engagement_stats(engaged: Engagement, n_items: int, as_of: int) -> EngagementStats:
    """The views and carts of every (user, item) pair before ``as_of``."""
    e = engaged.select(engaged.ts < as_of)
    key = e.user * n_items + e.item
    uniq, run = np.unique(key, return_inverse=True)
    n = len(uniq)
    view, cart = e.kind == 1, e.kind == 2
    age = (as_of - e.ts) / DAY_S

    def last_of(mask: np.ndarray) -> np.ndarray:
        out = np.full(n, -np.inf)
        np.maximum.at(out, run[mask], e.ts[mask].astype(np.float64))
        return np.where(np.isfinite(out), out, np.nan)

    last_view, last_cart = last_of(view), last_of(cart)
    return EngagementStats(uniq, np.bincount(run, weights=view, minlength=n),
                           np.bincount(run, weights=view * np.exp2(-age / ENGAGEMENT_HALF_LIFE_DAYS), minlength=n),
                           np.bincount(run, weights=cart, minlength=n), last_view, last_cart, np.fmax(last_view, last_cart))


def _engagement_features(ctx: Context, user: np.ndarray, item: np.ndarray) -> dict[str, np.ndarray]:
    """:data:`ENGAGEMENT_FEATURES` of the pairs: 0 counts and NaN times without views or carts."""
    p = len(user)
    if ctx.eng is None or not len(ctx.eng.key):
        zero, nan = np.zeros(p), np.full(p, np.nan)
        return {"ue_views": zero, "ue_view_dec_7d": zero, "ue_days_since_view": nan, "ue_carts": zero,
                "ue_days_since_cart": nan, "ue_after_buy": nan}
    e, t = ctx.eng, ctx.as_of
    r = e.lookup(user * ctx.log.n_items + item)
    has = r >= 0
    rr = np.maximum(r, 0)

    def col(values: np.ndarray, missing: float) -> np.ndarray:
        return np.where(has, values[rr], missing).astype(np.float64)

    b = ctx.uis.lookup(user * ctx.log.n_items + item)
    bought = b >= 0
    last_buy = ctx.uis.last[np.maximum(b, 0)] if len(ctx.uis.key) else np.zeros(p)
    with np.errstate(invalid="ignore"):
        after = np.where(has & bought, (col(e.last, np.nan) > last_buy).astype(np.float64), np.nan)
    return {"ue_views": col(e.views, 0.0), "ue_view_dec_7d": col(e.view_dec, 0.0),
            "ue_days_since_view": (t - col(e.last_view, np.nan)) / DAY_S, "ue_carts": col(e.carts, 0.0),
            "ue_days_since_cart": (t - col(e.last_cart, np.nan)) / DAY_S, "ue_after_buy": after}


@dataclass
class Context:
    """What :func:`pair_features` needs besides the candidate pairs: the as-of statistics of a log."""

    as_of: int
    log: PurchaseLog
    items: ItemStats
    uis: UserItemStats
    users: UserStats
    category: np.ndarray | None
    ucat: tuple[np.ndarray, np.ndarray] | None
    eng: EngagementStats | None = None  # the users' views and carts (None: a log without them)


def user_context(log: PurchaseLog, items: ItemStats, as_of: int, category: np.ndarray | None = None) -> Context:
    """The user-side statistics of ``log`` as of ``as_of``, with item statistics ``items`` (same or earlier time)."""
    log = log.before(as_of)
    uis = user_item_stats(log, as_of)
    eng = engagement_stats(log.engaged, log.n_items, as_of) if log.engaged is not None else None
    return Context(as_of, log, items, uis, user_stats(log, as_of, uis), category, user_category_counts(log, as_of, category),
                   eng)


PAIR_FEATURES: tuple[str, ...] = (
    "ui_cnt", "ui_occasions", *(f"ui_dec_{int(h)}d" for h in HALF_LIVES_DAYS),
    "ui_days_since_last", "ui_days_since_first", "ui_gap_mean_d", "ui_gap_std_d", "ui_overdue", "ui_due_in_d",
    "ui_overdue_item_gap", "ui_basket_share", "ui_bought",
    *(f"ui_trip_dec_{int(r * 100)}" for r in TRIP_DECAYS), *(f"ui_last{k}_share" for k in RECENT_TRIPS),
    "ui_trips_since_last", "ui_trip_overdue",
    *HAZARD_FEATURES,
    "u_n_lines", "u_n_baskets", "u_n_items", "u_days_since_last", "u_span_d", "u_basket_gap_d", "u_baskets_30d",
    "u_repeat_share", "u_new_share_28d",
    "ucat_share",
    *ITEM_FEATURES,
)


USER_FEATURES: tuple[str, ...] = tuple(f for f in PAIR_FEATURES if f.startswith("u_"))


def user_features(ctx: Context, user: np.ndarray) -> dict[str, np.ndarray]:
    """The user-level ranker features (:data:`USER_FEATURES`) of ``user`` (codes of ``ctx.log``) as
    of ``ctx.as_of``: part of :func:`pair_features`, and what the two-stage service logs as the
    features it served with (the monitor's drift and skew reports read them)."""
    us, t = ctx.users, ctx.as_of
    user = np.asarray(user, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    out["u_n_lines"] = us.n_lines[user]
    out["u_n_baskets"] = us.n_baskets[user]
    out["u_n_items"] = us.n_items[user]
    out["u_days_since_last"] = (t - us.last[user]) / DAY_S
    span = (us.last[user] - us.first[user]) / DAY_S
    out["u_span_d"] = span
    with np.errstate(invalid="ignore", divide="ignore"):
        out["u_basket_gap_d"] = np.where(us.n_baskets[user] > 1, span / np.maximum(us.n_baskets[user] - 1, 1), np.nan)
    out["u_baskets_30d"] = us.baskets_30d[user]
    out["u_repeat_share"] = us.repeat_share[user]
    out["u_new_share_28d"] = us.new_share_28d[user]
    assert tuple(out) == USER_FEATURES
    return out


def _hazards(ctx: Context, user: np.ndarray, item: np.ndarray, has: np.ndarray, rr: np.ndarray) -> dict[str, np.ndarray]:
    """Time-aware re-buy hazards of bought pairs: with ``d`` whole days since the user last bought the
    item, the share of the user's own re-buy gaps of it that are ``>= d`` and end within the next
    :data:`HAZARD_DAYS` days (``ui_hazard_7d``; ``ui_gaps_open`` counts the gaps ``>= d``); the same over
    every user's gaps of the item (``item_hazard_7d``, ``item_gaps_open``), and the user's hazard
    shrunk towards the item's with :data:`HAZARD_PRIOR` pseudo-gaps. NaN for never-bought pairs."""
    if not len(ctx.uis.key) or not has.any():
        return {name: np.full(len(user), np.nan) for name in HAZARD_FEATURES}
    last_day = ctx.uis.last[rr] // DAY_S
    d = np.where(has, np.maximum(ctx.as_of // DAY_S - last_day, 1), 1)
    u_open, u_in = gaps_from(ctx.uis.gap_keys, rr, d)
    i_open, i_in = gaps_from(ctx.items.gap_keys, item, d)
    with np.errstate(invalid="ignore", divide="ignore"):
        add_in, add_open = ITEM_HAZARD_SMOOTHING
        item_h = (i_in + add_in) / (i_open + add_open)
        own = np.where(has & (u_open > 0), u_in / u_open, np.nan)
        shrunk = (u_in + HAZARD_PRIOR * item_h) / (u_open + HAZARD_PRIOR)
    return {"ui_hazard_7d": own, "ui_gaps_open": np.where(has, u_open, np.nan),
            "ui_hazard_7d_shrunk": np.where(has, shrunk, np.nan), "item_hazard_7d": np.where(has, item_h, np.nan),
            "item_gaps_open": np.where(has, i_open, np.nan)}


def pair_features(ctx: Context, user: np.ndarray, item: np.ndarray) -> dict[str, np.ndarray]:
    """Features ``[P]`` of the pairs ``(user[k], item[k])`` (user codes of ``ctx.log``) as of ``ctx.as_of``.

    Returns :data:`PAIR_FEATURES` and :data:`ENGAGEMENT_FEATURES` as float32 arrays (NaN where
    undefined, e.g. a never-bought item's gap). Candidate-source features (scores, flags) are added by :mod:`recflow.ranker.candidates`.
    """
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    n = ctx.log.n_items
    t = ctx.as_of
    r = ctx.uis.lookup(user * n + item)
    has = r >= 0
    rr = np.maximum(r, 0)

    def ui(values: np.ndarray, missing: float = 0.0) -> np.ndarray:
        return np.where(has, values[rr] if len(values) else missing, missing).astype(np.float64)

    out: dict[str, np.ndarray] = {}
    out["ui_cnt"] = ui(ctx.uis.cnt)
    out["ui_occasions"] = ui(ctx.uis.occasions)
    for j, h in enumerate(HALF_LIVES_DAYS):
        out[f"ui_dec_{int(h)}d"] = ui(ctx.uis.decayed[:, j] if len(ctx.uis.key) else np.zeros(0))
    last = ui((t - ctx.uis.last) / DAY_S if len(ctx.uis.key) else np.zeros(0), np.nan)
    out["ui_days_since_last"] = last
    out["ui_days_since_first"] = ui((t - ctx.uis.first) / DAY_S if len(ctx.uis.key) else np.zeros(0), np.nan)
    gap = ui(ctx.uis.gap_mean_d, np.nan)
    out["ui_gap_mean_d"] = gap
    out["ui_gap_std_d"] = ui(ctx.uis.gap_std_d, np.nan)
    item_gap = ctx.items["item_gap_median_d"][item]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["ui_overdue"] = last / gap
        out["ui_due_in_d"] = gap - last
        out["ui_overdue_item_gap"] = last / item_gap
        nb = ctx.users.n_baskets[user]
        out["ui_basket_share"] = np.where(nb > 0, out["ui_occasions"] / np.maximum(nb, 1), 0.0)
    out["ui_bought"] = has.astype(np.float64)
    us = ctx.users
    empty = not len(ctx.uis.key)
    for j, r_ in enumerate(TRIP_DECAYS):
        out[f"ui_trip_dec_{int(r_ * 100)}"] = ui(np.zeros(0) if empty else ctx.uis.trip_decayed[:, j])
    for j, k in enumerate(RECENT_TRIPS):
        recent = ui(np.zeros(0) if empty else ctx.uis.recent_trips[:, j])
        out[f"ui_last{k}_share"] = recent / np.maximum(np.minimum(us.n_baskets[user], k), 1)
    since_trips = ui(np.zeros(0) if empty else ctx.uis.trips_since_last, np.nan)
    out["ui_trips_since_last"] = since_trips
    with np.errstate(invalid="ignore", divide="ignore"):
        # trips since the last purchase against the user's trips per purchase of the item
        out["ui_trip_overdue"] = since_trips * out["ui_occasions"] / us.n_baskets[user]
    out.update(_hazards(ctx, user, item, has, rr))
    out.update(user_features(ctx, user))
    if ctx.ucat is not None and ctx.category is not None:
        keys, cnt = ctx.ucat
        n_c = int(np.max(ctx.category)) + 2
        q = user * n_c + (np.asarray(ctx.category, dtype=np.int64)[item] + 1)
        pos = np.minimum(np.searchsorted(keys, q), max(len(keys) - 1, 0))
        hit = (keys[pos] == q) if len(keys) else np.zeros(len(q), bool)
        c = np.where(hit, cnt[pos] if len(cnt) else 0.0, 0.0)
        known = np.asarray(ctx.category)[item] >= 0
        out["ucat_share"] = np.where(known & (us.n_lines[user] > 0), c / np.maximum(us.n_lines[user], 1), np.nan)
    else:
        out["ucat_share"] = np.full(len(user), np.nan)
    for name in ITEM_FEATURES:
        out[name] = ctx.items[name][item]
    out.update(_engagement_features(ctx, user, item))
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
