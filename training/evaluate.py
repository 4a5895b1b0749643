"""Evaluation protocol: next-week purchases ranked over the full catalogue.

- Temporal split: models see events (and point-in-time features) before the evaluation anchor
  only; the targets of a user are the distinct items they bought in [anchor, anchor + 7 days).
- Users: those with at least one target and at least one purchase before the anchor.
- Every user ranks the whole catalogue (every item of the items table, sold or not); no sampled
  negatives.
- Metrics (binary relevance): NDCG@10, Recall@20 (hits / number of targets), HitRate@10, and
  catalogue coverage (share of the catalogue in at least one user's top 10). Slices:
  ``_repeat``: the full ranking, relevant = targets the user had bought before;
  ``_new``: the user's already-bought items removed from the ranking, relevant = targets new to
  the user (the issue's ``ndcg@10_new``); ``_cold``: the same seen-removed ranking, relevant =
  targets first sold at or after the anchor (items that no purchase history can know).

Everything is vectorised: scores come in user batches as a ``[b, N]`` tensor, and top-k runs in torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from training.data import Catalogue, UserRows, seen_before, to_utc

Scorer = Callable[[np.ndarray], torch.Tensor | np.ndarray]
"""Given row indices into an :class:`EvalSet`'s users, return scores ``[len(rows), N]``."""


@dataclass
class EvalSet:
    """The users of one evaluation week with their targets and already-bought items."""

    name: str
    anchor: pd.Timestamp
    rows: UserRows  # features as of the anchor and targets of the week
    seen_offsets: np.ndarray
    seen_items: np.ndarray
    cold: np.ndarray  # [N] bool: first sold at or after the anchor
    n_items: int

    def __len__(self) -> int:
        return len(self.rows)


def make_evalset(name: str, rows: UserRows, events: pd.DataFrame, catalogue: Catalogue, anchor: pd.Timestamp) -> EvalSet:
    """Keep the users of ``rows`` with targets and a purchase before ``anchor``; attach their seen items."""
    anchor = to_utc(anchor)
    s_off, s_items = seen_before(events, catalogue, rows.user_ids, anchor)
    has_seen = np.diff(s_off) > 0
    has_target = np.diff(rows.target_offsets) > 0
    keep = np.flatnonzero(has_seen & has_target)
    sub = rows.select(keep)
    off, idx = _csr_rows(s_off, keep)
    cold = catalogue.first_seen >= anchor.value // 1000 // 10**6
    return EvalSet(name, anchor, sub, off, s_items[idx], cold, len(catalogue))


def _csr_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts, ends = offsets[rows], offsets[rows + 1]
    lens = ends - starts
    new = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return new, np.repeat(starts - new[:-1], lens) + np.arange(new[-1])


def _dense(offsets: np.ndarray, items: np.ndarray, rows: np.ndarray, n: int) -> torch.Tensor:
    off, idx = _csr_rows(offsets, rows)
    m = torch.zeros(len(rows), n, dtype=torch.bool)
    r = np.repeat(np.arange(len(rows)), np.diff(off))
    m[torch.from_numpy(r), torch.from_numpy(items[idx])] = True
    return m


def _discounts(k: int) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)


def ndcg_at_k(top_rel: torch.Tensor, n_rel: torch.Tensor, k: int) -> torch.Tensor:
    """Binary NDCG@k per user from the relevance of the ranked top ``[b, >=k]`` and the number of relevant items."""
    d = _discounts(k)
    dcg = (top_rel[:, :k].double() * d).sum(1)
    ideal = torch.cumsum(d, 0)
    idcg = ideal[(n_rel.clamp(min=1, max=k) - 1).long()]
    return torch.where(n_rel > 0, dcg / idcg, torch.zeros_like(dcg))


def recall_at_k(top_rel: torch.Tensor, n_rel: torch.Tensor, k: int) -> torch.Tensor:
    """Hits in the top k / number of relevant items (0 when there are none)."""
    hits = top_rel[:, :k].double().sum(1)
    return torch.where(n_rel > 0, hits / n_rel.clamp(min=1).double(), torch.zeros_like(hits))


def hitrate_at_k(top_rel: torch.Tensor, k: int) -> torch.Tensor:
    """1 when at least one of the top k is relevant."""
    return top_rel[:, :k].any(1).double()


def evaluate(scorer: Scorer, ev: EvalSet, batch_size: int = 256, k: int = 10, k_recall: int = 20) -> dict[str, float]:
    """Metrics of ``scorer`` on ``ev`` (see the module docstring)."""
    n = ev.n_items
    kk = max(k, k_recall)
    cold = torch.from_numpy(ev.cold)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {"": 0, "_repeat": 0, "_new": 0, "_cold": 0}
    covered = torch.zeros(n, dtype=torch.bool)
    covered_new = torch.zeros(n, dtype=torch.bool)
    for s in range(0, len(ev), batch_size):
        rows = np.arange(s, min(s + batch_size, len(ev)))
        scores = scorer(rows)
        scores = torch.as_tensor(scores).float()
        if scores.shape != (len(rows), n):
            raise ValueError(f"scorer returned {tuple(scores.shape)}, expected {(len(rows), n)}")
        scores = torch.nan_to_num(scores, nan=-1e30, neginf=-1e30, posinf=1e30)
        tgt = _dense(ev.rows.target_offsets, ev.rows.targets, rows, n)
        seen = _dense(ev.seen_offsets, ev.seen_items, rows, n)
        top = torch.topk(scores, kk, dim=1).indices
        masked = scores.masked_fill(seen, -1e30)
        top_new = torch.topk(masked, kk, dim=1).indices
        covered[top[:, :k].reshape(-1)] = True
        covered_new[top_new[:, :k].reshape(-1)] = True
        slices = {
            "": (tgt, top),
            "_repeat": (tgt & seen, top),
            "_new": (tgt & ~seen, top_new),
            "_cold": (tgt & cold, top_new),
        }
        for name, (rel, ranking) in slices.items():
            n_rel = rel.sum(1)
            users = n_rel > 0
            top_rel = torch.gather(rel, 1, ranking)
            vals = {
                f"ndcg@{k}": ndcg_at_k(top_rel, n_rel, k),
                f"recall@{k_recall}": recall_at_k(top_rel, n_rel, k_recall),
                f"hitrate@{k}": hitrate_at_k(top_rel, k),
            }
            for m, v in vals.items():
                sums[m + name] = sums.get(m + name, 0.0) + float(v[users].sum())
            counts[name] += int(users.sum())
    out: dict[str, float] = {}
    for key, total in sums.items():
        slice_name = next(sl for sl in ("_repeat", "_new", "_cold") if key.endswith(sl)) if key.endswith(("_repeat", "_new", "_cold")) else ""
        out[key] = total / counts[slice_name] if counts[slice_name] else 0.0
    out["coverage"] = float(covered.double().mean())
    out["coverage_new"] = float(covered_new.double().mean())
    for name, c in counts.items():
        out["n_users" + name] = c
    out["n_items"] = n
    return out
