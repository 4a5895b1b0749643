"""Top-k recommendations of the two-stage model for requests: the service's ranking path.

A request carries the user's online history (item ids and epoch-second timestamps, exactly what a
push appends) and its time. :func:`recommend` turns a batch of them into a :class:`PurchaseLog`,
scores every candidate with :func:`recflow.ranker.model.score_users` (the same function the
offline evaluation calls), applies the request's filters, and explains each pick from the
features that ranked it (:func:`reason_text`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from recflow.ranker.features import Context, user_context, user_features
from recflow.ranker.log import PurchaseLog
from recflow.ranker.model import Scored, TwoStage, score_users


@dataclass
class Ask:
    """One user's request: history lines, the request time, k and filters (catalogue positions)."""

    history_ids: Sequence[str]
    history_ts: Sequence[int]
    as_of: int
    k: int
    exclude_history: bool = False
    rows: np.ndarray | None = None
    user_id: str | None = None  # who asks (never their own neighbour); None: an anonymous history
    history_types: Sequence[str] | None = None  # each line's event type (None: all purchases); views and carts


@dataclass(frozen=True)
class Pick:
    """One recommended item and why: ``kind`` (repeat | similar | text | popular), the history item
    behind it (a position, or None) and the numbers a sentence quotes."""

    position: int
    score: float
    kind: str
    reason: int | None = None
    facts: dict[str, float] = field(default_factory=dict)


def history_log(model: TwoStage, asks: Sequence[Ask]) -> PurchaseLog:
    """The asks' histories as one log (user ``k`` = ``asks[k]``)."""
    ids = [a.user_id if a.user_id is not None else f"\x00anonymous-{n}" for n, a in enumerate(asks)]
    types = [a.history_types for a in asks] if any(a.history_types is not None for a in asks) else None
    return PurchaseLog.from_histories([(a.history_ids, a.history_ts) for a in asks], model.item_index, ids, types)


def score_asks(model: TwoStage, asks: Sequence[Ask]) -> tuple[PurchaseLog, list[Scored], list[np.ndarray], list[Context]]:
    """Scores of every candidate of every ask; asks with the same time are scored together (one
    context per time, with the users it scored)."""
    log = history_log(model, asks)
    times = np.array([a.as_of for a in asks], np.int64)
    parts: list[Scored] = []
    users_of: list[np.ndarray] = []
    contexts: list[Context] = []
    for t in np.unique(times):
        users = np.flatnonzero(times == t)
        ctx = user_context(log, model.side.stats, int(t), model.category)
        parts.append(score_users(model.ranker, ctx, model.side, users))
        users_of.append(users)
        contexts.append(ctx)
    return log, parts, users_of, contexts


def served_user_features(contexts: Sequence[Context], users_of: Sequence[np.ndarray], n: int) -> list[dict[str, float | None]]:
    """The user-level ranker features each of ``n`` asks was ranked with (JSON-ready: NaN -> None)."""
    out: list[dict[str, float | None]] = [{} for _ in range(n)]
    for ctx, users in zip(contexts, users_of, strict=True):
        values = user_features(ctx, users)
        for name, col in values.items():
            for u, v in zip(users.tolist(), col.tolist(), strict=True):
                out[u][name] = None if v != v else round(float(v), 6)
    return out


def recommend(model: TwoStage, asks: Sequence[Ask], features: list[dict[str, float | None]] | None = None) -> list[list[Pick]]:
    """Top ``k`` picks of every ask, best first (popular items fill up when candidates run short).
    With a ``features`` list, it is extended by the user-level ranker features of each ask
    (:func:`served_user_features`): what the service logs as served with."""
    if not asks:
        return []
    log, parts, users_of, contexts = score_asks(model, asks)
    if features is not None:
        features.extend(served_user_features(contexts, users_of, len(asks)))
    out: list[list[Pick]] = [[] for _ in asks]
    off = log.offsets()
    for sc in parts:
        c = sc.cands
        bounds = np.searchsorted(c.user, np.arange(len(asks) + 1))
        for u in np.unique(c.user):
            a = asks[u]
            lo, hi = bounds[u], bounds[u + 1]
            items, score = c.item[lo:hi], sc.score[lo:hi]
            keep = np.ones(hi - lo, bool)
            if a.exclude_history:
                keep &= c.features["src_history"][lo:hi] == 0
            if a.rows is not None:
                keep &= np.isin(items, a.rows)
            idx = np.flatnonzero(keep)
            idx = idx[np.argsort(-score[idx], kind="stable")[: a.k]]
            hist = np.unique(log.item[off[u]:off[u + 1]])
            out[u] = _explain(model, log, u, lo + idx, sc, hist)
    for u, a in enumerate(asks):
        if len(out[u]) < a.k:
            out[u] += _fill(model, a, out[u], np.unique(log.item[off[u]:off[u + 1]]))
    return out


def _fill(model: TwoStage, a: Ask, chosen: list[Pick], history: np.ndarray) -> list[Pick]:
    order = model.side.popular
    if a.rows is not None:
        order = order[np.isin(order, a.rows)]
    taken = {p.position for p in chosen}
    if a.exclude_history:
        taken |= set(history.tolist())
    picks = []
    for p in order[: a.k + len(taken)]:
        if int(p) not in taken:
            picks.append(Pick(int(p), 0.0, "popular", None, {"pop_30d": float(model.side.stats["item_pop_30d"][p])}))
            if len(chosen) + len(picks) >= a.k:
                break
    return picks


def _explain(model: TwoStage, log: PurchaseLog, u: int, rows: np.ndarray, sc: Scored, history: np.ndarray) -> list[Pick]:
    """Picks with the reason that ranked them: re-buy timing, co-purchase, text similarity or popularity."""
    f = sc.cands.features
    items = sc.cands.item[rows]
    picks: list[Pick] = []
    sim = model.side.similarity
    emb, it = model.side.text_emb, model.side.item_text
    for r, p in zip(rows.tolist(), items.tolist(), strict=True):
        score = float(sc.score[r])
        if f["src_history"][r] > 0:
            ts = log.ts[(log.user == u) & (log.item == p)]
            facts = {"times": float(len(np.unique(ts)))}
            if len(ts):
                facts["days_since_last"] = float((sc.as_of - ts.max()) / 86400)
            if len(np.unique(ts)) >= 2:
                facts["every_days"] = float((ts.max() - ts.min()) / 86400 / (len(np.unique(ts)) - 1))
            picks.append(Pick(int(p), score, "repeat", int(p), facts))
            continue
        if f["src_engaged"][r] > 0 and log.engaged is not None:
            e = log.engaged
            mine = (e.user == u) & (e.item == p) & (e.ts < sc.as_of)
            if mine.any():
                carted = mine & (e.kind == 2)
                last = e.ts[carted].max() if carted.any() else e.ts[mine].max()
                picks.append(Pick(int(p), score, "viewed", int(p), {"carted": float(carted.any()),
                                                                     "days_since": float((sc.as_of - last) / 86400)}))
                continue
        if f["src_cooccur"][r] > 0 and sim is not None and len(history):
            col = np.asarray(sim[history][:, p].todense()).ravel()
            if col.max() > 0:
                picks.append(Pick(int(p), score, "similar", int(history[int(np.argmax(col))]), {"cosine": float(col.max())}))
                continue
        if (f["src_text"][r] > 0 or f["src_cold"][r] > 0) and emb is not None and it is not None and len(history) and it[p] >= 0:
            hv = emb[np.maximum(it[history], 0)] @ emb[it[p]]
            kind_facts = {"cosine": float(hv.max()), "new": float(f["src_cold"][r] > 0)}
            picks.append(Pick(int(p), score, "text", int(history[int(np.argmax(hv))]), kind_facts))
            continue
        if f["src_neighbours"][r] > 0 and f["cand_ucf"][r] > 0:
            picks.append(Pick(int(p), score, "similar", None, {"neighbours": 1.0}))
            continue
        trending = f["src_trending"][r] > 0
        launched = f["src_new"][r] > 0
        picks.append(Pick(int(p), score, "popular", None, {"trending": float(trending), "launched": float(launched)}))
    return picks


def reason_text(pick: Pick, title_of: Callable[[int], str | None]) -> str:
    """A sentence a shopper or support agent understands, from the pick's facts."""
    f = pick.facts
    if pick.kind == "repeat":
        last = f.get("days_since_last")
        ago = "" if last is None else f"; last bought {_days(last)} ago"
        if "every_days" in f:
            return f"you buy this about every {_days(f['every_days'])}{ago}"
        return f"you bought this before{ago}"
    if pick.kind == "viewed":
        days = f.get("days_since", 0.0)
        when = "today" if round(days) <= 0 else f"{_days(days)} ago"
        return f"{'in your cart' if f.get('carted') else 'you looked at this'} {when}"
    other = title_of(pick.reason) if pick.reason is not None else None
    if pick.kind == "similar" and other:
        return f"often bought with {other}"
    if pick.kind == "similar" and f.get("neighbours"):
        return "shoppers who buy what you buy often buy this"
    if pick.kind == "text" and other:
        return f"{'new, ' if f.get('new') else ''}similar to {other}"
    if f.get("launched"):
        return "new in the shop and selling well"
    return "trending this week" if f.get("trending") else "popular this month"


def _days(d: float) -> str:
    n = max(int(round(d)), 0)
    return "1 day" if n == 1 else f"{n} days"
