"""Ranking over a loaded :class:`~serving.serving_state.ServingState` (vectorised, no I/O).

- :func:`rank_users`: personalised top-k for a batch of users (one matrix product with a
  certified bfloat16 prefilter and float32 re-scoring, or ANN candidates re-scored exactly), with
  per-user exclusions and category filters, and the history item behind each pick (one batched
  product). Scores equal ``ItemIndex.scores``: the re-buy bonus includes the item's repeat offset.
- :func:`rank_two_stage`: the two-stage model's top-k (the offline scoring core), and
  :class:`AnswerCache`, which reuses a user's answer while their online history is unchanged.
- :func:`popular`: the popularity fallback.
- :func:`similar` and :func:`search`: item-to-item and text queries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from serving.serving_state import ServingState

if TYPE_CHECKING:
    from recflow.modeling import UserQuery


# Below this many users a plain float32 product is as fast as the bfloat16 prefilter (measured).
PREFILTER_MIN_BATCH = 4
# Column groups of the k-th-score lower bound (more: a tighter bound, a larger [B, GROUPS] top-k).
GROUPS = 1024


@dataclass(frozen=True)
class Pick:
    """One recommended item: catalogue position, score, and why (``kind``, history position)."""

    position: int
    score: float
    kind: str  # repeat | similar | popular | text
    reason: int | None = None
    text: str | None = None  # a sentence for shoppers and support agents (two-stage model)


@dataclass
class HistoryAsk:
    """One user's two-stage ranking request: the online history, the request time and filters."""

    history_ids: list[str]
    history_ts: list[int]
    as_of: int
    k: int
    exclude_history: bool = False
    rows: np.ndarray | None = None  # only these positions (category filter)
    user_id: str | None = None
    history_types: list[str] | None = None  # each entry's event type (None: all purchases)


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


def _reason_lists(
    state: ServingState, picks: list[np.ndarray], histories: list[np.ndarray]
) -> list[tuple[list[str], list[int | None]]]:
    """``(kinds, why)`` of :func:`reasons` for every user of a batch, with one batched product."""
    n = len(picks)
    kmax = max((len(p) for p in picks), default=0)
    hmax = max((len(h) for h in histories), default=0)
    if kmax == 0 or hmax == 0:
        return [(["similar"] * len(p), [None] * len(p)) for p in picks]
    pk = np.zeros((n, kmax), np.int64)
    hs = np.zeros((n, hmax), np.int64)
    hmask = np.zeros((n, hmax), bool)
    for b, (p, h) in enumerate(zip(picks, histories, strict=True)):
        pk[b, : len(p)] = p
        hs[b, : len(h)] = h
        hmask[b, : len(h)] = True
    m = state.index.matrix
    sims = np.matmul(m[pk], m[hs].transpose(0, 2, 1))  # [B, k, h]
    sims[~np.broadcast_to(hmask[:, None, :], sims.shape)] = -np.inf
    best = np.take_along_axis(hs, sims.argmax(axis=2), axis=1)  # [B, k]
    in_hist = ((pk[:, :, None] == hs[:, None, :]) & hmask[:, None, :]).any(axis=2)
    out: list[tuple[list[str], list[int | None]]] = []
    for b, p in enumerate(picks):
        if len(histories[b]) == 0:
            out.append((["similar"] * len(p), [None] * len(p)))
            continue
        r, bst = in_hist[b, : len(p)].tolist(), best[b, : len(p)].tolist()
        out.append((["repeat" if x else "similar" for x in r],
                    [int(q) if x else int(w) for q, x, w in zip(p.tolist(), r, bst, strict=True)]))
    return out


def _bonus(state: ServingState, q: UserQuery) -> np.ndarray:
    """The full re-buy bonus at ``q.bonus_positions``: user part + the item's repeat offset."""
    return (q.bonus + state.index.repeat_offset[q.bonus_positions]).astype(np.float32)


@dataclass
class _Groups:
    """``scores [B, N]`` seen as ``G`` column groups of ``size`` (``[:, :G*size]``) and a tail."""

    scores: torch.Tensor
    size: int
    gmax: torch.Tensor  # [B, G] maximum of each group

    @classmethod
    def of(cls, scores: torch.Tensor) -> _Groups:
        b, n = scores.shape
        size = max(1, -(-n // GROUPS))
        return cls(scores, size, scores[:, : (n // size) * size].reshape(b, -1, size).amax(dim=2))

    @property
    def full(self) -> int:
        return self.gmax.shape[1] * self.size

    def kth_lower_bound(self, ks: np.ndarray) -> np.ndarray:
        """Per row, a lower bound of its ``ks[b]``-th largest score (-inf when it has fewer finite
        scores): the ``k``-th largest group maximum (k distinct entries are at least that large)."""
        b, n = self.scores.shape
        parts = [self.gmax]
        if self.full < n:
            parts.append(self.scores[:, self.full :])  # tail columns, each its own group
        cand = torch.cat(parts, dim=1) if len(parts) > 1 else self.gmax
        kmax = min(int(ks.max()), cand.shape[1])
        top = torch.topk(cand, kmax, dim=1).values.numpy()
        return top[np.arange(b), np.minimum(ks, kmax) - 1]

    def at_least(self, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` of the entries ``>= thr[row]``, visiting only groups whose maximum is."""
        b, n = self.scores.shape
        t = torch.from_numpy(thr.astype(np.float32))
        sel_r, sel_g = torch.nonzero(self.gmax >= t[:, None], as_tuple=True)
        blocks = self.scores[:, : self.full].reshape(b, -1, self.size)[sel_r, sel_g]  # [S, size]
        i, j = torch.nonzero(blocks >= t[sel_r][:, None], as_tuple=True)
        rows, cols = [sel_r[i].numpy()], [(sel_g[i] * self.size + j).numpy()]
        if self.full < n:
            tr, tc = torch.nonzero(self.scores[:, self.full :] >= t[:, None], as_tuple=True)
            rows.append(tr.numpy())
            cols.append(tc.numpy() + self.full)
        return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def _refine(
    state: ServingState, users: np.ndarray, scores: torch.Tensor, ks: np.ndarray, eps: np.ndarray,
    b_rows: np.ndarray, b_cols: np.ndarray, b_vals: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact float32 top ``ks[b]`` from prefilter ``scores`` within ``eps[b]`` (see :func:`rank_users`)."""
    scorer, n_users, n = state.scorer, len(ks), state.n_items
    groups = _Groups.of(scores)
    bound = groups.kth_lower_bound(ks)
    lowest = float(np.finfo(np.float32).min)  # never admit excluded (-inf) items
    thr = np.maximum(np.where(np.isfinite(bound), bound - 2 * eps, lowest), lowest)
    rows, cols = groups.at_least(thr)
    exact = scorer.exact_rows(users, cols, rows)
    if len(b_cols) and len(cols):
        key_b = b_rows * n + b_cols
        order = np.argsort(key_b)
        key_b, val_b = key_b[order], b_vals[order]
        key = rows * n + cols
        at = np.searchsorted(key_b, key).clip(0, len(key_b) - 1)
        hit = key_b[at] == key
        exact[hit] += val_b[at[hit]]
    order = np.lexsort((cols, -exact, rows))  # by user, best first (ties: lower position)
    rows, cols, exact = rows[order], cols[order], exact[order]
    starts = np.searchsorted(rows, np.arange(n_users + 1))
    chosen = [(cols[starts[b]: starts[b] + min(ks[b], starts[b + 1] - starts[b])],
               exact[starts[b]: starts[b] + min(ks[b], starts[b + 1] - starts[b])]) for b in range(n_users)]
    return chosen


def rank_users(state: ServingState, asks: list[UserAsk]) -> list[list[Pick]]:
    """Personalised top-k for every ask (exact scan, or ANN candidates when the state has an ANN index).

    Exact scan, in two steps: (1) scores of every item for the whole batch in one product (for
    batches of at least :data:`PREFILTER_MIN_BATCH` users with a float32 scorer, the bfloat16
    prefilter, each score within ``eps`` of the float32 one; otherwise float32, ``eps = 0``), and a
    lower bound ``t`` of each user's k-th best score; (2) every item scoring at least ``t - 2 eps``
    is re-scored in float32 and the best k of those are returned. That is the exact float32 top k:
    an item of the exact top k scores at least ``t_k - 2 eps >= t - 2 eps`` in step (1). Scores are
    ``<u, v> + bias``, plus the re-buy bonus on history items, exactly as ``ItemIndex.scores``.
    """
    if not asks:
        return []
    users = np.stack([a.query.vector for a in asks]).astype(np.float32)
    if state.ann is not None:
        return _rank_ann(state, asks, users)
    scorer = state.scorer
    n_users, n = len(asks), state.n_items
    prefilter = getattr(scorer, "approx", None) is not None and n_users >= PREFILTER_MIN_BATCH
    scores = scorer.prefilter_scores(users) if prefilter else scorer.scores(users)  # [B, N] float32
    eps = scorer.error_bound(users) if prefilter else np.zeros(n_users)
    # re-buy bonus at each user's history items, as (row * N + col) keys sorted for lookups
    b_rows = np.concatenate([np.full(len(a.query.bonus_positions), b, np.int64) for b, a in enumerate(asks)])
    b_cols = np.concatenate([a.query.bonus_positions.astype(np.int64) for a in asks])
    b_vals = np.concatenate([_bonus(state, a.query) for a in asks]) if len(b_cols) else np.zeros(0, np.float32)
    if len(b_cols):
        scores.index_put_((torch.from_numpy(b_rows), torch.from_numpy(b_cols)), torch.from_numpy(b_vals),
                          accumulate=True)
    neg = float("-inf")
    for b, a in enumerate(asks):
        if a.rows is not None:
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.from_numpy(a.rows)] = True
            scores[b].masked_fill_(~keep, neg)
        if a.exclude_history and len(a.query.history_positions):
            scores[b, torch.from_numpy(a.query.history_positions)] = neg
    ks = np.array([min(a.k, n) for a in asks], np.int64)
    if not prefilter:  # float32 scores already exact: one batched top-k (cheapest for small batches)
        top_val, top_idx = torch.topk(scores, int(ks.max()), dim=1)
        chosen = []
        for b in range(n_users):
            v, i = top_val[b, : ks[b]].numpy(), top_idx[b, : ks[b]].numpy().astype(np.int64)
            keep_f = np.isfinite(v)
            chosen.append((i[keep_f], v[keep_f]))
    else:
        chosen = _refine(state, users, scores, ks, eps, b_rows, b_cols, b_vals)
    why = _reason_lists(state, [c[0] for c in chosen], [a.query.history_positions for a in asks])
    return [
        [Pick(int(i), float(v), kd, w) for i, v, kd, w in zip(idx.tolist(), val.tolist(), kinds, ws, strict=True)]
        for (idx, val), (kinds, ws) in zip(chosen, why, strict=True)
    ]


def _exact_subset(state: ServingState, q: UserQuery, rows: np.ndarray) -> np.ndarray:
    s = state.index.matrix[rows] @ q.vector + state.index.bias[rows]
    if len(q.bonus_positions):
        hit = np.isin(rows, q.bonus_positions)
        if hit.any():
            bonus = dict(zip(q.bonus_positions.tolist(), _bonus(state, q).tolist(), strict=True))
            s[hit] += np.array([bonus[r] for r in rows[hit].tolist()], dtype=np.float32)
    return s


def _ann_topk(state: ServingState, asks: list[UserAsk], users: np.ndarray, cand: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-k over each user's candidates (ANN hits, the most popular items and the user's history
    items, which carry the re-buy bonus), for the whole batch at once: ``(positions, scores)`` per ask."""
    assert state.ann is not None
    n_users, n = len(asks), state.n_items
    hist = [a.query.bonus_positions for a in asks]
    hmax = max(len(h) for h in hist)
    h_pos = np.full((n_users, hmax), -1, np.int64)
    h_bonus = np.zeros((n_users, hmax), np.float32)
    for b, a in enumerate(asks):
        h_pos[b, : len(hist[b])] = hist[b]
        h_bonus[b, : len(hist[b])] = _bonus(state, a.query)
    pop = np.broadcast_to(state.ann.popular, (n_users, len(state.ann.popular)))
    rows = np.concatenate([cand.astype(np.int64), pop, h_pos], axis=1)
    rows.sort(axis=1)
    valid = rows >= 0  # -1: FAISS found fewer, or history padding
    valid[:, 1:] &= rows[:, 1:] != rows[:, :-1]  # each position once
    safe = np.maximum(rows, 0)
    s = np.matmul(state.index.matrix[safe], users[:, :, None])[:, :, 0] + state.index.bias[safe]  # [B, C]
    if hmax:
        # each history item's (first) slot: one search over all rows, made increasing by a row offset
        width = n + 1
        flat = (rows + 1 + width * np.arange(n_users)[:, None]).ravel()
        at = np.searchsorted(flat, (h_pos + 1 + width * np.arange(n_users)[:, None]).ravel())
        hit = (h_pos >= 0).ravel()
        s.ravel()[at[hit]] += h_bonus.ravel()[hit]
        drop = hit & np.repeat([a.exclude_history for a in asks], hmax)
        valid.ravel()[at[drop]] = False
    s[~valid] = -np.inf
    out = []
    for b, a in enumerate(asks):
        k = min(a.k, s.shape[1])
        top = np.argpartition(-s[b], k - 1)[:k] if k < s.shape[1] else np.arange(s.shape[1])
        top = top[np.lexsort((rows[b, top], -s[b, top]))]  # best first, ties: lower position
        v = s[b, top]
        keep = np.isfinite(v)
        out.append((rows[b, top][keep], v[keep].astype(np.float32)))
    return out


def _rank_ann(state: ServingState, asks: list[UserAsk], users: np.ndarray) -> list[list[Pick]]:
    """ANN candidates re-scored exactly, batched (see :func:`_ann_topk`); a category filter scores
    its items exactly instead (a small subset)."""
    assert state.ann is not None
    n = state.n_items
    kmax = max(a.k for a in asks)
    chosen: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(asks)
    free = [b for b, a in enumerate(asks) if a.rows is None]
    if free:
        cand = state.ann.candidates(users[free], min(n, max(4 * kmax, 64)))
        for b, got in zip(free, _ann_topk(state, [asks[b] for b in free], users[free], cand), strict=True):
            chosen[b] = got
    for b, a in enumerate(asks):
        if a.rows is None:
            continue
        q = a.query
        s = torch.from_numpy(_exact_subset(state, q, a.rows).astype(np.float32))
        if a.exclude_history and len(q.history_positions):
            s[torch.from_numpy(np.isin(a.rows, q.history_positions))] = float("-inf")
        idx, val = _top(s, a.k)
        chosen[b] = (a.rows[idx], val)
    why = _reason_lists(state, [c[0] for c in chosen], [a.query.history_positions for a in asks])
    return [
        [Pick(int(i), float(v), kd, w) for i, v, kd, w in zip(idx.tolist(), val.tolist(), kinds, ws, strict=True)]
        for (idx, val), (kinds, ws) in zip(chosen, why, strict=True)
    ]


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


def rank_two_stage(state: ServingState, asks: list[HistoryAsk],
                   features: list[dict[str, float | None]] | None = None) -> list[list[Pick]]:
    """Top-k of the two-stage model (:func:`recflow.ranker.recommend.recommend`, the scoring core the
    offline evaluation uses) for every ask, in this state's positions, with reason sentences; a
    ``features`` list is extended by each ask's user-level ranker features (what is logged)."""
    from recflow.ranker.recommend import Ask, reason_text, recommend

    ts, to_state, to_ranker = state.two_stage, state.two_stage_to_state, state.state_to_two_stage
    assert ts is not None and to_state is not None and to_ranker is not None
    core = []
    for a in asks:
        rows = None if a.rows is None else to_ranker[a.rows]
        core.append(Ask(a.history_ids, a.history_ts, a.as_of, a.k, a.exclude_history,
                        None if rows is None else rows[rows >= 0], a.user_id, a.history_types))
    titles = state.catalogue.titles

    def title_of(p: int) -> str | None:
        t = titles[to_state[p]]
        return None if t is None else str(t)

    return [
        [Pick(int(to_state[p.position]), p.score, p.kind, None if p.reason is None else int(to_state[p.reason]),
              reason_text(p, title_of)) for p in picks]
        for picks in recommend(ts, core, features)
    ]


class AnswerCache:
    """Each user's last two-stage answer, reused while their online history is unchanged and the
    answer is at most ``max_age_s`` old.

    A two-stage answer is a function of the model, the user's history (item ids and timestamps,
    which every feedback push changes) and the time it is ranked as of. The key holds the request's
    own options (:func:`answer_key`); the entry holds a fingerprint of the history and the ``as_of``
    it was ranked at, so a push is a miss at once and a hit is exactly the offline answer as of that
    time, never more than ``max_age_s`` earlier (the re-buy features move in days, not seconds).
    Each entry lives between 3/4 of ``max_age_s`` and all of it (spread by its key), so answers
    ranked together (a prefill) do not all expire in the same second. At most ``max_users``
    entries (least recently used go first; 0 or ``max_age_s`` 0 turns it off). One per loaded
    model; not thread-safe (the runtime fills it before the model serves, then uses it from its
    one compute thread).
    """

    def __init__(self, version: str, max_users: int, max_age_s: float) -> None:
        self.version = version
        self.max_users = max_users
        self.max_age_s = max_age_s
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, tuple[int, int, Any]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_users > 0 and self.max_age_s > 0

    def __len__(self) -> int:
        return len(self._data)

    @staticmethod
    def fingerprint(history_ids: Sequence[str], history_ts: Sequence[int], history_types: Sequence[str] = ()) -> int:
        """A hash of the history the model reads (ids, times and event types, in order)."""
        return hash((tuple(history_ids), tuple(history_ts), tuple(history_types)))

    def get(self, key: Hashable, fingerprint: int, as_of: int) -> Any:
        """The cached answer for ``key`` if its history matches and it is not older than ``max_age_s``."""
        if not self.enabled:
            return None
        entry = self._data.get(key)
        if entry is not None and entry[0] == fingerprint and 0 <= as_of - entry[1] <= self._life(key):
            self._data.move_to_end(key)
            self.hits += 1
            return entry[2]
        self.misses += 1
        return None

    def _life(self, key: Hashable) -> float:
        """How long the entry of ``key`` is reused: ``max_age_s`` times 0.75-1, fixed per key."""
        return self.max_age_s * (0.75 + 0.25 * (hash(key) % 1024) / 1023)

    def put(self, key: Hashable, fingerprint: int, as_of: int, picks: Any) -> None:
        if not self.enabled:
            return
        self._data[key] = (fingerprint, as_of, picks)
        self._data.move_to_end(key)
        while len(self._data) > self.max_users:
            self._data.popitem(last=False)


def answer_key(user_id: str, k: int, exclude_purchased: bool = False, category: str | None = None) -> Hashable:
    """The :class:`AnswerCache` key of a /recommend request's options."""
    return (user_id, k, exclude_purchased, category)
