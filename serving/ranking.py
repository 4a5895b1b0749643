"""Ranking over a loaded :class:`~serving.model_state.ServingState` (vectorised, no I/O).

- :func:`rank_users`: personalised top-k for a batch of users (one matrix product, or ANN
  candidates re-scored exactly), with per-user exclusions and category filters, and the history
  item behind each pick (:func:`reasons`).
- :func:`popular`: the popularity fallback.
- :func:`similar` and :func:`search`: item-to-item and text queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from serving.model_state import ServingState

if TYPE_CHECKING:
    from recflow.modeling import UserQuery


@dataclass(frozen=True)
class Pick:
    """One recommended item: catalogue position, score, and why (``kind``, history position)."""

    position: int
    score: float
    kind: str  # repeat | similar | popular | text
    reason: int | None = None


@dataclass
class UserAsk:
    """One user's ranking request, already resolved to catalogue positions."""

    query: UserQuery
    k: int
    exclude_history: bool = False
    rows: np.ndarray | None = None  # only these positions (category filter)


def _top(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` finite entries of a 1-d tensor, best first."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    val, idx = torch.topk(scores, k)
    keep = torch.isfinite(val)
    return idx[keep].numpy(), val[keep].numpy()


def reasons(state: ServingState, picks: np.ndarray, history: np.ndarray) -> tuple[list[str], list[int | None]]:
    """For each picked position: ``("repeat", itself)`` when it is in the history, else
    ``("similar", the history item with the closest vector)``."""
    if len(history) == 0:
        return ["similar"] * len(picks), [None] * len(picks)
    m = state.index.matrix
    sims = m[picks] @ m[history].T  # [k, h]
    best = history[np.argmax(sims, axis=1)]
    in_hist = np.isin(picks, history)
    kinds = ["repeat" if r else "similar" for r in in_hist]
    why = [int(p) if r else int(b) for p, b, r in zip(picks, best, in_hist, strict=True)]
    return kinds, why


def _picks(state: ServingState, idx: np.ndarray, val: np.ndarray, history: np.ndarray) -> list[Pick]:
    kinds, why = reasons(state, idx, history)
    return [Pick(int(i), float(v), kd, w) for i, v, kd, w in zip(idx, val, kinds, why, strict=True)]


def rank_users(state: ServingState, asks: list[UserAsk]) -> list[list[Pick]]:
    """Personalised top-k for every ask (exact scan, or ANN candidates when the state has an ANN index)."""
    if not asks:
        return []
    users = np.stack([a.query.vector for a in asks]).astype(np.float32)
    if state.ann is not None:
        return _rank_ann(state, asks, users)
    scores = state.scorer.scores(users)  # [B, N] float32
    rows, cols, vals = [], [], []
    for b, a in enumerate(asks):
        q = a.query
        if len(q.bonus_positions):
            rows.append(np.full(len(q.bonus_positions), b))
            cols.append(q.bonus_positions)
            vals.append(q.bonus)
    if rows:
        scores.index_put_(
            (torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))),
            torch.from_numpy(np.concatenate(vals).astype(np.float32)),
            accumulate=True,
        )
    out = []
    neg = float("-inf")
    for b, a in enumerate(asks):
        s = scores[b]
        if a.rows is not None:
            masked = torch.full_like(s, neg)
            r = torch.from_numpy(a.rows)
            masked[r] = s[r]
            s = masked
        if a.exclude_history and len(a.query.history_positions):
            s[torch.from_numpy(a.query.history_positions)] = neg
        idx, val = _top(s, a.k)
        out.append(_picks(state, idx, val, a.query.history_positions))
    return out


def _exact_subset(state: ServingState, q: UserQuery, rows: np.ndarray) -> np.ndarray:
    s = state.index.matrix[rows] @ q.vector + state.index.bias[rows]
    if len(q.bonus_positions):
        hit = np.isin(rows, q.bonus_positions)
        if hit.any():
            bonus = dict(zip(q.bonus_positions.tolist(), q.bonus.tolist(), strict=True))
            s[hit] += np.array([bonus[r] for r in rows[hit].tolist()], dtype=np.float32)
    return s


def _rank_ann(state: ServingState, asks: list[UserAsk], users: np.ndarray) -> list[list[Pick]]:
    assert state.ann is not None
    n = state.n_items
    kmax = max(a.k for a in asks)
    n_cand = min(n, max(4 * kmax, 64))
    cand = state.ann.candidates(users, n_cand)
    out = []
    for b, a in enumerate(asks):
        q = a.query
        if a.rows is not None:  # a category: score its items exactly (a small subset)
            rows = a.rows
        else:  # ANN candidates + the user's history items (their re-buy bonus is exact)
            c = cand[b]
            rows = np.unique(np.concatenate([c[c >= 0], q.bonus_positions]))
        s = torch.from_numpy(_exact_subset(state, q, rows).astype(np.float32))
        if a.exclude_history and len(q.history_positions):
            s[torch.from_numpy(np.isin(rows, q.history_positions))] = float("-inf")
        idx, val = _top(s, a.k)
        out.append(_picks(state, rows[idx], val, q.history_positions))
    return out


def popular(state: ServingState, k: int, rows: np.ndarray | None = None, exclude: np.ndarray | None = None) -> list[Pick]:
    """Most popular items (purchases over 30 days), optionally within ``rows`` and without ``exclude``."""
    order = state.catalogue.popular_rows(rows)
    if exclude is not None and len(exclude):
        head = order[: k + len(exclude)]  # at most len(exclude) of these go
        order = head[~np.isin(head, exclude)]
    top = order[:k]
    score = state.catalogue.pop_score
    return [Pick(int(p), float(score[p]), "popular", None) for p in top]


def similar(state: ServingState, position: int, k: int) -> list[Pick]:
    """Items whose vectors are closest (cosine) to the item at ``position``, the item excluded."""
    m = state.scorer.matrix
    s = (m @ m[position]).float()
    s[position] = float("-inf")
    idx, val = _top(s, k)
    return [Pick(int(i), float(v), "similar", position) for i, v in zip(idx, val, strict=True)]


def search(state: ServingState, text: str, k: int, query: UserQuery | None = None, weight: float = 0.1) -> list[Pick]:
    """Items whose text best matches ``text`` (MiniLM cosine); with a user ``query`` the best
    ``max(10 k, 200)`` text matches are re-ranked by ``cosine + weight * standardised user score``."""
    from recflow.modeling import search_scores

    s = torch.from_numpy(np.ascontiguousarray(search_scores(state.model, text), dtype=np.float32))
    if query is None or weight == 0:
        idx, val = _top(s, k)
        return [Pick(int(i), float(v), "text", None) for i, v in zip(idx, val, strict=True)]
    cand, text_score = _top(s, max(10 * k, 200))
    user = _exact_subset(state, query, cand)
    z = (user - user.mean()) / (user.std() + 1e-6)
    final = torch.from_numpy((text_score + weight * z).astype(np.float32))
    idx, val = _top(final, k)
    picks = cand[idx]
    kinds, why = reasons(state, picks, query.history_positions)
    return [Pick(int(p), float(v), "text" if w is None else kd, w)
            for p, v, kd, w in zip(picks, val, kinds, why, strict=True)]
