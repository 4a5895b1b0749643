"""Baselines in the evaluation harness: every one sees only purchases before the evaluation anchor.

- ``popularity``: purchase lines per item, all history;
- ``recent_popularity``: purchase lines per item in the last ``recent_days`` (28) days;
- ``personal_top_frequency``: the user's own purchase counts (ties broken by the most recent
  purchase); items the user never bought follow, by global popularity;
- ``item_knn``: cosine similarity of basket co-occurrence (top ``neighbors`` per item); a user
  scores item j as sum over their bought items i of count(i) * sim(i, j);
- ``minilm_zero_shot``: the pretrained MiniLM with no training: the user vector is the
  log1p(count)-weighted mean of their bought items' text embeddings; score = cosine.
- ``decayed_frequency``: the user's purchases weighted by 2^(-age / half_life) (half-life tuned on
  the validation week by :func:`tune_decayed_frequency`);
- ``tifu_knn``: TIFU-KNN (Hu et al., SIGIR 2020): time-decayed basket averages per user, blended
  with the mean vector of the most similar users (parameters from :func:`tune_tifu_knn`);
- ``new_item_popularity``: the most-bought items among those first sold in the last
  ``new_days`` (14) days, then every other item by global popularity;
- ``recently_viewed`` (shops whose events hold views or carts): the items the user viewed or put
  in the cart in the last ``engaged_days`` (14) days, most recent first, then global popularity:
  the "continue shopping" shelf, the reference for a ranker that reads views and carts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import pandas as pd
import torch

from training.evaluate import EvalSet, Scorer, _csr_rows, evaluate
from training.examples import Catalogue, purchases, to_utc

TIFU_GRID: dict[str, tuple[Any, ...]] = {
    "group_size": (3, 7, 20),
    "within_decay": (0.9, 1.0),
    "between_decay": (0.6, 0.9),
    "neighbors": (100, 300),
    "alpha": (0.5, 0.7, 0.9, 1.0),
}
HALF_LIVES: tuple[float, ...] = (7, 14, 30, 60, 90, 180, 365)


@dataclass
class History:
    """Purchases before an anchor with catalogue positions, the eval users' row index and a user code."""

    user_row: np.ndarray  # [n] row in the EvalSet (-1 = not an evaluated user)
    item: np.ndarray  # [n] catalogue position
    ts: np.ndarray  # [n] epoch seconds
    basket: np.ndarray  # [n] basket key (int)
    user: np.ndarray | None = None  # [n] code of every purchaser: the EvalSet row for eval users, then the others
    n_users: int = 0  # number of user codes (>= the EvalSet's length)

    def user_codes(self) -> tuple[np.ndarray, int]:
        """``(code per line, number of codes)``; without ``user``, the eval rows only (others -1)."""
        u = self.user if self.user is not None else self.user_row
        top = int(u.max()) + 1 if len(u) else 0
        return u, max(self.n_users, top)


def history_before(events: pd.DataFrame, catalogue: Catalogue, ev: EvalSet) -> History:
    p = purchases(events)
    p = p[p["event_timestamp"] < to_utc(ev.anchor)]
    item = catalogue.positions(p["item_id"].to_numpy())
    ok = item >= 0
    p, item = p[ok], item[ok]
    uid = p["user_id"].astype(str).to_numpy()
    user_row = pd.Index(ev.rows.user_ids.astype(str)).get_indexer(uid).astype(np.int64)
    other = user_row < 0
    other_code, other_ids = pd.factorize(uid[other])
    user = user_row.copy()
    user[other] = len(ev) + other_code
    bkey = p["basket_id"] if "basket_id" in p.columns else p["user_id"].astype(str) + "@" + p["ts"].astype(str)
    basket = pd.factorize(bkey.astype(str))[0]
    return History(
        user_row, item.astype(np.int64), p["ts"].to_numpy().astype(np.int64), basket.astype(np.int64),
        user=user, n_users=len(ev) + len(other_ids),
    )


def _counts(item: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(item, minlength=n).astype(np.float64)


def popularity_scorer(h: History, n: int, since_ts: int | None = None) -> Scorer:
    keep = h.ts >= since_ts if since_ts is not None else np.ones(len(h.item), dtype=bool)
    scores = torch.from_numpy(_counts(h.item[keep], n)).float()

    def score(rows: np.ndarray) -> torch.Tensor:
        return scores.expand(len(rows), n)

    return score


def _user_item_counts(h: History, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per (eval user, item): rows, items, weighted counts, last ts."""
    m = h.user_row >= 0
    u, i, t = h.user_row[m], h.item[m], h.ts[m]
    w = np.ones(len(u)) if weights is None else weights[m]
    n_items = int(h.item.max()) + 1 if len(h.item) else 1
    key = u * n_items + i
    uniq, inv = np.unique(key, return_inverse=True)
    cnt = np.bincount(inv, weights=w)
    last = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(last, inv, t)
    return uniq // n_items, uniq % n_items, cnt, last


def personal_frequency_scorer(h: History, n: int, weights: np.ndarray | None = None) -> Scorer:
    """Own counts (+ a recency tie-break < 0.5), then unseen items by popularity (< 0.5 of the smallest count)."""
    rows, items, cnt, last = _user_item_counts(h, weights)
    pop = _counts(h.item, n)
    fill = torch.from_numpy(0.25 * pop / max(pop.max(), 1.0)).float()
    smallest = cnt.min() if len(cnt) else 1.0
    t0, t1 = (h.ts.min(), h.ts.max()) if len(h.ts) else (0, 1)
    rec = (last - t0) / max(t1 - t0, 1)
    tie = 0.4 * rec if weights is None else 0.0
    val = torch.from_numpy((cnt / smallest + 0.5 + tie) * float(fill.max() + 1)).float()
    starts = np.searchsorted(rows, np.arange(rows.max() + 2 if len(rows) else 1))

    def score(batch_rows: np.ndarray) -> torch.Tensor:
        s = fill.expand(len(batch_rows), n).clone()
        for b, r in enumerate(batch_rows):
            if r + 1 < len(starts):
                lo, hi = starts[r], starts[r + 1]
                s[b, torch.from_numpy(items[lo:hi])] = val[lo:hi]
        return s

    return score


def item_similarity(h: History, n: int, neighbors: int = 100) -> torch.Tensor:
    """Sparse ``[N, N]`` cosine similarity of basket co-occurrence, top ``neighbors`` per row, no diagonal."""
    pairs = np.unique(h.basket * n + h.item)
    b, i = pairs // n, pairs % n
    nb = int(b.max()) + 1 if len(b) else 1
    x = torch.sparse_coo_tensor(np.stack([b, i]), torch.ones(len(b)), (nb, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # torch's notice that sparse CSR support is in beta: not actionable here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        c = torch.sparse.mm(x.t().coalesce(), x).coalesce()
    r, cidx = c.indices().numpy()
    v = c.values().numpy()
    diag = np.zeros(n)
    d = r == cidx
    diag[r[d]] = v[d]
    off = ~d
    r, cidx, v = r[off], cidx[off], v[off]
    v = v / np.sqrt(diag[r] * diag[cidx])
    order = np.lexsort((-v, r))
    r, cidx, v = r[order], cidx[order], v[order]
    first = np.searchsorted(r, r)
    keep = (np.arange(len(r)) - first) < neighbors
    return torch.sparse_coo_tensor(np.stack([r[keep], cidx[keep]]), torch.from_numpy(v[keep]).float(), (n, n),
                                   check_invariants=False).coalesce()


def item_knn_scorer(h: History, n: int, neighbors: int = 100) -> Scorer:
    sim_t = item_similarity(h, n, neighbors).t().coalesce()  # [j, i]
    rows, items, cnt, _ = _user_item_counts(h)

    def score(batch_rows: np.ndarray) -> torch.Tensor:
        sel = np.isin(rows, batch_rows)
        pos = pd.Index(batch_rows).get_indexer(rows[sel])
        hist = torch.zeros(n, len(batch_rows))
        hist[torch.from_numpy(items[sel]), torch.from_numpy(pos)] = torch.from_numpy(cnt[sel]).float()
        return torch.sparse.mm(sim_t, hist).t()

    return score


def zero_shot_scorer(h: History, n: int, text_emb: np.ndarray, item_text: np.ndarray) -> Scorer:
    emb = torch.from_numpy(np.asarray(text_emb, dtype=np.float32))
    item_emb = emb[torch.from_numpy(item_text)]  # [N, D]
    rows, items, cnt, _ = _user_item_counts(h)

    def score(batch_rows: np.ndarray) -> torch.Tensor:
        sel = np.isin(rows, batch_rows)
        pos = torch.from_numpy(pd.Index(batch_rows).get_indexer(rows[sel]))
        w = torch.from_numpy(np.log1p(cnt[sel])).float()
        u = torch.zeros(len(batch_rows), emb.shape[1])
        u.index_add_(0, pos, item_emb[torch.from_numpy(items[sel])] * w[:, None])
        u = torch.nn.functional.normalize(u, dim=-1)
        return u @ item_emb.T

    return score


@dataclass
class SparseRows:
    """A sparse ``[R, N]`` float64 matrix in CSR form (row ``r`` holds ``cols/vals[indptr[r]:indptr[r + 1]]``)."""

    indptr: np.ndarray  # [R + 1] int64
    cols: np.ndarray  # [nnz] int64, increasing within a row
    vals: np.ndarray  # [nnz] float64
    n_cols: int

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row_of_nnz(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(position in rows, col, val)`` of every stored entry of ``rows``."""
        off, idx = _csr_rows(self.indptr, np.asarray(rows, dtype=np.int64))
        return np.repeat(np.arange(len(rows)), np.diff(off)), self.cols[idx], self.vals[idx]

    def dense(self, rows: np.ndarray) -> torch.Tensor:
        """``[len(rows), N]`` float32."""
        r, c, v = self.take(rows)
        out = torch.zeros(len(rows), self.n_cols)
        out[torch.from_numpy(r), torch.from_numpy(c)] = torch.from_numpy(v).float()
        return out

    def torch(self) -> torch.Tensor:
        """``[R, N]`` as a sparse CSR float32 tensor."""
        return _csr_tensor(self.indptr, self.cols, self.vals, (len(self), self.n_cols))

    def torch_t(self) -> torch.Tensor:
        """The transpose ``[N, R]`` as a sparse CSR float32 tensor."""
        rows = self.row_of_nnz()
        order = np.lexsort((rows, self.cols))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(self.cols, minlength=self.n_cols))]).astype(np.int64)
        return _csr_tensor(indptr, rows[order], self.vals[order], (self.n_cols, len(self)))


def _csr_tensor(indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(np.asarray(indptr, dtype=np.int64)), torch.from_numpy(np.asarray(cols, dtype=np.int64)),
            torch.from_numpy(vals).float(), shape, check_invariants=False,
        )


@dataclass
class _Baskets:
    """What TIFU-KNN vectors share for any parameters: each basket's user and rank from the user's
    latest (0), and where each distinct (basket, item) adds into the CSR user x item values."""

    size: np.ndarray  # [B] baskets of the basket's user
    rank: np.ndarray  # [B] 0 = the user's latest basket
    pair_basket: np.ndarray  # [P] basket of each distinct (basket, item)
    pair_cell: np.ndarray  # [P] index of its (user, item) entry
    indptr: np.ndarray
    cols: np.ndarray
    n_cols: int


def _baskets(h: History, n: int) -> _Baskets:
    u_all, n_users = h.user_codes()
    m = u_all >= 0
    u, b, t, it = u_all[m], h.basket[m], h.ts[m], h.item[m]
    nb = int(b.max()) + 1 if len(b) else 1
    bkey, binv = np.unique(u * nb + b, return_inverse=True)  # a basket = (user, basket key)
    b_user = bkey // nb
    b_ts = np.full(len(bkey), np.iinfo(np.int64).max)
    np.minimum.at(b_ts, binv, t)
    order = np.lexsort((bkey, b_ts, b_user))  # by user, then time of the first line
    ou = b_user[order]
    size = np.bincount(ou, minlength=n_users)[ou]
    rank = np.empty(len(bkey), dtype=np.int64)
    rank[order] = size - 1 - (np.arange(len(order)) - np.searchsorted(ou, ou))
    size_b = np.empty_like(rank)
    size_b[order] = size
    pairs = np.unique(binv * n + it)  # distinct (basket, item)
    pb = pairs // n
    cell, inv = np.unique(b_user[pb] * n + pairs % n, return_inverse=True)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(cell // n, minlength=n_users))]).astype(np.int64)
    return _Baskets(size_b, rank, pb, inv, indptr, (cell % n).astype(np.int64), n)


def _tifu_vectors(bk: _Baskets, group_size: int, within_decay: float, between_decay: float) -> SparseRows:
    g, q = bk.rank // group_size, bk.rank % group_size
    m_g = np.minimum(group_size, bk.size - g * group_size)  # baskets in the basket's group
    k_u = -(-bk.size // group_size)  # groups of the user
    w = np.power(float(within_decay), q) * np.power(float(between_decay), g) / (m_g * k_u)
    vals = np.bincount(bk.pair_cell, weights=w[bk.pair_basket], minlength=len(bk.cols))
    return SparseRows(bk.indptr, bk.cols, vals, bk.n_cols)


def tifu_user_vectors(h: History, n: int, *, group_size: int, within_decay: float, between_decay: float) -> SparseRows:
    """TIFU-KNN user vectors ``[n_users, N]`` (one row per user code of ``h``).

    A user's baskets (distinct items, ordered by their first line's time) are cut into groups of
    ``group_size`` from the latest backwards (the oldest group may be shorter). As in the paper, a
    group of m baskets is (1/m) * sum_j within_decay^(m - j) * basket_j and the user vector over k
    groups is (1/k) * sum_g between_decay^(k - g) * group_g (the latest basket and group weigh 1).
    """
    return _tifu_vectors(_baskets(h, n), group_size, within_decay, between_decay)


def tifu_neighbours(x: SparseRows, rows: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """``[len(rows), k]`` user codes of each row's ``k`` most similar other users by cosine, most
    similar first; -1 where fewer than ``k`` others have a positive similarity."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.full((len(rows), k), -1, dtype=np.int64)
    kk = min(k, len(x) - 1)
    if kk <= 0 or not len(rows):
        return out
    norm = np.sqrt(np.bincount(x.row_of_nnz(), weights=x.vals**2, minlength=len(x)))
    unit = SparseRows(x.indptr, x.cols, x.vals / norm[x.row_of_nnz()], x.n_cols)
    unit_t = unit.torch_t()  # [N, U]
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        pos, cols, vals = unit.take(r)
        q = _csr_tensor(np.concatenate([[0], np.cumsum(np.bincount(pos, minlength=len(r)))]), cols, vals, (len(r), x.n_cols))
        sim = (q @ unit_t).to_dense()  # [c, U] cosine
        sim[torch.arange(len(r)), torch.from_numpy(r)] = -1.0
        val, idx = torch.topk(sim, kk, dim=1)
        out[s : s + len(r), :kk] = torch.where(val > 0, idx, torch.full_like(idx, -1)).numpy()
    return out


def _tifu_neighbour_mean(x: SparseRows, xt: torch.Tensor, nb: np.ndarray) -> torch.Tensor:
    """``[len(nb), N]``: the mean vector of each row's neighbours ``nb`` (-1 = none; no neighbour -> 0)."""
    ok = nb >= 0
    r, c = np.nonzero(ok)
    w = torch.zeros(len(nb), len(x))
    w[torch.from_numpy(r), torch.from_numpy(nb[r, c])] = torch.from_numpy(1.0 / ok.sum(1)[r]).float()
    return torch.sparse.mm(xt, w.T).T.contiguous()


def _tifu_scores(x: SparseRows, rows: np.ndarray, nb_mean: torch.Tensor | None, alpha: float, below: torch.Tensor) -> torch.Tensor:
    """alpha * u + (1 - alpha) * ``nb_mean`` for ``rows`` (``nb_mean`` is overwritten; None: alpha * u);
    entries that are not positive get ``below`` (< 0: popularity order under every positive score)."""
    s = nb_mean.mul_(1.0 - alpha) if nb_mean is not None else torch.zeros(len(rows), x.n_cols)
    r, c, v = x.take(rows)
    s.index_put_((torch.from_numpy(r), torch.from_numpy(c)), torch.from_numpy(alpha * v).float(), accumulate=True)
    return torch.where(s > 0, s, below, out=s)


def tifu_knn_scorer(
    h: History, n: int, *, group_size: int, within_decay: float, between_decay: float, neighbors: int, alpha: float
) -> Scorer:
    """TIFU-KNN: alpha * own vector + (1 - alpha) * mean of the ``neighbors`` most similar other users'
    vectors (cosine, over every user with a purchase before the anchor); items at 0 follow by popularity."""
    x = tifu_user_vectors(h, n, group_size=group_size, within_decay=within_decay, between_decay=between_decay)
    xt = x.torch_t() if alpha < 1.0 else None
    below = _popularity_fill(h, n) - 1.0

    def score(rows: np.ndarray) -> torch.Tensor:
        nb_mean = _tifu_neighbour_mean(x, xt, tifu_neighbours(x, rows, neighbors)) if xt is not None else None
        return _tifu_scores(x, rows, nb_mean, alpha, below)

    return score


def _popularity_fill(h: History, n: int) -> torch.Tensor:
    pop = _counts(h.item, n)
    return torch.from_numpy(0.5 * pop / max(pop.max(initial=0.0), 1.0)).float()


def new_item_popularity_scorer(h: History, n: int, first_seen: np.ndarray, anchor_s: int, days: int = 14) -> Scorer:
    """Items first sold in ``[anchor - days, anchor)`` by purchase lines (each >= 1), then the rest by
    global popularity (< 0.5). First sold = the earlier of the first purchase in ``h`` (before the
    anchor) and the catalogue's ``first_seen``, whichever is known."""
    pop = _counts(h.item, n)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, h.item, h.ts)
    first = np.minimum(first, np.asarray(first_seen, dtype=np.int64))
    new = (first >= anchor_s - days * 86400) & (pop > 0)
    scores = torch.from_numpy(np.where(new, pop, 0.5 * pop / max(pop.max(initial=0.0), 1.0))).float()

    def score(rows: np.ndarray) -> torch.Tensor:
        return scores.expand(len(rows), n)

    return score


def recently_viewed_scorer(events: pd.DataFrame, catalogue: Catalogue, ev: EvalSet, h: History, n: int,
                           days: int = 14) -> Scorer | None:
    """Each user's items viewed or carted in ``[anchor - days, anchor)``, most recent first (scores in
    [1, 2]), then every item by global popularity (< 0.5); None when the events hold no view or cart."""
    from recflow.ranker.log import epoch_seconds

    if "event_type" not in events.columns:
        return None
    anchor_s = _anchor_s(ev)
    e = events[events["event_type"].isin(["view", "cart"])]
    ts = epoch_seconds(e["event_timestamp"])
    keep = (ts < anchor_s) & (ts >= anchor_s - days * 86400)
    if not keep.any():
        return None
    e, ts = e[keep], ts[keep]
    row = pd.Index(ev.rows.user_ids.astype(str)).get_indexer(e["user_id"].astype(str).to_numpy())
    item = catalogue.positions(e["item_id"].to_numpy())
    ok = (row >= 0) & (item >= 0)
    key, ts = row[ok].astype(np.int64) * n + item[ok], ts[ok]
    order = np.lexsort((ts, key))
    key, ts = key[order], ts[order]
    last_of = np.flatnonzero(np.r_[key[1:] != key[:-1], True])  # the last (latest) line of each (user, item)
    key, last = key[last_of], ts[last_of]
    rows, items = key // n, key % n
    val = torch.from_numpy(1.0 + (last - (anchor_s - days * 86400)) / (days * 86400)).float()
    fill = _popularity_fill(h, n)
    starts = np.searchsorted(rows, np.arange(len(ev) + 1))

    def score(batch_rows: np.ndarray) -> torch.Tensor:
        s = fill.expand(len(batch_rows), n).clone()
        for b, r in enumerate(batch_rows):
            lo, hi = starts[r], starts[r + 1]
            s[b, torch.from_numpy(items[lo:hi])] = val[lo:hi]
        return s

    return score


def _anchor_s(ev: EvalSet) -> int:
    return int(to_utc(ev.anchor).value // 10**9)


def decay_weights(h: History, anchor_s: int, half_life_days: float) -> np.ndarray:
    """2^(-age / half-life) per purchase line."""
    return np.exp2(-(anchor_s - h.ts) / 86400 / half_life_days)


def tune_decayed_frequency(
    events: pd.DataFrame, catalogue: Catalogue, ev_val: EvalSet, half_lives: tuple[float, ...] = HALF_LIVES
) -> tuple[float, float]:
    """The half-life (days) of ``decayed_frequency`` with the best validation NDCG@10, and that NDCG."""
    h = history_before(events, catalogue, ev_val)
    n, anchor = len(catalogue), _anchor_s(ev_val)
    scores = {hl: evaluate(personal_frequency_scorer(h, n, weights=decay_weights(h, anchor, hl)), ev_val)["ndcg@10"] for hl in half_lives}
    best = max(half_lives, key=lambda hl: scores[hl])  # first of the best on ties
    return float(best), float(scores[best])


def _tuning_scorer(
    x: SparseRows, xt: torch.Tensor | None, nb: np.ndarray | None, cached: torch.Tensor | None,
    buf: torch.Tensor, alpha: float, below: torch.Tensor,
) -> Scorer:
    """Scores ranked as :func:`tifu_knn_scorer`'s, from precomputed neighbours ``nb`` (None: own
    vectors only) or ``cached`` EvalSet rows of ``where(mean > 0, mean, below)``. For a range of rows
    (``evaluate``'s batches) the output is ``buf``, reused per batch, and with ``cached`` it takes one
    pass: (1 - alpha) * cached (positive, or ``below`` scaled: the same order), then u's entries."""

    def score(rows: np.ndarray) -> torch.Tensor:
        lo, b = (int(rows[0]) if len(rows) else 0), len(rows)
        ranged = b <= len(buf) and np.array_equal(rows, np.arange(lo, lo + b))
        if nb is None or xt is None:
            if not ranged:
                return _tifu_scores(x, rows, None, alpha, below)
            r, c, v = x.take(rows)
            s = buf[:b].copy_(below.expand(b, x.n_cols))
            s[torch.from_numpy(r), torch.from_numpy(c)] = torch.from_numpy(alpha * v).float()
            return s
        if cached is None:
            return _tifu_scores(x, rows, _tifu_neighbour_mean(x, xt, nb[rows]), alpha, below)
        if not ranged:
            return _tifu_scores(x, rows, cached[torch.from_numpy(rows)].clamp_(min=0.0), alpha, below)
        r, c, v = x.take(rows)
        rc = (torch.from_numpy(r), torch.from_numpy(c))
        block = cached[lo : lo + b]
        s = torch.mul(block, 1.0 - alpha, out=buf[:b])
        s[rc] = torch.mul(block[rc].clamp(min=0.0), 1.0 - alpha) + torch.from_numpy(alpha * v).float()
        return s

    return score


def tune_tifu_knn(
    events: pd.DataFrame,
    catalogue: Catalogue,
    ev_val: EvalSet,
    grid: dict[str, tuple[Any, ...]] | None = None,
    cache_bytes: int = 1 << 30,
) -> tuple[dict[str, Any], float]:
    """TIFU-KNN parameters with the best validation NDCG@10 over ``grid`` (keys of :data:`TIFU_GRID`,
    missing ones from it), and that NDCG (the first best in grid order on ties).

    Shared work: the basket layout once; user vectors and one neighbour list (the longest) per
    (group size, decays); the neighbour means once per neighbour count, kept for every alpha while
    they fit in ``cache_bytes``; alpha = 1 (no neighbours) is evaluated once."""
    g = {**TIFU_GRID, **(grid or {})}
    h = history_before(events, catalogue, ev_val)
    n, rows, batch = len(catalogue), np.arange(len(ev_val)), 256
    bk = _baskets(h, n)
    below = _popularity_fill(h, n) - 1.0
    blend = any(a < 1.0 for a in g["alpha"])
    keep = blend and len(ev_val) * n * 4 <= cache_bytes
    buf = torch.empty(min(batch, len(ev_val)), n)  # the scorer's output, reused per batch
    best: tuple[float, dict[str, Any]] = (-np.inf, {})
    for gs, wd, bd in product(g["group_size"], g["within_decay"], g["between_decay"]):
        x = _tifu_vectors(bk, gs, wd, bd)
        xt = x.torch_t() if blend else None
        nb_all = tifu_neighbours(x, rows, max(g["neighbors"])) if blend else None
        for k in g["neighbors"]:
            cached = None
            if keep and xt is not None and nb_all is not None:
                cached = torch.empty(len(rows), n)
                for s in range(0, len(rows), batch):
                    m = _tifu_neighbour_mean(x, xt, nb_all[s : s + batch, :k])
                    torch.where(m > 0, m, below, out=cached[s : s + batch])
            for alpha in g["alpha"]:
                if alpha >= 1.0 and k != g["neighbors"][0]:
                    continue
                nb = nb_all[:, :k] if nb_all is not None and alpha < 1.0 else None
                score = _tuning_scorer(x, xt, nb, cached, buf, alpha, below)
                value = float(evaluate(score, ev_val, batch_size=batch)["ndcg@10"])
                if value > best[0]:
                    best = (value, {"group_size": gs, "within_decay": wd, "between_decay": bd, "neighbors": k, "alpha": alpha})
            del cached
    return best[1], best[0]


def baseline_scorers(
    events: pd.DataFrame,
    catalogue: Catalogue,
    ev: EvalSet,
    *,
    text_emb: np.ndarray | None = None,
    item_text: np.ndarray | None = None,
    recent_days: int = 28,
    neighbors: int = 100,
    half_life_days: float = 90.0,
    tifu_params: dict[str, Any] | None = None,
    new_days: int = 14,
) -> dict[str, Scorer]:
    """Every baseline's scorer on ``ev`` (``minilm_zero_shot`` only when text embeddings are given,
    ``tifu_knn`` only with ``tifu_params``: the keyword arguments of :func:`tifu_knn_scorer`;
    ``recently_viewed`` only when the events hold views or carts before the anchor)."""
    h = history_before(events, catalogue, ev)
    n = len(catalogue)
    anchor_s = _anchor_s(ev)
    since = anchor_s - recent_days * 86400
    out: dict[str, Scorer] = {
        "popularity": popularity_scorer(h, n),
        "recent_popularity": popularity_scorer(h, n, since_ts=since),
        "personal_top_frequency": personal_frequency_scorer(h, n),
        "item_knn": item_knn_scorer(h, n, neighbors),
        "decayed_frequency": personal_frequency_scorer(h, n, weights=decay_weights(h, anchor_s, half_life_days)),
        "new_item_popularity": new_item_popularity_scorer(h, n, catalogue.first_seen, anchor_s, new_days),
    }
    if tifu_params is not None:
        out["tifu_knn"] = tifu_knn_scorer(h, n, **tifu_params)
    if text_emb is not None and item_text is not None:
        out["minilm_zero_shot"] = zero_shot_scorer(h, n, text_emb, item_text)
    viewed = recently_viewed_scorer(events, catalogue, ev, h, n)
    if viewed is not None:
        out["recently_viewed"] = viewed
    return out
