"""Candidate generation: the union of re-buy, co-purchase, popular, trending, text and cold-item sources.

For a batch of users as of ``ctx.as_of`` (see :mod:`recflow.ranker.features`):

- ``history``: every item the user bought (the whole re-buy history in the log);
- ``cooccur``: the top unseen items by item-kNN score over the user's decayed history
  (basket co-occurrence cosine, top ``neighbors`` per item);
- ``popular`` / ``trending``: the most bought items of the last 30 days, and the fastest risers
  of the last week against the month;
- ``text``: the top unseen sold items by cosine between their MiniLM text vector and the user's
  text profile (decay-weighted mean of the history's text vectors): substitutes;
- ``cold``: items never sold before ``as_of``, first by how much the user buys their text group
  (items with the same text: a new variant of what they buy), then by the text score plus a prior
  from the popularity of the text group (cold start);
- ``neighbours``: the top unseen items of the user's nearest users (cosine of decayed purchase
  vectors, TIFU-KNN style): the user's live history against a snapshot of the other users' vectors;
- ``new``: the best sellers among the items first sold in the last ``new_days`` days (launches the
  item statistics already know but whose 30-day counts are still small);
- ``engaged``: the items the user viewed or put in the cart in the last ``engaged_days`` days, most
  recent first (``n_engaged``; 0, off, unless the shop's events hold views or carts).

The co-purchase and text scores of every candidate are kept as ranker features, next to a bit
per source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from recflow.ranker.features import Context, ItemStats
from recflow.ranker.log import DAY_S, PurchaseLog

SOURCES: tuple[str, ...] = ("history", "cooccur", "popular", "trending", "text", "cold", "neighbours", "new", "engaged")
CANDIDATE_FEATURES: tuple[str, ...] = ("cand_cf", "cand_cf_rel", "cand_text", "cand_text_rel", "cand_ucf", "cand_ucf_rel",
                                       "cand_tgroup", "cand_tgroup_items",
                                       *(f"src_{s}" for s in SOURCES))
_HISTORY_WEIGHT_COLUMN = 2  # the 90-day decayed count weighs the user's items (co-purchase and text profile)


@dataclass
class CandidateConfig:
    """How many items each source contributes per user."""

    n_cooccur: int = 50
    n_popular: int = 50
    n_trending: int = 20
    n_text: int = 30
    n_cold: int = 20
    n_neighbour_items: int = 50
    user_neighbours: int = 50
    cold_prior_weight: float = 0.3
    cold_group_weight: float = 1.0  # weight of log1p(the user's decayed purchases of the item's text group)
    neighbors: int = 100
    min_trending_lines: int = 5
    n_new: int = 20
    new_days: float = 14.0
    n_engaged: int = 0  # training.two_stage.config_for turns it on for a shop with views or carts
    engaged_days: float = 14.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def neighbours_enabled(self) -> bool:
        return self.n_neighbour_items > 0 and self.user_neighbours > 0


def item_similarity(log: PurchaseLog, neighbors: int = 100, min_cooccur: int = 2) -> sp.csr_matrix:
    """Item-item cosine of basket co-occurrence ``[N, N]`` (a basket = one user's purchases on one UTC day),
    the top ``neighbors`` per row among pairs seen together in at least ``min_cooccur`` baskets, no diagonal."""
    n = log.n_items
    bkey = log.user * (2**33) + log.ts // DAY_S
    basket = np.unique(bkey, return_inverse=True)[1]
    x = sp.csr_matrix((np.ones(len(basket), np.float32), (basket, log.item)), shape=(int(basket.max()) + 1 if len(basket) else 0, n))
    x.data[:] = 1.0
    x.sum_duplicates()
    x.data = np.minimum(x.data, 1.0)
    c = (x.T @ x).tocoo()
    diag = np.zeros(n, np.float64)
    d = c.row == c.col
    diag[c.row[d]] = c.data[d]
    off = ~d & (c.data >= min_cooccur)
    r, col, v = c.row[off], c.col[off], c.data[off].astype(np.float64)
    v = v / np.sqrt(diag[r] * diag[col])
    order = np.lexsort((-v, r))
    r, col, v = r[order], col[order], v[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r)
    keep = rank < neighbors
    return sp.csr_matrix((v[keep].astype(np.float32), (r[keep], col[keep])), shape=(n, n))


@dataclass
class ItemSide:
    """The item-side artifacts of candidate generation as of one time (saved with the model for serving)."""

    stats: ItemStats
    similarity: sp.csr_matrix | None = None  # [N, N]
    text_emb: np.ndarray | None = None  # [T, d] float32, rows L2-normalised
    item_text: np.ndarray | None = None  # [N] row in text_emb (-1: no text)
    user_vectors: sp.csr_matrix | None = None  # [U, N] every user's decayed purchases, rows L2-normalised
    user_ids: np.ndarray | None = None  # [U] str: whose row is whose (a user is never their own neighbour)

    def __post_init__(self) -> None:
        self.popular = np.argsort(-self.stats["item_pop_30d"], kind="stable")
        trend = np.where(self.stats["item_pop_7d"] >= 1, self.stats["item_trend"], -np.inf)
        self.trend_order = np.argsort(-trend, kind="stable")
        self._item_to_text: sp.csr_matrix | None = None
        if self.text_emb is not None and self.item_text is not None:
            it = np.asarray(self.item_text, dtype=np.int64)
            ok = np.flatnonzero(it >= 0)
            self._item_to_text = sp.csr_matrix(
                (np.ones(len(ok), np.float32), (ok, it[ok])), shape=(len(it), self.text_emb.shape[0]))
        # the sparse sources' lookups: each text row's sold items, the sold items without text, cold items
        sold = self.stats.sold
        self._item_text = None if self.item_text is None else np.asarray(self.item_text, dtype=np.int64)
        if self._item_to_text is not None and self._item_text is not None:
            ok = np.flatnonzero(sold & (self._item_text >= 0))
            self._text_sold = sp.csr_matrix((np.ones(len(ok), np.float32), (self._item_text[ok], ok)),
                                            shape=(self.text_emb.shape[0], len(sold)))
            self._text_has_sold = np.diff(self._text_sold.indptr) > 0
            self._notext_sold = np.flatnonzero(sold & (self._item_text < 0)).astype(np.int64)
            self._cold_items = np.flatnonzero(~sold & (self._item_text >= 0)).astype(np.int64)
        # a cold item inherits a prior from its text group's popularity (in [0, 1])
        tp = np.log1p(self.stats["item_text_pop_30d"])
        self.cold_prior = (tp / max(float(tp.max()), 1e-12)).astype(np.float32)
        self._user_row = None if self.user_ids is None else pd.Index(np.asarray(self.user_ids).astype(str))
        self._user_pos: dict[str, int] = {} if self.user_ids is None else {
            str(u): i for i, u in enumerate(np.asarray(self.user_ids).astype(str).tolist())}
        # [T, d] contiguous float32 once: the per-request text scores are one matrix-vector product
        self._text_t = None if self.text_emb is None else torch.from_numpy(np.ascontiguousarray(self.text_emb, np.float32))
        # [N, U] once: a per-request ``h @ v.T`` would transpose the whole matrix every call
        self._user_vectors_t = None if self.user_vectors is None else self.user_vectors.T.tocsr()
        self._new_cache: dict[tuple[float, int], np.ndarray] = {}

    def new_items(self, days: float, k: int) -> np.ndarray:
        """The ``k`` best-selling items first sold within ``days`` days before the statistics' as-of time."""
        key = (float(days), int(k))
        if key not in self._new_cache:
            age, pop = self.stats["item_age_d"], self.stats["item_pop_all"]
            fresh = np.flatnonzero(np.nan_to_num(age, nan=np.inf) <= days)
            order = np.lexsort((fresh, -pop[fresh]))
            self._new_cache[key] = fresh[order][:k].astype(np.int64)
        return self._new_cache[key]


@dataclass
class Candidates:
    """Candidate pairs of a batch of users, sorted by (user, item)."""

    user: np.ndarray  # [C] user codes of the context's log
    item: np.ndarray  # [C] catalogue positions
    features: dict[str, np.ndarray]  # CANDIDATE_FEATURES, [C] float32 each

    def __len__(self) -> int:
        return len(self.user)


def user_vectors(log: PurchaseLog, as_of: int, half_life_days: float = 90.0) -> sp.csr_matrix:
    """``[U, N]`` decayed purchase counts of every user of ``log`` before ``as_of``, rows L2-normalised."""
    log = log.before(as_of)
    w = np.exp2(-(as_of - log.ts) / DAY_S / half_life_days).astype(np.float32)
    m = sp.csr_matrix((w, (log.user, log.item)), shape=(log.n_users, log.n_items))
    m.sum_duplicates()
    norm = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    return sp.csr_matrix(sp.diags(1.0 / np.maximum(norm, 1e-12)) @ m, dtype=np.float32)


def _entries(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (sorted), columns and values of a CSR matrix's stored entries. A sparse product has no
    duplicate entries; its columns stay in the product's order (no sort: nothing here needs it)."""
    m = m.tocsr()
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return rows, m.indices.astype(np.int64), m.data


def _scatter(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """A ``[b, N]`` lookup table holding ``values`` (or True) at (rows, cols), zero elsewhere: one write
    per entry (the zeroed pages come from the allocator), so lookups are plain indexing."""
    out = np.zeros(shape, bool if values is None else np.float32)
    out[rows, cols] = True if values is None else values
    return out


def _row_max_sparse(rows: np.ndarray, values: np.ndarray, n_rows: int, empty: float = 0.0) -> np.ndarray:
    """Each row's largest value (``empty`` for a row without entries), ``[n_rows]`` float32."""
    out = np.full(n_rows, -np.inf, np.float32)
    np.maximum.at(out, rows, values.astype(np.float32))
    return np.where(np.isfinite(out), out, empty).astype(np.float32)


def _top_per_row(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest-valued (row, column) entries of each row; ``rows`` must be sorted (a CSR's order).
    A partial sort per row: linear in the row's entries, where a full sort of the batch is not."""
    if k <= 0 or len(rows) == 0:
        return rows[:0], cols[:0]
    bounds = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1], [True])))
    keep: list[np.ndarray] = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if hi - lo <= k:
            keep.append(np.arange(lo, hi))
        else:
            keep.append(lo + np.argpartition(-values[lo:hi], k - 1)[:k])
    idx = np.sort(np.concatenate(keep))
    return rows[idx], cols[idx]


def _neighbour_scores(side: ItemSide, h: sp.csr_matrix, user_ids: np.ndarray, k: int) -> sp.csr_matrix:
    """``[b, N]`` sparse: the similarity-weighted mean of each user's ``k`` nearest other users' vectors."""
    assert side.user_vectors is not None and side._user_row is not None
    v = side.user_vectors
    norm = np.sqrt(np.asarray(h.multiply(h).sum(axis=1)).ravel())
    hn = h.copy()
    hn.data = (hn.data / np.repeat(np.maximum(norm, 1e-12), np.diff(hn.indptr))).astype(np.float32)
    sims = np.asarray((hn @ side._user_vectors_t).todense(), dtype=np.float32)  # [b, U]
    me = np.array([side._user_pos.get(str(u), -1) for u in user_ids], np.int64)
    ok = me >= 0
    sims[np.flatnonzero(ok), me[ok]] = -np.inf
    kk = min(k, sims.shape[1])
    if kk == 0:
        return sp.csr_matrix(h.shape, dtype=np.float32)
    val, idx = torch.topk(torch.from_numpy(sims), kk, dim=1)
    val = torch.clamp(val, min=0).numpy()
    w = sp.csr_matrix((val.reshape(-1), (np.repeat(np.arange(h.shape[0]), kk), idx.numpy().reshape(-1))),
                      shape=sims.shape)
    tot = np.maximum(val.sum(axis=1), 1e-12)
    out = (w @ v).tocsr()
    out.data = (out.data / np.repeat(tot, np.diff(out.indptr))).astype(np.float32)
    return out


def _history_matrix(ctx: Context, users: np.ndarray) -> sp.csr_matrix:
    n = ctx.log.n_items
    u_of = ctx.uis.key // n
    lo = np.searchsorted(u_of, users, side="left")
    hi = np.searchsorted(u_of, users, side="right")
    lens = hi - lo
    idx = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
    rows = np.repeat(np.arange(len(users)), lens)
    w = ctx.uis.decayed[idx, _HISTORY_WEIGHT_COLUMN] if len(idx) else np.zeros(0)
    w = np.maximum(w, 1e-6)  # an item bought long ago stays in the history
    return sp.csr_matrix((w.astype(np.float32), (rows, ctx.uis.key[idx] % n)), shape=(len(users), n))


def generate(ctx: Context, side: ItemSide, users: np.ndarray, cfg: CandidateConfig, batch_size: int = 256) -> Candidates:
    """Candidates of ``users`` (codes of ``ctx.log``) as of ``ctx.as_of``, with their source features."""
    users = np.asarray(users, dtype=np.int64)
    parts: list[Candidates] = []
    for s in range(0, len(users), batch_size):
        parts.append(_generate_batch(ctx, side, users[s:s + batch_size], cfg))
    if not parts:
        return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), {f: np.zeros(0, np.float32) for f in CANDIDATE_FEATURES})
    return Candidates(
        np.concatenate([p.user for p in parts]), np.concatenate([p.item for p in parts]),
        {f: np.concatenate([p.features[f] for p in parts]) for f in CANDIDATE_FEATURES},
    )


def _generate_batch(ctx: Context, side: ItemSide, users: np.ndarray, cfg: CandidateConfig) -> Candidates:
    """One batch's candidates. Each source is a sparse product (co-purchase, neighbours) or a top-k
    over a short list (text groups, cold items); nothing ranks the whole catalogue per user. The
    ``[b, N]`` tables are written only where a source has an entry, for lookups."""
    n = ctx.log.n_items
    b = len(users)
    h = _history_matrix(ctx, users)
    hr, hc, _ = _entries(h)
    seen = _scatter((b, n), hr, hc)

    def unseen(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return ~seen[r, c]

    picks: list[tuple[np.ndarray, np.ndarray, int]] = [(hr, hc, 1)]
    if side.similarity is not None:
        cr, cc, cv = _entries(h @ side.similarity)
    else:
        cr, cc, cv = (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),)
    ok = (cv > 0) & unseen(cr, cc)
    picks.append((*_top_per_row(cr[ok], cc[ok], cv[ok], cfg.n_cooccur), 2))
    cf_at, cf_max = _scatter((b, n), cr, cc, cv), np.maximum(_row_max_sparse(cr, cv, b), 1e-12)
    every = np.arange(b, dtype=np.int64)
    pop_items = side.popular[: cfg.n_popular]
    pop_items = pop_items[side.stats["item_pop_30d"][pop_items] > 0]
    tr = side.trend_order[: cfg.n_trending]
    tr = tr[side.stats["item_pop_7d"][tr] >= cfg.min_trending_lines]
    for fixed, bit in ((pop_items, 4), (tr, 8)):
        picks.append((np.repeat(every, len(fixed)), np.tile(fixed.astype(np.int64), b), bit))
    text_row = None
    tsc = group = items_group = None
    text_max = np.zeros(b, np.float32)
    if side._item_to_text is not None and side.text_emb is not None and side.item_text is not None:
        text_row = side._item_text
        ht = (h @ side._item_to_text).tocsr()  # [b, T] the user's decayed purchases per text group
        prof = np.asarray(ht @ side.text_emb, dtype=np.float32)
        prof = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
        tsc = (side._text_t @ torch.from_numpy(prof).T).T.numpy()  # [b, T]
        group = np.asarray(ht.todense(), dtype=np.float32)
        items_group = np.asarray(((h > 0).astype(np.float32) @ side._item_to_text).todense(), dtype=np.float32)
        tr_, tc_, tv_ = _text_source(side, tsc, seen, cfg.n_text, np.bincount(hr, minlength=b))
        picks.append((*_top_per_row(tr_, tc_, tv_, cfg.n_text), 16))
        text_max = _row_max_sparse(tr_, tv_, b)
        cold = side._cold_items
        if len(cold) and cfg.n_cold > 0:
            ct = text_row[cold]
            cold_score = (tsc[:, ct] + cfg.cold_prior_weight * side.cold_prior[cold][None, :]
                          + cfg.cold_group_weight * np.log1p(group[:, ct]))
            kk = min(cfg.n_cold, len(cold))
            top = torch.topk(torch.from_numpy(np.ascontiguousarray(cold_score, np.float32)), kk, dim=1, sorted=False).indices
            picks.append((np.repeat(every, kk), cold[top.numpy().reshape(-1)].astype(np.int64), 32))
    if side.user_vectors is not None and cfg.neighbours_enabled():
        ur, uc, uv = _entries(_neighbour_scores(side, h, ctx.log.user_ids[users], cfg.user_neighbours))
        ok = (uv > 0) & unseen(ur, uc)
        picks.append((*_top_per_row(ur[ok], uc[ok], uv[ok], cfg.n_neighbour_items), 64))
    else:
        ur, uc, uv = (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),)
    ucf_at, ucf_max = _scatter((b, n), ur, uc, uv), np.maximum(_row_max_sparse(ur, uv, b), 1e-12)
    if cfg.n_new > 0:
        fresh = side.new_items(cfg.new_days, cfg.n_new)
        picks.append((np.repeat(every, len(fresh)), np.tile(fresh, b), 128))
    if cfg.n_engaged > 0 and ctx.eng is not None and len(ctx.eng.key):
        picks.append((*_engaged(ctx, users, cfg), 256))
    # the union, one row per (user, item), sorted, with a bit per source
    key = np.concatenate([r * n + c for r, c, _ in picks])
    bits = np.concatenate([np.full(len(r), bit, np.uint16) for r, _, bit in picks])
    order = np.argsort(key, kind="stable")
    key, bits = key[order], bits[order]
    first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1]))) if len(key) else np.zeros(0, np.int64)
    f = np.bitwise_or.reduceat(bits, first) if len(key) else np.zeros(0, np.uint16)
    key = key[first]
    rows, cols = key // n, key % n
    cf, ucf = cf_at[rows, cols], ucf_at[rows, cols]
    if tsc is not None and text_row is not None and group is not None and items_group is not None:
        t_of = text_row[cols]
        has = t_of >= 0
        tt = np.maximum(t_of, 0)
        text = np.where(has, tsc[rows, tt], -1.0).astype(np.float32)
        tgroup = np.where(has, group[rows, tt], 0.0)
        tgroup_items = items_group[rows, tt] * has
    else:
        text = np.zeros(len(key), np.float32)
        tgroup = tgroup_items = np.zeros(len(key), np.float32)
    feats = {
        "cand_cf": cf,
        "cand_cf_rel": cf / cf_max[rows],
        "cand_text": text,
        "cand_text_rel": text - text_max[rows],
        "cand_ucf": ucf,
        "cand_ucf_rel": ucf / ucf_max[rows],
        "cand_tgroup": tgroup,
        "cand_tgroup_items": tgroup_items,
    }
    for bit, name in enumerate(SOURCES):
        feats[f"src_{name}"] = ((f >> bit) & 1).astype(np.float32)
    return Candidates(users[rows], cols.astype(np.int64), {k: np.asarray(v, np.float32) for k, v in feats.items()})


def _engaged(ctx: Context, users: np.ndarray, cfg: CandidateConfig) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) of each user's ``cfg.n_engaged`` most recently viewed or carted items of the last
    ``cfg.engaged_days`` days."""
    e, n = ctx.eng, ctx.log.n_items
    assert e is not None
    u_of = e.key // n
    lo, hi = np.searchsorted(u_of, users, side="left"), np.searchsorted(u_of, users, side="right")
    lens = hi - lo
    idx = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lens)
    last = e.last[idx]
    ok = (ctx.as_of - last) <= cfg.engaged_days * DAY_S
    rows, idx, last = rows[ok], idx[ok], last[ok]
    top_r, top_c = _top_per_row(rows, idx, last, cfg.n_engaged)
    return top_r, e.key[top_c] % n


def _text_source(side: ItemSide, tsc: np.ndarray, seen: np.ndarray, k: int,
                 n_seen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, item, score) of every unseen sold item in each user's top text groups: enough groups
    that the top ``k`` unseen sold items by text score are among them (a group is emptied only by
    seen items, so ``k`` + the most seen items of the batch groups suffice; items without a text
    score -1, below every cosine, and come last)."""
    b = tsc.shape[0]
    t_sold = side._text_sold
    kk = int(min(k + (int(n_seen.max()) if len(n_seen) else 0), int(side._text_has_sold.sum())))
    parts_r, parts_c, parts_v = [], [], []
    if kk > 0:
        s = torch.from_numpy(np.where(side._text_has_sold[None, :], tsc, -np.inf).astype(np.float32))
        val, top = torch.topk(s, kk, dim=1, sorted=False)
        top_rows = top.numpy().reshape(-1)
        sub = t_sold[top_rows]  # [b * kk, N]: the sold items of each chosen group
        pr, pc, _ = _entries(sub)
        parts_r.append(pr // kk)
        parts_c.append(pc)
        parts_v.append(val.numpy().reshape(-1)[pr])
    no_text = side._notext_sold[: k + (int(n_seen.max()) if len(n_seen) else 0)]
    if len(no_text):
        parts_r.append(np.repeat(np.arange(b, dtype=np.int64), len(no_text)))
        parts_c.append(np.tile(no_text, b))
        parts_v.append(np.full(b * len(no_text), -1.0, np.float32))
    if not parts_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    r, c, v = np.concatenate(parts_r), np.concatenate(parts_c), np.concatenate(parts_v).astype(np.float32)
    ok = np.flatnonzero(~seen[r, c])
    ok = ok[np.argsort(r[ok], kind="stable")]  # by row: the items without text came after every group
    return r[ok], c[ok], v[ok]
