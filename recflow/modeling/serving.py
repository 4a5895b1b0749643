"""Inference API: a precomputed item index and per-user queries built from Feast serving features."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recflow.modeling.features import encode_profile, get_feature, history_features, user_dense
from recflow.modeling.model import RecModel


@dataclass
class UserQuery:
    """What one user contributes to the scores: ``index.matrix @ vector + index.bias``, plus
    ``bonus + index.repeat_offset[bonus_positions]`` at ``bonus_positions`` (the user's known history
    items: the re-buy component). Use :meth:`ItemIndex.scores`, which does exactly that."""

    vector: np.ndarray  # [dim] float32 (already divided by the temperature)
    bonus_positions: np.ndarray  # [h] int64 positions in the index
    bonus: np.ndarray  # [h] float32
    n_history: int  # history lines of known items that were used

    @property
    def history_positions(self) -> np.ndarray:
        """Index positions of the items in the user's history (to exclude already-bought items)."""
        return self.bonus_positions


@dataclass
class ItemIndex:
    """Item vectors and biases computed once; ``item_ids[i]`` is row ``i``."""

    item_ids: list[str]
    matrix: np.ndarray  # [N, dim] float32, rows L2-normalised
    bias: np.ndarray  # [N] float32: exploration bias (every item)
    repeat_offset: np.ndarray  # [N] float32: added at a user's history items (re-buy prior - bias)
    position: dict[str, int] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.position:
            self.position = {i: n for n, i in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def scores(self, query: UserQuery) -> np.ndarray:
        """Scores ``[N]`` of every item for one user."""
        s = self.matrix @ query.vector + self.bias
        p = query.bonus_positions
        s[p] += query.bonus + self.repeat_offset[p]  # positions are distinct
        return s

    def scores_batch(self, queries: Sequence[UserQuery]) -> np.ndarray:
        """Scores ``[B, N]`` for several users in one matrix product (for adaptive batching)."""
        u = np.stack([q.vector for q in queries])
        s = u @ self.matrix.T + self.bias
        for b, q in enumerate(queries):
            p = q.bonus_positions
            s[b, p] += q.bonus + self.repeat_offset[p]
        return s

    def top_k(
        self, query: UserQuery, k: int, exclude: Iterable[str] = (), exclude_history: bool = False
    ) -> list[tuple[str, float]]:
        """The ``k`` best ``(item_id, score)`` pairs (k is capped at the index size)."""
        s = self.scores(query)
        return self._top(s, k, exclude, query.history_positions if exclude_history else None)

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """Items whose vectors are closest (cosine) to ``item_id``'s, the item itself excluded.

        Raises ``KeyError`` for an item not in the index."""
        i = self.position[item_id]
        s = self.matrix @ self.matrix[i]
        return self._top(s, k, (item_id,), None)

    def _top(self, s: np.ndarray, k: int, exclude: Iterable[str], positions: np.ndarray | None) -> list[tuple[str, float]]:
        s = s.astype(np.float32, copy=True)
        ex = [self.position[e] for e in exclude if e in self.position]
        if ex:
            s[ex] = -np.inf
        if positions is not None and len(positions):
            s[positions] = -np.inf
        k = max(0, min(k, int(np.isfinite(s).sum())))
        if k == 0:
            return []
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top], kind="stable")]
        return [(self.item_ids[i], float(s[i])) for i in top]


def _popularity_matrix(model: RecModel, popularity: Mapping[str, Any] | None) -> np.ndarray | None:
    if popularity is None:
        return None
    names = model.config.popularity_features
    cols = []
    for n in names:
        col = popularity.get(f"item_popularity__{n}", popularity.get(n))
        if col is None:
            raise KeyError(f"popularity: missing feature {n!r} (or item_popularity__{n})")
        arr = np.asarray(col, dtype=np.float64)
        if arr.shape != (len(model.item_ids),):
            raise ValueError(f"popularity[{n!r}]: {arr.shape}, expected ({len(model.item_ids)},) aligned with model.item_ids")
        cols.append(arr)
    return np.stack(cols, axis=1)


@torch.no_grad()
def build_index(model: RecModel, popularity: Mapping[str, Any] | None = None) -> ItemIndex:
    """Item matrix and per-item bias for the model's whole catalogue.

    ``popularity`` maps each popularity feature (``purchases_7d`` or ``item_popularity__purchases_7d``,
    ...) to an array aligned with ``model.item_ids`` (NaN = unknown); by default the snapshot saved
    with the model (the end of its training data) is used.
    """
    model.eval()
    dev = model.pop_mean.device
    emb = model.catalogue_text_embeddings()
    rows = model.item_id_row
    vecs, bias, offset = [], [], []
    pop = model.catalogue_popularity_log(_popularity_matrix(model, popularity))
    for s in range(0, len(rows), 16384):
        sl = slice(s, s + 16384)
        vecs.append(model.item_vectors(emb[sl].to(dev), rows[sl]).float().cpu())
        b = model.item_bias(rows[sl], pop[sl])
        bias.append(b.float().cpu())
        offset.append(model.repeat_offset(rows[sl], pop[sl], b).float().cpu())
    if not vecs:
        z = np.zeros(0, np.float32)
        return ItemIndex([], np.zeros((0, model.config.dim), np.float32), z, z)
    matrix = torch.cat(vecs).numpy()
    return ItemIndex(list(model.item_ids), np.ascontiguousarray(matrix), torch.cat(bias).numpy(), torch.cat(offset).numpy())


def _as_float(v: Any) -> float:
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


@torch.no_grad()
def user_queries(model: RecModel, features: Sequence[Mapping[str, Any]]) -> list[UserQuery]:
    """One :class:`UserQuery` per user from Feast ``serving_v1`` feature dicts.

    Each dict is what ``get_online_features(...).to_dict()`` returns for one user (values may be
    one-element lists), with or without the ``view__`` prefixes. Missing or null features are
    allowed: an unknown user gets a query from the dense defaults and no re-buy bonus.
    """
    c = model.config
    pos = model.positions
    offsets = [0]
    items: list[int] = []
    ts: list[float] = []
    act = np.full((len(features), len(c.activity_features)), np.nan)
    prof_rows = []
    for b, f in enumerate(features):
        ids = get_feature(f, "user_history", "history_item_ids") or []
        tss = get_feature(f, "user_history", "history_ts") or []
        if len(ids) != len(tss):
            raise ValueError(f"user {b}: {len(ids)} history ids but {len(tss)} history timestamps")
        n = min(len(ids), c.history_length)
        items.extend(pos.get(str(i), -1) for i in ids[:n])
        ts.extend(float(t) for t in tss[:n])
        offsets.append(offsets[-1] + n)
        act[b] = [_as_float(get_feature(f, "user_activity", name)) for name in c.activity_features]
        prof_rows.append([get_feature(f, "user_profile", name) for name in c.profile_features])
    gap = act[:, list(c.activity_features).index("days_since_last_purchase")] if "days_since_last_purchase" in c.activity_features else np.zeros(len(features))
    hist = history_features(
        np.asarray(offsets), np.asarray(items, dtype=np.int64), np.asarray(ts), gap,
        history_length=c.history_length, half_lives_days=c.half_lives_days,
    )
    profile = encode_profile(prof_rows, c.profile_vocab, c.profile_features)
    u, rep, hitems = user_tensors(model, hist, user_dense(act, hist), profile)
    out = []
    for b in range(len(features)):
        m = hitems[b] >= 0
        out.append(UserQuery(u[b].copy(), hitems[b][m].copy(), rep[b][m].astype(np.float32), int(hist.n_lines[b])))
    return out


def user_query(model: RecModel, features: Mapping[str, Any]) -> UserQuery:
    """:func:`user_queries` for one user."""
    return user_queries(model, [features])[0]


@torch.no_grad()
def user_tensors(
    model: RecModel, hist: Any, dense: np.ndarray, profile: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User vectors ``[B, dim]``, repeat bonuses ``[B, H]`` and their item positions ``[B, H]`` (-1 = pad)."""
    model.eval()
    dev = model.pop_mean.device
    items, feats, mask = hist.padded(model.config.max_history_items)
    safe = torch.from_numpy(np.where(items >= 0, items, 0)).to(dev)
    emb = model.catalogue_text_embeddings(safe.reshape(-1)).reshape(*safe.shape, -1)
    id_rows = model.item_id_row[safe]
    vecs = model.item_vectors(emb, id_rows)
    u, rep = model.user_forward(
        vecs, torch.from_numpy(feats).to(dev), torch.from_numpy(mask).to(dev), id_rows,
        torch.from_numpy(dense).to(dev), torch.from_numpy(profile).to(dev),
    )
    return u.float().cpu().numpy(), rep.float().cpu().numpy(), items


@torch.no_grad()
def search_scores(model: RecModel, query: str) -> np.ndarray:
    """Cosine similarity ``[N]`` between a free-text query and every item's text (MiniLM space)."""
    q = model.encode_texts([query])[0]
    per_text = model.text_emb.float().cpu() @ q
    return per_text[model.item_text.cpu()].numpy()


def search(model: RecModel, query: str, k: int) -> list[tuple[str, float]]:
    """The ``k`` items whose text best matches ``query``."""
    s = search_scores(model, query)
    k = max(0, min(k, len(s)))
    if k == 0:
        return []
    top = np.argpartition(-s, k - 1)[:k]
    top = top[np.argsort(-s[top], kind="stable")]
    return [(model.item_ids[i], float(s[i])) for i in top]
