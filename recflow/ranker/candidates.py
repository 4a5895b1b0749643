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
  vectors, TIFU-KNN style): the user's live history against a snapshot of the other users' vectors.

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

SOURCES: tuple[str, ...] = ("history", "cooccur", "popular", "trending", "text", "cold", "neighbours")
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
        # a cold item inherits a prior from its text group's popularity (in [0, 1])
        tp = np.log1p(self.stats["item_text_pop_30d"])
        self.cold_prior = (tp / max(float(tp.max()), 1e-12)).astype(np.float32)
        self._user_row = None if self.user_ids is None else pd.Index(np.asarray(self.user_ids).astype(str))
        # [N, U] once: a per-request ``h @ v.T`` would transpose the whole matrix every call
        self._user_vectors_t = None if self.user_vectors is None else self.user_vectors.T.tocsr()


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


def _neighbour_scores(side: ItemSide, h: sp.csr_matrix, user_ids: np.ndarray, k: int) -> np.ndarray:
    """``[b, N]``: the similarity-weighted mean of each user's ``k`` nearest other users' vectors."""
    assert side.user_vectors is not None and side._user_row is not None
    v = side.user_vectors
    norm = np.sqrt(np.asarray(h.multiply(h).sum(axis=1)).ravel())
    hn = sp.diags(1.0 / np.maximum(norm, 1e-12)) @ h
    sims = np.asarray((hn @ side._user_vectors_t).todense(), dtype=np.float32)  # [b, U]
    me = side._user_row.get_indexer(np.asarray(user_ids).astype(str))
    ok = me >= 0
    sims[np.flatnonzero(ok), me[ok]] = -np.inf
    kk = min(k, sims.shape[1])
    if kk == 0:
        return np.zeros(h.shape, np.float32)
    val, idx = torch.topk(torch.from_numpy(sims), kk, dim=1)
    val = torch.clamp(val, min=0).numpy()
    w = sp.csr_matrix((val.reshape(-1), (np.repeat(np.arange(h.shape[0]), kk), idx.numpy().reshape(-1))),
                      shape=sims.shape)
    tot = np.maximum(val.sum(axis=1), 1e-12)
    return (np.asarray((w @ v).todense(), dtype=np.float32) / tot[:, None]).astype(np.float32)


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


def _top_mask(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``[b, N]``: each row's top ``k`` among ``allowed`` with a score > -inf."""
    out = np.zeros(scores.shape, bool)
    if k <= 0 or scores.shape[1] == 0:
        return out
    s = torch.from_numpy(np.where(allowed, scores, -np.inf).astype(np.float32))
    val, top = torch.topk(s, min(k, s.shape[1]), dim=1, sorted=False)
    rows = np.repeat(np.arange(s.shape[0]), top.shape[1])
    ok = torch.isfinite(val).reshape(-1).numpy()
    out[rows[ok], top.reshape(-1).numpy()[ok]] = True
    return out


def _row_max(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Each row's largest allowed score (0 where none), ``[b, 1]``."""
    m = np.where(allowed, scores, -np.inf).max(axis=1, keepdims=True)
    return np.where(np.isfinite(m), m, 0.0)


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
    n = ctx.log.n_items
    b = len(users)
    h = _history_matrix(ctx, users)
    seen = h.toarray() > 0
    sold = side.stats.sold[None, :]
    flags = np.zeros((b, n), np.uint8)
    flags[seen] |= 1
    if side.similarity is not None:
        cf = np.asarray((h @ side.similarity).todense(), dtype=np.float32)
    else:
        cf = np.zeros((b, n), np.float32)
    flags[_top_mask(cf, ~seen & (cf > 0), cfg.n_cooccur)] |= 2
    pop_items = side.popular[: cfg.n_popular]
    flags[:, pop_items[side.stats["item_pop_30d"][pop_items] > 0]] |= 4
    tr = side.trend_order[: cfg.n_trending]
    flags[:, tr[side.stats["item_pop_7d"][tr] >= cfg.min_trending_lines]] |= 8
    if side._item_to_text is not None and side.text_emb is not None and side.item_text is not None:
        prof = np.asarray((h @ side._item_to_text) @ side.text_emb, dtype=np.float32)
        norm = np.linalg.norm(prof, axis=1, keepdims=True)
        prof = prof / np.maximum(norm, 1e-12)
        tsc = prof @ side.text_emb.T  # [b, T]
        it = text_row = np.asarray(side.item_text, dtype=np.int64)
        text = np.where(it[None, :] >= 0, tsc[:, np.maximum(it, 0)], -1.0).astype(np.float32)
        flags[_top_mask(text, ~seen & sold, cfg.n_text)] |= 16
        # the user's decayed purchases and distinct items of each candidate's text group
        by_group = np.asarray((h @ side._item_to_text).todense(), dtype=np.float32)  # [b, T]
        items_group = np.asarray(((h > 0).astype(np.float32) @ side._item_to_text).todense(), dtype=np.float32)
        group = np.where(it[None, :] >= 0, by_group[:, np.maximum(it, 0)], 0.0).astype(np.float32)
        cold_score = text + cfg.cold_prior_weight * side.cold_prior[None, :] + cfg.cold_group_weight * np.log1p(group)
        flags[_top_mask(cold_score, ~sold & (it[None, :] >= 0), cfg.n_cold)] |= 32
    else:
        text = np.zeros((b, n), np.float32)
        group = np.zeros((b, n), np.float32)
        text_row = None
    if side.user_vectors is not None and cfg.neighbours_enabled():
        ucf = _neighbour_scores(side, h, ctx.log.user_ids[users], cfg.user_neighbours)
        flags[_top_mask(ucf, ~seen & (ucf > 0), cfg.n_neighbour_items)] |= 64
    else:
        ucf = np.zeros((b, n), np.float32)
    rows, cols = np.nonzero(flags)
    f = flags[rows, cols]
    cf_max = np.maximum(cf.max(axis=1), 1e-12)
    text_max = _row_max(text, ~seen & sold)[:, 0]
    feats = {
        "cand_cf": cf[rows, cols],
        "cand_cf_rel": cf[rows, cols] / cf_max[rows],
        "cand_text": text[rows, cols],
        "cand_text_rel": text[rows, cols] - text_max[rows],
        "cand_ucf": ucf[rows, cols],
        "cand_ucf_rel": ucf[rows, cols] / np.maximum(ucf.max(axis=1), 1e-12)[rows],
        "cand_tgroup": group[rows, cols],
        "cand_tgroup_items": (items_group[rows, np.maximum(text_row[cols], 0)] * (text_row[cols] >= 0)
                              if text_row is not None else np.zeros(len(rows))),
    }
    for bit, name in enumerate(SOURCES):
        feats[f"src_{name}"] = ((f >> bit) & 1).astype(np.float32)
    return Candidates(users[rows], cols.astype(np.int64), {k: np.asarray(v, np.float32) for k, v in feats.items()})
