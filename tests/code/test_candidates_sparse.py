"""The sparse candidate generator equals the dense (whole-catalogue) reference it replaced.

``_dense_reference`` is the previous implementation, kept here as the oracle: every source scored
over the whole catalogue as ``[batch, N]`` arrays. The side artifacts are random and continuous so
that no two scores tie at a top-k boundary (ties may be broken either way by either version).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from recflow.ranker.candidates import (
    CANDIDATE_FEATURES,
    SOURCES,
    CandidateConfig,
    Candidates,
    ItemSide,
    _history_matrix,
    generate,
)
from recflow.ranker.features import item_stats, user_context
from recflow.ranker.log import PurchaseLog


def _top_mask(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
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
    m = np.where(allowed, scores, -np.inf).max(axis=1, keepdims=True)
    return np.where(np.isfinite(m), m, 0.0)


def _dense_neighbours(side: ItemSide, h: sp.csr_matrix, user_ids: np.ndarray, k: int) -> np.ndarray:
    v = side.user_vectors
    norm = np.sqrt(np.asarray(h.multiply(h).sum(axis=1)).ravel())
    hn = sp.diags(1.0 / np.maximum(norm, 1e-12)) @ h
    sims = np.asarray((hn @ side._user_vectors_t).todense(), dtype=np.float32)
    me = side._user_row.get_indexer(np.asarray(user_ids).astype(str))
    ok = me >= 0
    sims[np.flatnonzero(ok), me[ok]] = -np.inf
    kk = min(k, sims.shape[1])
    val, idx = torch.topk(torch.from_numpy(sims), kk, dim=1)
    val = torch.clamp(val, min=0).numpy()
    w = sp.csr_matrix((val.reshape(-1), (np.repeat(np.arange(h.shape[0]), kk), idx.numpy().reshape(-1))), shape=sims.shape)
    tot = np.maximum(val.sum(axis=1), 1e-12)
    return (np.asarray((w @ v).todense(), dtype=np.float32) / tot[:, None]).astype(np.float32)


def _dense_reference(ctx, side: ItemSide, users: np.ndarray, cfg: CandidateConfig) -> Candidates:  # noqa: ANN001, PLR0915
    n = ctx.log.n_items
    b = len(users)
    h = _history_matrix(ctx, users)
    seen = h.toarray() > 0
    sold = side.stats.sold[None, :]
    flags = np.zeros((b, n), np.uint16)
    flags[seen] |= 1
    cf = np.asarray((h @ side.similarity).todense(), dtype=np.float32)
    flags[_top_mask(cf, ~seen & (cf > 0), cfg.n_cooccur)] |= 2
    pop_items = side.popular[: cfg.n_popular]
    flags[:, pop_items[side.stats["item_pop_30d"][pop_items] > 0]] |= 4
    tr = side.trend_order[: cfg.n_trending]
    flags[:, tr[side.stats["item_pop_7d"][tr] >= cfg.min_trending_lines]] |= 8
    prof = np.asarray((h @ side._item_to_text) @ side.text_emb, dtype=np.float32)
    prof = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
    tsc = prof @ side.text_emb.T
    it = text_row = np.asarray(side.item_text, dtype=np.int64)
    text = np.where(it[None, :] >= 0, tsc[:, np.maximum(it, 0)], -1.0).astype(np.float32)
    flags[_top_mask(text, ~seen & sold, cfg.n_text)] |= 16
    by_group = np.asarray((h @ side._item_to_text).todense(), dtype=np.float32)
    items_group = np.asarray(((h > 0).astype(np.float32) @ side._item_to_text).todense(), dtype=np.float32)
    group = np.where(it[None, :] >= 0, by_group[:, np.maximum(it, 0)], 0.0).astype(np.float32)
    cold_score = text + cfg.cold_prior_weight * side.cold_prior[None, :] + cfg.cold_group_weight * np.log1p(group)
    flags[_top_mask(cold_score, ~sold & (it[None, :] >= 0), cfg.n_cold)] |= 32
    ucf = _dense_neighbours(side, h, ctx.log.user_ids[users], cfg.user_neighbours)
    flags[_top_mask(ucf, ~seen & (ucf > 0), cfg.n_neighbour_items)] |= 64
    flags[:, side.new_items(cfg.new_days, cfg.n_new)] |= 128
    if cfg.n_engaged > 0 and ctx.eng is not None:  # the most recently viewed or carted items
        last = np.full((b, n), -np.inf)
        u_of = ctx.eng.key // n
        at = np.isin(u_of, users)
        last[np.searchsorted(users, u_of[at]), ctx.eng.key[at] % n] = ctx.eng.last[at]
        flags[_top_mask(last, ctx.as_of - last <= cfg.engaged_days * 86400, cfg.n_engaged)] |= 256
    rows, cols = np.nonzero(flags)
    f = flags[rows, cols]
    cf_max = np.maximum(cf.max(axis=1), 1e-12)
    text_max = _row_max(text, ~seen & sold)[:, 0]
    feats = {
        "cand_cf": cf[rows, cols], "cand_cf_rel": cf[rows, cols] / cf_max[rows],
        "cand_text": text[rows, cols], "cand_text_rel": text[rows, cols] - text_max[rows],
        "cand_ucf": ucf[rows, cols], "cand_ucf_rel": ucf[rows, cols] / np.maximum(ucf.max(axis=1), 1e-12)[rows],
        "cand_tgroup": group[rows, cols],
        "cand_tgroup_items": items_group[rows, np.maximum(text_row[cols], 0)] * (text_row[cols] >= 0),
    }
    for bit, name in enumerate(SOURCES):
        feats[f"src_{name}"] = ((f >> bit) & 1).astype(np.float32)
    return Candidates(users[rows], cols.astype(np.int64), {k: np.asarray(v, np.float32) for k, v in feats.items()})


def _random_side(log: PurchaseLog, as_of: int, seed: int, share_texts: bool) -> ItemSide:
    """Item statistics of the log, and random continuous co-purchase, text and neighbour artifacts."""
    rng = np.random.default_rng(seed)
    n = log.n_items
    stats = item_stats(log.before(as_of), as_of)
    sim = sp.random(n, n, density=0.08, random_state=seed, data_rvs=lambda k: rng.uniform(0.01, 1, k), format="csr")
    sim.setdiag(0)
    sim.eliminate_zeros()
    n_text = n // 2 if share_texts else n
    item_text = rng.permutation(np.arange(n) % n_text)
    item_text[rng.random(n) < 0.1] = -1  # some items have no text
    emb = rng.normal(size=(n_text, 12)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    uv = sp.random(log.n_users, n, density=0.1, random_state=seed + 1, data_rvs=lambda k: rng.uniform(0.01, 1, k),
                   format="csr", dtype=np.float32)
    norm = np.sqrt(np.asarray(uv.multiply(uv).sum(axis=1)).ravel())
    uv = sp.csr_matrix(sp.diags(1.0 / np.maximum(norm, 1e-12)) @ uv, dtype=np.float32)
    return ItemSide(stats, sim.astype(np.float32), emb, item_text, uv, np.asarray(log.user_ids).astype(str))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_candidates_equal_the_dense_reference(seed: int) -> None:
    from training.synthetic import synthetic_shop, with_views

    events, items = synthetic_shop(n_users=50, n_items=160, days=70, seed=seed)
    idx = pd.Index(items["item_id"].astype(str))
    log = PurchaseLog.from_events(with_views(events, seed), idx)  # views and carts: the engaged source
    as_of = int(pd.Timestamp("2024-02-26", tz="UTC").value // 10**9)  # late items are still unsold: cold
    side = _random_side(log, as_of, seed, share_texts=False)
    assert (~side.stats.sold).sum() > 5
    ctx = user_context(log, side.stats, as_of)
    cfg = CandidateConfig(n_cooccur=7, n_popular=5, n_trending=3, n_text=6, n_cold=4, n_neighbour_items=8,
                          user_neighbours=5, min_trending_lines=1, n_new=4, new_days=28, n_engaged=6)
    users = np.arange(log.n_users)
    got = generate(ctx, side, users, cfg, batch_size=16)
    parts = [_dense_reference(ctx, side, users[s:s + 16], cfg) for s in range(0, len(users), 16)]
    want = Candidates(np.concatenate([p.user for p in parts]), np.concatenate([p.item for p in parts]),
                      {f: np.concatenate([p.features[f] for p in parts]) for f in CANDIDATE_FEATURES})
    assert len(got) == len(want) > 0
    np.testing.assert_array_equal(got.user, want.user)
    np.testing.assert_array_equal(got.item, want.item)
    for name in CANDIDATE_FEATURES:
        np.testing.assert_allclose(got.features[name], want.features[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name in SOURCES:  # every source contributes
        assert got.features[f"src_{name}"].sum() > 0, name


def test_shared_texts_give_the_same_sets_of_text_scores() -> None:
    """With texts shared by several items, tied text scores may pick different items of a tied group,
    but each user's chosen text scores, and everything else, are the same."""
    from training.synthetic import synthetic_shop

    events, items = synthetic_shop(n_users=30, n_items=120, days=70, seed=5)
    idx = pd.Index(items["item_id"].astype(str))
    log = PurchaseLog.from_events(events, idx)
    as_of = int(pd.Timestamp("2024-02-26", tz="UTC").value // 10**9)
    side = _random_side(log, as_of, 5, share_texts=True)
    ctx = user_context(log, side.stats, as_of)
    cfg = CandidateConfig(n_text=6, n_cold=0, n_cooccur=0, n_popular=0, n_trending=0, n_neighbour_items=0)
    users = np.arange(log.n_users)
    got, want = generate(ctx, side, users, cfg), _dense_reference(ctx, side, users, cfg)
    for c in (got, want):
        assert c.features["src_text"].sum() == 6 * len(users)
    for u in users:
        g = np.sort(got.features["cand_text"][(got.user == u) & (got.features["src_text"] > 0)])
        w = np.sort(want.features["cand_text"][(want.user == u) & (want.features["src_text"] > 0)])
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.features["cand_text_rel"][got.user == u].max(),
                                   want.features["cand_text_rel"][want.user == u].max(), rtol=1e-5, atol=1e-6)


def test_new_source_is_the_best_sellers_among_recent_launches() -> None:
    from recflow.ranker.features import ItemStats
    from recflow.ranker.recommend import Pick, reason_text

    # item: 0 old best seller, 1 launch (3 sales), 2 launch (5 sales), 3 launch 20 days ago, 4 unsold
    age = np.array([300.0, 5.0, 13.0, 20.0, np.nan])
    pop = np.array([100.0, 3.0, 5.0, 9.0, 0.0])
    stats = ItemStats(0, {"item_age_d": age, "item_pop_all": pop, "item_pop_30d": pop, "item_pop_7d": pop,
                          "item_trend": np.ones(5), "item_text_pop_30d": pop})
    side = ItemSide(stats)
    assert side.new_items(14.0, 5).tolist() == [2, 1]
    assert side.new_items(14.0, 1).tolist() == [2]
    assert side.new_items(30.0, 5).tolist() == [3, 2, 1]
    text = reason_text(Pick(2, 1.0, "popular", None, {"trending": 0.0, "launched": 1.0}), lambda i: None)
    assert text == "new in the shop and selling well"
