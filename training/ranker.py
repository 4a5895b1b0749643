"""Training the second stage: weekly (user, candidate) examples and a LightGBM ranker.

An example week is an anchor time ``a``: candidates and features are computed from the lines
before ``a`` (:mod:`recflow.ranker`), and a pair is positive when the user bought the item in
``[a, a + days)``. Training weeks lie before the validation week, which early-stops the booster;
test weeks are never seen. The item side (statistics, co-purchase matrix) is recomputed as of
each anchor, so every feature is out of sample for its week.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from recflow.ranker.candidates import (
    SOURCES,
    Candidates,
    ItemSide,
    generate,
    item_similarity,
    user_vectors,
)
from recflow.ranker.features import Context, item_stats, user_context
from recflow.ranker.log import DAY_S, PurchaseLog
from recflow.ranker.model import TEXT_FEATURES, Ranker, RankerConfig, bagged, feature_matrix, members

Progress = Callable[[str], None]


@dataclass
class ItemInputs:
    """Catalogue-level inputs of the item side: text embeddings and groups, categories."""

    text_emb: np.ndarray | None = None  # [T, d] L2-normalised
    item_text: np.ndarray | None = None  # [N]
    category: np.ndarray | None = None  # [N] int64, -1 unknown


def item_side_at(log: PurchaseLog, as_of: int, inputs: ItemInputs, neighbors: int = 100) -> ItemSide:
    """The item side of candidate generation as of ``as_of`` (from every user's lines before it)."""
    before = log.before(as_of)
    stats = item_stats(before, as_of, text_group=inputs.item_text, category=inputs.category)
    return ItemSide(stats, item_similarity(before, neighbors), inputs.text_emb, inputs.item_text,
                    user_vectors(before, as_of), before.user_ids)


def targets_of(log: PurchaseLog, start: int, days: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``(user, item)`` keys bought in ``[start, start + days)`` and the users with any."""
    w = log.window(start, start + days * DAY_S)
    keys = np.unique(w.user * log.n_items + w.item)
    return keys, np.unique(keys // log.n_items)


@dataclass
class Week:
    """One anchor's candidates, features and labels."""

    anchor: int
    ctx: Context
    side: ItemSide | None  # None once only the examples are kept (training weeks)
    users: np.ndarray  # evaluated users (codes of the log): a target in the week and a purchase before
    cands: Candidates
    x: np.ndarray
    y: np.ndarray
    target_keys: np.ndarray
    features: tuple[str, ...] = ()


def build_week(
    log: PurchaseLog, anchor: int, days: int, inputs: ItemInputs, cfg: RankerConfig, *, side: ItemSide | None = None,
    users: np.ndarray | None = None,
) -> Week:
    """Candidates and labelled features of the users active in ``[anchor, anchor + days)``."""
    side = side or item_side_at(log, anchor, inputs, cfg.candidates.neighbors)
    ctx = user_context(log, side.stats, anchor, inputs.category)
    keys, active = targets_of(log, anchor, days)
    has_history = ctx.users.n_lines > 0
    if users is None:
        users = active[has_history[active]]
    cands = generate(ctx, side, users, cfg.candidates)
    x = feature_matrix(ctx, cands, cfg.features)
    k = cands.user * log.n_items + cands.item
    y = np.isin(k, keys).astype(np.float32)
    return Week(anchor, ctx, side, users, cands, x, y, keys, cfg.features)


def _subsample(week: Week, share: float, rng: np.random.Generator, rows: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (of ``rows``, default all) of groups with a positive: every positive, ``share`` of the
    negatives; and the group sizes."""
    rows = np.arange(len(week.y)) if rows is None else rows
    u, y = week.cands.user[rows], week.y[rows]
    pos_users = np.unique(u[y > 0])
    in_group = np.isin(u, pos_users)
    keep = in_group & ((y > 0) | (rng.random(len(u)) < share))
    idx = rows[keep]
    _, sizes = np.unique(week.cands.user[idx], return_counts=True)
    return week.x[idx], week.y[idx], sizes


def _never_bought(week: Week, features: tuple[str, ...]) -> np.ndarray:
    return np.flatnonzero(week.x[:, features.index("ui_bought")] == 0)


def _bought(week: Week, features: tuple[str, ...]) -> np.ndarray:
    return np.flatnonzero(week.x[:, features.index("ui_bought")] > 0)


def _train(name: str, parts: list, val: tuple, cfg: RankerConfig, say: Progress, init: object = None,
           callbacks: tuple = ()) -> tuple[object, dict]:
    """One LightGBM booster on ``parts`` (x, y, group sizes), early-stopped on ``val``; with ``init``
    (a booster over the same features) boosting continues from it: new trees on top of its own.
    ``callbacks``: more LightGBM callbacks (the ranker search's report to Ray Tune)."""
    import lightgbm as lgb

    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    g = np.concatenate([p[2] for p in parts])
    vx, vy, vg = val
    names = list(cfg.features)
    rank = cfg.ranking
    dtrain = lgb.Dataset(x, y, group=g if rank else None, feature_name=names, free_raw_data=True)
    t = time.perf_counter()
    if len(vy) and vy.sum() > 0:
        dval = lgb.Dataset(vx, vy, group=vg if rank else None, reference=dtrain)
        booster = lgb.train(
            cfg.lgb_params(), dtrain, num_boost_round=cfg.max_rounds, valid_sets=[dval], valid_names=["validation"],
            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False), *callbacks], init_model=init,
        )
    else:  # no validation purchase to stop on: a fixed, small number of rounds
        say(f"{name}: the validation week has no usable purchase; training a fixed 50 rounds without early stopping")
        booster = lgb.train(cfg.lgb_params(), dtrain, num_boost_round=min(cfg.max_rounds, 50), init_model=init)
    secs = time.perf_counter() - t
    rounds = int(booster.best_iteration or booster.current_iteration())
    say(f"{name}: {len(y):,} training rows ({int(y.sum()):,} positive) in {len(g):,} groups, {rounds} rounds in {secs:.0f}s")
    gain = booster.feature_importance("gain")
    top = sorted(zip(names, gain, strict=True), key=lambda p: -p[1])[:8]
    metrics = {
        "best_iteration": rounds,
        **({"continued_from_trees": int(init.num_trees())} if init is not None else {}),
        "train_rows": int(len(y)),
        "train_groups": int(len(g)),
        "fit_seconds": round(secs, 1),
        "top_features_by_gain": {n: round(float(v), 1) for n, v in top},
    }
    return booster, metrics


def fit_ranker(train: list[Week], val: Week, cfg: RankerConfig, progress: Progress | None = None,
               init: Ranker | None = None) -> Ranker:
    """LightGBM on the training weeks (negatives subsampled), early-stopped on the validation week;
    with ``cfg.unseen_ranker``, a second booster on the never-bought candidates and new purchases;
    with ``cfg.seen_ranker``, a third on the re-buy candidates (the users' histories) and re-buys.
    With ``cfg.bag`` > 1, each booster is a bag of that many, trained with seeds ``cfg.seed``,
    ``cfg.seed + 1`` ... (own negatives, row and feature samples) and averaged.
    With ``init`` (a ranker over the same features), each booster continues from ``init``'s (member
    ``k`` from member ``k``): an incremental update on new weeks rather than a fit from scratch."""
    say = progress or (lambda _m: None)
    if init is not None and tuple(init.config.features) != tuple(cfg.features):
        raise ValueError("an incremental ranker update needs the same features as the ranker it continues from")
    init_main = members(init.booster) if init is not None else []
    init_unseen = members(init.unseen) if init is not None and init.unseen is not None else []
    init_seen = members(init.seen) if init is not None and init.seen is not None else []
    mains: list[object] = []
    unseens: list[object] = []
    seens: list[object] = []
    metrics: dict = {}
    for k in range(max(cfg.bag, 1)):
        c = replace(cfg, seed=cfg.seed + k)
        tag = f" {k + 1}/{cfg.bag}" if cfg.bag > 1 else ""
        rng = np.random.default_rng(c.seed)
        parts = [_subsample(w, c.negative_share, rng) for w in train]
        booster, m = _train("ranker" + tag, parts, _subsample(val, 1.0, rng), c, say, _member(init_main, k))
        mains.append(booster)
        if cfg.unseen_ranker and "ui_bought" in cfg.features:
            parts = [_subsample(w, c.negative_share, rng, _never_bought(w, c.features)) for w in train]
            if sum(int(p[1].sum()) for p in parts) > 0:
                unseen, mu = _train("ranker (never-bought items)" + tag, parts,
                                    _subsample(val, 1.0, rng, _never_bought(val, c.features)), c, say,
                                    _member(init_unseen, k))
                unseens.append(unseen)
                m["unseen"] = mu
            elif k == 0:
                say("ranker: no purchase new to a user in the training weeks; no second booster for never-bought items")
        if cfg.seen_ranker and "ui_bought" in cfg.features:  # after the unseen booster: its negatives stay as they were
            parts = [_subsample(w, c.negative_share, rng, _bought(w, c.features)) for w in train]
            if sum(int(p[1].sum()) for p in parts) > 0:
                seen, ms = _train("ranker (re-buys)" + tag, parts, _subsample(val, 1.0, rng, _bought(val, c.features)),
                                  c, say, _member(init_seen, k))
                seens.append(seen)
                m["seen"] = ms
            elif k == 0:
                say("ranker: no re-buy in the training weeks; no booster for re-buy candidates")
        if k == 0:
            metrics = m
        else:
            metrics.setdefault("bag_members", []).append(
                {"seed": c.seed, "best_iteration": m["best_iteration"], "fit_seconds": m["fit_seconds"],
                 **({"unseen_best_iteration": m["unseen"]["best_iteration"]} if "unseen" in m else {}),
                 **({"seen_best_iteration": m["seen"]["best_iteration"]} if "seen" in m else {})})
    unseen_booster = bagged(unseens) if len(unseens) == len(mains) else None
    seen_booster = bagged(seens) if len(seens) == len(mains) else None
    return Ranker(cfg, bagged(mains), metrics, unseen_booster, seen_booster)


def _member(boosters: list[object], k: int) -> object:
    """Member ``k`` of an initial bag to continue from (its first member when the bag is smaller; None without)."""
    return boosters[k] if k < len(boosters) else (boosters[0] if boosters else None)


def candidate_recall(week: Week, sold_before: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Share of the week's targets (of its evaluated users) that each source, and the union, contains,
    on the repeat, new and cold targets."""
    n = week.ctx.log.n_items
    users = week.users
    tk = week.target_keys[np.isin(week.target_keys // n, users)]
    t_item = tk % n
    seen = week.ctx.uis.lookup(tk) >= 0
    sold = week.side.stats.sold if sold_before is None else sold_before
    kinds = {"repeat": seen, "new": ~seen, "cold": ~sold[t_item]}
    ck = week.cands.user * n + week.cands.item
    out: dict[str, dict[str, float]] = {}
    srcs = {"union": np.ones(len(ck), bool)}
    for name in SOURCES:
        srcs[name] = week.cands.features[f"src_{name}"] > 0
    for sname, m in srcs.items():
        hit = np.isin(tk, ck[m])
        out[sname] = {k: round(float(hit[sel].mean()), 4) if sel.any() else 0.0 for k, sel in kinds.items()}
        out[sname]["all"] = round(float(hit.mean()), 4) if len(hit) else 0.0
    out["union"]["targets"] = int(len(tk))
    out["union"]["candidates_per_user"] = round(len(ck) / max(len(users), 1), 1)
    return out



def _without_sources(week: Week, features: tuple[str, ...], dropped: set[str], side: ItemSide | None) -> Week:
    """The week without the candidates only ``dropped`` sources found, with only ``features`` columns."""
    f = week.cands.features
    keep = np.any([f[f"src_{s}"] > 0 for s in SOURCES if s not in dropped], axis=0)
    names = list(week.features)
    cols = [names.index(n) for n in features]
    cands = Candidates(week.cands.user[keep], week.cands.item[keep], {k: v[keep] for k, v in f.items()})
    return Week(week.anchor, week.ctx, side, week.users, cands, week.x[keep][:, cols], week.y[keep], week.target_keys, tuple(features))


def without_text(week: Week, features: tuple[str, ...]) -> Week:
    """The week as a model without text would see it: no text-only candidates, only ``features`` columns
    (``recflow_no_text``; equal to generating with the text sources off)."""
    side = ItemSide(week.side.stats, week.side.similarity, user_vectors=week.side.user_vectors,
                    user_ids=week.side.user_ids) if week.side is not None else None
    return _without_sources(week, features, {s for s in SOURCES if f"src_{s}" in TEXT_FEATURES}, side)


def without_engagement(week: Week, features: tuple[str, ...]) -> Week:
    """The week as a model that reads purchases only would see it: no candidates only the users' views
    and carts found, only ``features`` columns (``recflow_no_engagement``)."""
    return _without_sources(week, features, {"engaged"}, week.side)
