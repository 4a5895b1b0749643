"""Baselines in the evaluation harness: every one sees only purchases before the evaluation anchor.

- ``popularity``: purchase lines per item, all history;
- ``recent_popularity``: purchase lines per item in the last ``recent_days`` (28) days;
- ``personal_top_frequency``: the user's own purchase counts (ties broken by the most recent
  purchase); items the user never bought follow, by global popularity;
- ``item_knn``: cosine similarity of basket co-occurrence (top ``neighbors`` per item); a user
  scores item j as sum over their bought items i of count(i) * sim(i, j);
- ``minilm_zero_shot``: the pretrained MiniLM with no training: the user vector is the
  log1p(count)-weighted mean of their bought items' text embeddings; score = cosine.
- ``decayed_frequency`` (diagnostic, not in the results table): the user's purchases weighted by
  2^(-age / half_life).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from training.data import Catalogue, purchases, to_utc
from training.evaluate import EvalSet, Scorer


@dataclass
class History:
    """Purchases before an anchor with catalogue positions and the eval users' row index."""

    user_row: np.ndarray  # [n] row in the EvalSet (-1 = not an evaluated user)
    item: np.ndarray  # [n] catalogue position
    ts: np.ndarray  # [n] epoch seconds
    basket: np.ndarray  # [n] basket key (int)


def history_before(events: pd.DataFrame, catalogue: Catalogue, ev: EvalSet) -> History:
    p = purchases(events)
    p = p[p["event_timestamp"] < to_utc(ev.anchor)]
    item = catalogue.positions(p["item_id"].to_numpy())
    ok = item >= 0
    p, item = p[ok], item[ok]
    user_row = pd.Index(ev.rows.user_ids.astype(str)).get_indexer(p["user_id"].astype(str).to_numpy())
    bkey = p["basket_id"] if "basket_id" in p.columns else p["user_id"].astype(str) + "@" + p["ts"].astype(str)
    basket = pd.factorize(bkey.astype(str))[0]
    return History(user_row.astype(np.int64), item.astype(np.int64), p["ts"].to_numpy().astype(np.int64), basket.astype(np.int64))


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
    x = torch.sparse_coo_tensor(np.stack([b, i]), torch.ones(len(b)), (nb, n)).coalesce()
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
    return torch.sparse_coo_tensor(np.stack([r[keep], cidx[keep]]), torch.from_numpy(v[keep]).float(), (n, n)).coalesce()


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
) -> dict[str, Scorer]:
    """Every baseline's scorer on ``ev`` (``minilm_zero_shot`` only when text embeddings are given)."""
    h = history_before(events, catalogue, ev)
    n = len(catalogue)
    since = int(to_utc(ev.anchor).value // 10**9) - recent_days * 86400
    anchor_s = int(to_utc(ev.anchor).value // 10**9)
    out: dict[str, Scorer] = {
        "popularity": popularity_scorer(h, n),
        "recent_popularity": popularity_scorer(h, n, since_ts=since),
        "personal_top_frequency": personal_frequency_scorer(h, n),
        "item_knn": item_knn_scorer(h, n, neighbors),
        "decayed_frequency": personal_frequency_scorer(h, n, weights=np.exp2(-(anchor_s - h.ts) / 86400 / half_life_days)),
    }
    if text_emb is not None and item_text is not None:
        out["minilm_zero_shot"] = zero_shot_scorer(h, n, text_emb, item_text)
    return out
