"""The user tower for a batch of users, on the serving index's precomputed item vectors.

:func:`user_queries` computes what :func:`recflow.modeling.user_queries` computes, for the same
``serving_v1`` feature dicts, with three serving-side shortcuts:

- the history items' vectors are rows of ``ItemIndex.matrix`` (the item tower's output for every
  catalogue item, computed once at load) instead of re-running the item tower on up to
  ``max_history_items`` items per user per request;
- history ids are mapped to catalogue positions in one hash-table pass per batch
  (:class:`PositionLookup`, pandas) instead of a Python generator per user;
- the model is put in eval mode once, not on every call (that walks every submodule, the
  MiniLM encoder included).

The user MLP, attention pooling and repeat head are the model's own (``RecModel.user_forward``);
``tests/code/test_serving_units.py`` checks that the queries equal the model's.

:class:`UserQueryCache` keeps each user's last query while the user's feature rows are unchanged.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from recflow.modeling import UserQuery
from recflow.modeling.features import encode_profile, get_feature, history_features, user_dense

if TYPE_CHECKING:
    from recflow.modeling import ItemIndex, RecModel


class PositionLookup:
    """Catalogue positions of item ids (-1 when unknown) for a whole batch in one hash-table pass."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self._index = pd.Index(np.asarray([str(i) for i in item_ids], dtype=object))

    def __call__(self, ids: Sequence[Any]) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, np.int64)
        keys = ids if all(type(i) is str for i in ids[:1]) else [str(i) for i in ids]
        return self._index.get_indexer(np.asarray(keys, dtype=object)).astype(np.int64, copy=False)


def _as_float(v: Any) -> float:
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


@torch.inference_mode()
def user_queries(
    model: RecModel, index: ItemIndex, lookup: PositionLookup, features: Sequence[Mapping[str, Any]]
) -> list[UserQuery]:
    """One :class:`UserQuery` per feature dict (see the module docstring); ``lookup`` maps the
    ids of ``index.item_ids``."""
    c = model.config
    if model.training:
        model.eval()
    n_users = len(features)
    offsets = np.zeros(n_users + 1, np.int64)
    ids: list[Any] = []
    ts: list[Any] = []
    act = np.full((n_users, len(c.activity_features)), np.nan)
    prof_rows = []
    for b, f in enumerate(features):
        hid = get_feature(f, "user_history", "history_item_ids") or []
        hts = get_feature(f, "user_history", "history_ts") or []
        if len(hid) != len(hts):
            raise ValueError(f"user {b}: {len(hid)} history ids but {len(hts)} history timestamps")
        n = min(len(hid), c.history_length)
        ids.extend(hid[:n])
        ts.extend(hts[:n])
        offsets[b + 1] = offsets[b] + n
        act[b] = [_as_float(get_feature(f, "user_activity", name)) for name in c.activity_features]
        prof_rows.append([get_feature(f, "user_profile", name) for name in c.profile_features])
    gap_col = list(c.activity_features).index("days_since_last_purchase") if "days_since_last_purchase" in c.activity_features else None
    gap = act[:, gap_col] if gap_col is not None else np.zeros(n_users)
    hist = history_features(
        offsets, lookup(ids), np.asarray(ts, dtype=np.float64), gap,
        history_length=c.history_length, half_lives_days=c.half_lives_days,
    )
    profile = encode_profile(prof_rows, c.profile_vocab, c.profile_features)
    items, feats, mask = hist.padded(c.max_history_items)
    safe = torch.from_numpy(np.where(items >= 0, items, 0))
    matrix = torch.from_numpy(index.matrix)
    dev = model.pop_mean.device
    vecs = matrix[safe].to(dev, model.pop_mean.dtype)
    id_rows = model.item_id_row[safe.to(dev)]
    u, rep = model.user_forward(
        vecs, torch.from_numpy(feats).to(dev), torch.from_numpy(mask).to(dev), id_rows,
        torch.from_numpy(user_dense(act, hist)).to(dev), torch.from_numpy(profile).to(dev),
    )
    u_np, rep_np = u.float().cpu().numpy(), rep.float().cpu().numpy()
    out = []
    for b in range(n_users):
        m = items[b] >= 0
        out.append(UserQuery(u_np[b].copy(), items[b][m].copy(), rep_np[b][m].astype(np.float32), int(hist.n_lines[b])))
    return out


class UserQueryCache:
    """The user tower's last output per user, reused while the user's online feature rows are unchanged.

    A user's query is a function of the model and of the user's ``serving_v1`` rows alone, and every
    write of a row (materialisation, a feedback push) gives it a newer event timestamp, so the entry
    is keyed by those timestamps (``stamp_keys``): a changed row is a miss, and the next answer
    reflects it. Entries also expire after ``ttl_s`` (a rebuild that rewrote a row under the same
    timestamp is picked up within that time). At most ``max_users`` users (least recently used go
    first; 0 turns the cache off). One per loaded model; not thread-safe (the runtime calls it from
    its single compute thread).
    """

    def __init__(self, version: str, stamp_keys: Sequence[str], max_users: int, ttl_s: float) -> None:
        self.version = version
        self.stamp_keys = tuple(stamp_keys)
        self.max_users = max_users
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[str, tuple[tuple[Any, ...], float, UserQuery]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def queries(
        self, user_ids: Sequence[str], features: Sequence[Mapping[str, Any]],
        compute: Callable[[list[Mapping[str, Any]]], list[UserQuery]],
    ) -> list[UserQuery]:
        """One query per user: cached where the user's rows are unchanged, else ``compute`` (one call
        for all the misses)."""
        now = time.monotonic()
        out: list[UserQuery | None] = [None] * len(user_ids)
        stamps = [tuple(f.get(k) for k in self.stamp_keys) for f in features]
        missed = []
        for i, (user, stamp) in enumerate(zip(user_ids, stamps, strict=True)):
            entry = self._data.get(user) if self.max_users else None
            if entry is not None and entry[0] == stamp and now - entry[1] <= self.ttl_s:
                out[i] = entry[2]
                self._data.move_to_end(user)
            else:
                missed.append(i)
        self.hits += len(user_ids) - len(missed)
        self.misses += len(missed)
        if missed:
            for i, q in zip(missed, compute([features[i] for i in missed]), strict=True):
                out[i] = q
                if self.max_users:
                    self._data[user_ids[i]] = (stamps[i], now, q)
                    self._data.move_to_end(user_ids[i])
            while len(self._data) > self.max_users:
                self._data.popitem(last=False)
        return out  # type: ignore[return-value]
