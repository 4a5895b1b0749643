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
  targets first sold at or after ``cold_since`` (the protocol's cutoff: items the trained model never
  saw sold; by default the week's anchor); ``_unsold``: the same, relevant = targets never sold before
  the week's anchor (items that no purchase history can know; equal to ``_cold`` when
  ``cold_since`` is the anchor).

Everything is vectorised: scores come in user batches as a ``[b, N]`` tensor, and top-k runs in torch.
``evaluate(..., per_user=True)`` also returns every user's metrics; :func:`paired_bootstrap` turns
two models' per-user metrics (one or several weeks) into a confidence interval of their difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from training.examples import Catalogue, UserRows, seen_before, to_utc

SLICES = ("_repeat", "_new", "_cold", "_unsold")
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
    cold: np.ndarray  # [N] bool: first sold at or after cold_since (the cutoff)
    n_items: int
    unsold: np.ndarray | None = None  # [N] bool: first sold at or after the anchor (None: same as cold)

    def __len__(self) -> int:
        return len(self.rows)


def make_evalset(name: str, rows: UserRows, events: pd.DataFrame, catalogue: Catalogue, anchor: pd.Timestamp,
                 cold_since: pd.Timestamp | None = None) -> EvalSet:
    """Keep the users of ``rows`` with targets and a purchase before ``anchor``; attach their seen items.

    ``cold_since``: items first sold at or after it form the ``_cold`` slice (default: ``anchor``).
    """
    anchor = to_utc(anchor)
    since = anchor if cold_since is None else to_utc(cold_since)
    if since > anchor:
        raise ValueError(f"make_evalset({name!r}): cold_since {since} is after the week's anchor {anchor}")
    s_off, s_items = seen_before(events, catalogue, rows.user_ids, anchor)
    has_seen = np.diff(s_off) > 0
    has_target = np.diff(rows.target_offsets) > 0
    keep = np.flatnonzero(has_seen & has_target)
    sub = rows.select(keep)
    off, idx = _csr_rows(s_off, keep)
    unsold = catalogue.first_seen >= anchor.value // 10**9
    cold = catalogue.first_seen >= since.value // 10**9
    return EvalSet(name, anchor, sub, off, s_items[idx], cold, len(catalogue), unsold)


def _csr_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts, ends = offsets[rows], offsets[rows + 1]
    lens = ends - starts
    new = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return new, np.repeat(starts - new[:-1], lens) + np.arange(new[-1])


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


def _pair_keys(offsets: np.ndarray, items: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Sorted distinct ``position in rows * n + item`` of the CSR rows ``rows``."""
    off, idx = _csr_rows(offsets, rows)
    keys = np.repeat(np.arange(len(rows)), np.diff(off)) * n + items[idx]
    return keys if bool(np.all(keys[1:] > keys[:-1])) else np.unique(keys)  # usually sorted already


def _isin_sorted(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.isin(q, keys)`` for sorted ``keys``."""
    if not len(keys):
        return np.zeros(q.shape, dtype=bool)
    return keys[np.minimum(np.searchsorted(keys, q), len(keys) - 1)] == q


def _member(keys: np.ndarray, top: torch.Tensor, n: int) -> torch.Tensor:
    """``[b, k]`` bool: is ``(row, top[row, j])`` among the sorted pair ``keys``."""
    return torch.from_numpy(_isin_sorted(np.arange(len(top))[:, None] * n + top.numpy(), keys))


def evaluate(
    scorer: Scorer, ev: EvalSet, batch_size: int = 256, k: int = 10, k_recall: int = 20, per_user: bool = False
) -> dict[str, Any]:
    """Metrics of ``scorer`` on ``ev`` (see the module docstring).

    ``per_user``: also return ``out["per_user"]``: ``user_ids`` (aligned with ``ev.rows.user_ids``)
    and, for every metric and slice (``ndcg@10``, ``ndcg@10_new``, ...), a float64 array with NaN
    where the user has no relevant item in that slice (the users left out of that slice's mean).
    """
    n = ev.n_items
    kk = max(k, k_recall)
    # copies: the eval set may arrive read-only (Ray's object store), which torch.from_numpy warns about
    cold = torch.tensor(ev.cold)
    unsold = cold if ev.unsold is None else torch.tensor(ev.unsold)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {"": 0, "_repeat": 0, "_new": 0, "_cold": 0, "_unsold": 0}
    covered = torch.zeros(n, dtype=torch.bool)
    covered_new = torch.zeros(n, dtype=torch.bool)
    metric_names = (f"ndcg@{k}", f"recall@{k_recall}", f"hitrate@{k}")
    per = {m + sl: np.full(len(ev), np.nan) for m in metric_names for sl in counts} if per_user else {}
    # Targets and seen items stay sparse (sorted row * N + item keys): only the scores are [b, N], in
    # one buffer reused across batches (a fresh large tensor per batch costs its page faults).
    buf = torch.empty(min(batch_size, len(ev)), n)
    for s in range(0, len(ev), batch_size):
        rows = np.arange(s, min(s + batch_size, len(ev)))
        scores = scorer(rows)
        scores = torch.as_tensor(scores).float()
        if scores.shape != (len(rows), n):
            raise ValueError(f"scorer returned {tuple(scores.shape)}, expected {(len(rows), n)}")
        scores = torch.nan_to_num(scores, nan=-1e30, neginf=-1e30, posinf=1e30, out=buf[: len(rows)])
        tgt = _pair_keys(ev.rows.target_offsets, ev.rows.targets, rows, n)
        seen = _pair_keys(ev.seen_offsets, ev.seen_items, rows, n)
        top = torch.topk(scores, kk, dim=1).indices
        scores[torch.from_numpy(seen // n), torch.from_numpy(seen % n)] = -1e30  # seen removed (our copy)
        top_new = torch.topk(scores, kk, dim=1).indices
        covered[top[:, :k].reshape(-1)] = True
        covered_new[top_new[:, :k].reshape(-1)] = True
        # relevance of the ranked top (rel[:, top] for rel = targets & seen etc.) and the number of
        # relevant items per slice, both from the sparse keys
        tgt_top, tgt_new = _member(tgt, top, n), _member(tgt, top_new, n)
        slices = {
            "": tgt_top,
            "_repeat": tgt_top & _member(seen, top, n),
            "_new": tgt_new & ~_member(seen, top_new, n),
            "_cold": tgt_new & cold[top_new],
            "_unsold": tgt_new & unsold[top_new],
        }
        t_row = torch.from_numpy(tgt // n)
        t_seen = torch.from_numpy(_isin_sorted(tgt, seen))
        t_items = torch.from_numpy(tgt % n)
        t_cold, t_unsold = cold[t_items], unsold[t_items]
        # cold targets the user bought before (between the cutoff and the week) are re-buys, not cold
        n_rels = {"": t_row, "_repeat": t_row[t_seen], "_new": t_row[~t_seen], "_cold": t_row[t_cold & ~t_seen],
                  "_unsold": t_row[t_unsold & ~t_seen]}
        for name, top_rel in slices.items():
            n_rel = torch.bincount(n_rels[name], minlength=len(rows))
            users = n_rel > 0
            vals = {
                f"ndcg@{k}": ndcg_at_k(top_rel, n_rel, k),
                f"recall@{k_recall}": recall_at_k(top_rel, n_rel, k_recall),
                f"hitrate@{k}": hitrate_at_k(top_rel, k),
            }
            for m, v in vals.items():
                sums[m + name] = sums.get(m + name, 0.0) + float(v[users].sum())
                if per_user:
                    per[m + name][rows] = torch.where(users, v, torch.full_like(v, float("nan"))).numpy()
            counts[name] += int(users.sum())
    out: dict[str, Any] = {}
    for key, total in sums.items():
        slice_name = next((sl for sl in SLICES if key.endswith(sl)), "")
        out[key] = total / counts[slice_name] if counts[slice_name] else 0.0
    out["coverage"] = float(covered.double().mean())
    out["coverage_new"] = float(covered_new.double().mean())
    for name, c in counts.items():
        out["n_users" + name] = c
    out["n_items"] = n
    if per_user:
        out["per_user"] = {"user_ids": np.asarray(ev.rows.user_ids).astype(str), **per}
    return out


def paired_bootstrap(
    a: np.ndarray | list[tuple[np.ndarray, np.ndarray]],
    b: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap of ``mean(a - b)`` over users (percentile interval at level ``ci``).

    ``a`` and ``b`` are per-user metrics of two models on the same users (pairs with a NaN are
    dropped). With a list of ``(a, b)`` pairs, one per week, users are resampled within each week
    and the statistic is the mean over weeks of the weekly mean differences (stratified bootstrap).
    Returns ``mean_diff``, ``ci95_lo``, ``ci95_hi`` (the bounds at level ``ci``) and ``n_users``.
    """
    weeks = [(a, b)] if b is not None else list(a)  # type: ignore[arg-type]
    diffs = []
    for wa, wb in weeks:
        wa, wb = np.asarray(wa, dtype=np.float64), np.asarray(wb, dtype=np.float64)
        if wa.shape != wb.shape:
            raise ValueError(f"paired_bootstrap: a has shape {wa.shape}, b {wb.shape}")
        d = wa - wb
        d = d[~np.isnan(d)]
        if len(d):
            diffs.append(d)
    n_users = int(sum(len(d) for d in diffs))
    if not diffs:
        return {"mean_diff": float("nan"), "ci95_lo": float("nan"), "ci95_hi": float("nan"), "n_users": 0}
    rng = np.random.default_rng(seed)
    stat = np.zeros(n_resamples)
    for d in diffs:
        step = max(1, (1 << 22) // len(d))  # resamples per chunk: at most ~4M indices at once
        for lo in range(0, n_resamples, step):
            idx = rng.integers(0, len(d), size=(min(step, n_resamples - lo), len(d)))
            stat[lo : lo + len(idx)] += d[idx].mean(1)
    stat /= len(diffs)
    q = (1.0 - ci) / 2.0
    lo_q, hi_q = np.quantile(stat, [q, 1.0 - q])
    mean = float(np.mean([d.mean() for d in diffs]))
    return {"mean_diff": mean, "ci95_lo": float(lo_q), "ci95_hi": float(hi_q), "n_users": n_users}
