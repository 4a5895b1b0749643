"""The two-stage pipeline a flow or a benchmark chains: inputs, weekly examples, ranker, evaluation.

No Feast, Prefect or BentoML: the inputs are the canonical events and items and the cached MiniLM
vectors of the items' unique texts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recflow.modeling.build import unique_texts
from recflow.ranker.log import PurchaseLog
from recflow.ranker.model import (
    ENGAGED_FEATURES,
    FEATURES,
    TEXT_FEATURES,
    Ranker,
    RankerConfig,
    Scored,
    TwoStage,
    score_users,
)
from recflow.schemas import LOG_COLUMNS
from training.evaluate import EvalSet, Scorer
from training.examples import Catalogue
from training.protocol import Protocol
from training.ranker import ItemInputs, Week, build_week, fit_ranker, item_side_at

if TYPE_CHECKING:
    from recflow.settings import Settings, TrainingSettings

Progress = Callable[[str], None]


def seconds(ts: pd.Timestamp) -> int:
    return int(pd.Timestamp(ts).value // 10**9)


@dataclass
class Inputs:
    """The shop as the two-stage model sees it: catalogue, purchase log and item-side inputs."""

    catalogue: Catalogue
    log: PurchaseLog
    items: ItemInputs

    @classmethod
    def build(cls, events: pd.DataFrame, items: pd.DataFrame, text_emb: np.ndarray | None) -> Inputs:
        """``text_emb`` rows follow ``unique_texts`` of the catalogue's texts (None: no text features)."""
        cat = Catalogue.from_items(items)
        log = PurchaseLog.from_events(events, cat.index)
        category = None
        for col in ("category", "department"):
            if col in items.columns and items[col].notna().any():
                category = pd.factorize(items[col])[0].astype(np.int64)
                break
        emb = it = None
        if text_emb is not None:
            _, rows = unique_texts(cat.texts)
            it = np.asarray(rows, np.int64)
            e = np.asarray(text_emb, np.float32)
            emb = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            blank = np.array([not t.strip() for t in cat.texts])
            it[blank] = -1  # an item without text has no text vector
        return cls(cat, log, ItemInputs(emb, it, category))




def load_shop(settings: Settings, *, text: bool = True, progress: Progress | None = None
              ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None]:
    """A home's canonical events (the columns the two-stage model reads) and items, and the MiniLM
    vectors of the items' unique texts (cached under the home; None without ``text``)."""
    from training.pipeline import text_embeddings

    say = progress or (lambda _m: None)
    events = pd.read_parquet(settings.paths.events, columns=list(LOG_COLUMNS))
    items = pd.read_parquet(settings.paths.items)
    emb = None
    if text:
        emb, info = text_embeddings(items, settings.paths.cache, max_length=settings.training.text_max_length, progress=say)
        say(f"MiniLM vectors of {info['unique_texts']:,} unique texts ({'cached' if info['cache_hit'] else 'encoded'})")
    return events, items, emb


ENGAGED_CANDIDATES = 50  # the engaged source's items per user where the events hold views or carts


def config_for(inputs: Inputs, **overrides: Any) -> RankerConfig:
    """The default config, adapted to the shop: without text vectors the text features are left out;
    where the events hold views or carts the ranker reads them too (the engaged candidates and
    :data:`~recflow.ranker.model.ENGAGED_FEATURES`)."""
    cfg = RankerConfig(**overrides)
    if inputs.items.text_emb is None:
        cfg.features = tuple(f for f in cfg.features if f not in TEXT_FEATURES)
    if inputs.log.has_engagement and "features" not in overrides:
        cfg.features = (*cfg.features, *(f for f in ENGAGED_FEATURES if f not in cfg.features))
        if "candidates" not in overrides:
            cfg.candidates = replace(cfg.candidates, n_engaged=ENGAGED_CANDIDATES)
    return cfg


@dataclass
class Fit:
    """A trained ranker with the validation week it was early-stopped on."""

    ranker: Ranker
    validation: Week
    seconds: dict[str, float] = field(default_factory=dict)


def fit(inputs: Inputs, protocol: Protocol, cfg: RankerConfig, progress: Progress | None = None,
        init: Ranker | None = None, search: dict[str, Any] | None = None) -> Fit:
    """Weekly examples at every training anchor, then LightGBM early-stopped on the validation week
    (continued from ``init``'s boosters when given: :func:`training.ranker.fit_ranker`). With
    ``search`` (keyword arguments of :func:`training.ranker_search.search_ranker`: ``trials``,
    ``max_minutes`` ...), a Ray Tune search on the same weeks picks the LightGBM settings first; its
    record is ``ranker.metrics["search"]``."""
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    weeks = []
    for a in protocol.train:
        w = build_week(inputs.log, seconds(a), protocol.days, inputs.items, cfg)
        w.side = None  # only the examples are needed from here: free the item side's matrices
        weeks.append(w)
        say(f"examples as of {a.date()}: {len(w.users):,} users, {len(w.y):,} candidates, {int(w.y.sum()):,} bought")
    val = build_week(inputs.log, seconds(protocol.validation), protocol.days, inputs.items, cfg)
    usable = [w for w in weeks if (w.y > 0).any()]
    if not usable:
        raise ValueError(
            f"two-stage ranker: none of the {len(weeks)} training weeks before {protocol.validation.date()} has a "
            "purchase by a user who bought before it; give it more history (an earlier --cutoff or fewer "
            "training.ranker_train_weeks) or serve the two-tower model (training.ranker=false)")
    if len(usable) < len(weeks):
        say(f"{len(weeks) - len(usable)} training week(s) without a usable purchase left out")
    timings = {"examples": round(time.perf_counter() - t0, 1)}
    found = None
    if search:
        from training.ranker_search import search_ranker

        t1 = time.perf_counter()
        found = search_ranker(usable, val, cfg, progress=say, **search)
        cfg = found.config
        timings["search"] = round(time.perf_counter() - t1, 1)
    t1 = time.perf_counter()
    ranker = fit_ranker(usable, val, cfg, progress=say, init=init)
    if found is not None:
        ranker.metrics["search"] = found.summary()
    timings["fit"] = round(time.perf_counter() - t1, 1)
    return Fit(ranker, val, timings)


def final_model(inputs: Inputs, ranker: Ranker, as_of: int) -> TwoStage:
    """The servable model: the ranker with the item side as of ``as_of`` (the data end)."""
    side = item_side_at(inputs.log, as_of, inputs.items, ranker.config.candidates.neighbors)
    return TwoStage(ranker, side, inputs.catalogue.item_ids, inputs.items.category)


def refresh(model: TwoStage, events: pd.DataFrame, as_of: int) -> TwoStage:
    """The same ranker with its item side (statistics, co-purchase) recomputed from ``events`` as of
    ``as_of``: what an incremental retrain carries forward, since fresh features, not new weights,
    are what moves next-basket quality."""
    log = PurchaseLog.from_events(events, model.item_index)
    inputs = ItemInputs(model.side.text_emb, model.side.item_text, model.category)
    side = item_side_at(log, as_of, inputs, model.ranker.config.candidates.neighbors)
    return TwoStage(model.ranker, side, model.item_ids, model.category)


def week_scorer(
    inputs: Inputs, ranker: Ranker | None, ev: EvalSet, cfg: RankerConfig, week: Week | None = None,
) -> tuple[Scorer, Week]:
    """A dense scorer of ``ev``'s users for :func:`training.evaluate.evaluate`: the ranker's scores on
    its candidates (``ranker=None``: candidates ordered by one score, ``recflow_no_ranker``), every
    other item far below in popularity order."""
    users = pd.Index(inputs.log.user_ids).get_indexer(ev.rows.user_ids)
    if (users < 0).any():
        raise ValueError(f"{ev.name}: {int((users < 0).sum())} evaluated users have no purchase in the log")
    w = week or build_week(inputs.log, seconds(ev.anchor), 7, inputs.items, cfg, users=users)
    if ranker is not None and week is not None:
        sc = Scored(w.cands, ranker.score(w.x, w.cands.user), w.anchor)
    else:
        sc = score_users(ranker, w.ctx, w.side, users, candidates=cfg.candidates)
    fill = (1e-6 * np.log1p(w.side.stats["item_pop_30d"])).astype(np.float32)
    n = len(inputs.catalogue)

    def score(rows: np.ndarray) -> np.ndarray:
        return Scored(sc.cands, sc.score, sc.as_of).dense(users[rows], n, fill) if len(rows) else np.zeros((0, n), np.float32)

    return score, w


def inputs_for(model: TwoStage, catalogue: Catalogue, events: pd.DataFrame) -> Inputs:
    """The inputs of a saved two-stage model's catalogue (its text vectors and categories) over
    ``events``: what a retrain refits and evaluates on (ValueError when the catalogue changed)."""
    if [str(i) for i in catalogue.item_ids] != [str(i) for i in model.item_ids]:
        raise ValueError("the two-stage champion's catalogue differs from the items table (items were added or "
                         "removed): its ranker cannot be updated in place; run a full retrain: recflow retrain --full")
    log = PurchaseLog.from_events(events, catalogue.index)
    return Inputs(catalogue, log, ItemInputs(model.side.text_emb, model.side.item_text, model.category))


def refit(inputs: Inputs, champion: Ranker, gate_week: pd.Timestamp, weeks: int, days: int, *, incremental: bool,
          progress: Progress | None = None) -> Fit:
    """A challenger for ``champion``: its config on ``weeks`` weekly anchors that end before the gate
    week, early-stopped on the week just before it, so the gate week stays unseen. Incremental:
    boosting continues from the champion's trees; full: a fresh fit."""
    protocol = Protocol.make(pd.Timestamp(gate_week) - pd.Timedelta(days=days), weeks, 1, days)
    return fit(inputs, protocol, champion.config, progress, init=champion if incremental else None)


def week_metrics(inputs: Inputs, ranker: Ranker, ev: EvalSet, per_user: bool = False) -> dict[str, Any]:
    """Full-catalogue metrics of ``ranker`` on ``ev``, features as of the week's start (with
    ``per_user``, also ``evaluate``'s per-user arrays under ``per_user``)."""
    from training.evaluate import evaluate

    scorer, _ = week_scorer(inputs, ranker, ev, ranker.config)
    out = evaluate(scorer, ev, per_user=per_user)
    return {k: (v if k == "per_user" else float(v)) for k, v in out.items()}


__all__ = ["FEATURES", "Fit", "Inputs", "config_for", "final_model", "fit", "inputs_for", "refit", "refresh", "week_metrics",
           "week_scorer"]


def ranker_search_args(t: TrainingSettings, storage_path: str | None = None) -> dict[str, Any] | None:
    """:func:`fit`'s ``search`` from the settings: None unless ``training.ranker_trials`` > 0. Ray
    Tune's files go under ``storage_path`` (default: a new temporary folder)."""
    if t.ranker_trials <= 0:
        return None
    import tempfile

    return {"trials": t.ranker_trials, "max_minutes": t.ranker_max_minutes, "seed": t.seed, "searcher": t.searcher,
            "cpus_per_trial": max(1, int(t.cpus_per_trial)),
            "storage_path": storage_path or tempfile.mkdtemp(prefix="recflow-ranker-tune-")}


def train_and_score(events: pd.DataFrame, items: pd.DataFrame, emb: np.ndarray, cutoff: pd.Timestamp, data: Any,
                    t: TrainingSettings, progress: Progress | None = None,
                    warn: Callable[[str], None] | None = None, storage_path: str | None = None) -> dict[str, Any] | None:
    """The train flow's two-stage model: candidates + LightGBM ranker on ``t.ranker_train_weeks``
    weekly anchors before ``cutoff``, early-stopped on the validation week, scored on ``data``'s test
    week (its validation week without one), and the servable model with the item side as of the data
    end. Returns ``{model, metrics, seconds}``, or None (after ``warn``) when the data is too short for
    weekly examples."""
    from training.evaluate import evaluate
    from training.protocol import check_users

    say = progress or (lambda _m: None)
    warn = warn or say
    inputs = Inputs.build(events, items, emb)
    protocol = Protocol.make(cutoff, t.ranker_train_weeks, 1, t.eval_days)
    cfg = config_for(inputs, seed=t.seed, bag=t.ranker_bag, launch_slots=tuple(t.launch_slots), launch_days=t.launch_days,
                     seen_ranker=t.ranker_seen_booster)
    try:
        fitted = fit(inputs, protocol, cfg, progress=progress, search=ranker_search_args(t, storage_path))
    except ValueError as exc:  # too little history for weekly examples: serve the two-tower model
        warn(str(exc))
        return None
    ev = data.test if data.test is not None else data.val
    for warning in check_users([data.val, ev]):
        warn(warning)
    week = fitted.validation if ev is data.val else None
    scorer, _ = week_scorer(inputs, fitted.ranker, ev, cfg, week)
    metrics = evaluate(scorer, ev)
    fitted.ranker.metrics[ev.name] = {k: round(float(v), 6) for k, v in metrics.items()}
    say(f"two-stage {ev.name} NDCG@10 {metrics['ndcg@10']:.4f}; {fitted.ranker.metrics.get('best_iteration')} rounds")
    end = seconds(pd.Timestamp(data.window["data_end"]))
    return {"model": final_model(inputs, fitted.ranker, end), "metrics": metrics, "seconds": fitted.seconds}


def retrain_and_score(champion: TwoStage, events: pd.DataFrame, data: Any, cutoff: pd.Timestamp, end: pd.Timestamp,
                      full: bool, t: TrainingSettings, progress: Progress | None = None,
                      warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The retrain flow's two-stage challenger: ``champion``'s ranker refitted (incrementally on
    ``t.retrain_recent_weeks``, or fully on ``t.ranker_train_weeks``) before ``cutoff``, and both
    rankers' metrics on ``data``'s gate week. None (after ``warn``) when the window is too short for
    weekly examples: the champion's ranker is then carried over."""
    say = progress or (lambda _m: None)
    inputs = inputs_for(champion, data.catalogue, events)
    weeks = t.ranker_train_weeks if full else t.retrain_recent_weeks
    try:
        fitted = refit(inputs, champion.ranker, cutoff, weeks, t.eval_days, incremental=not full, progress=progress)
    except ValueError as exc:
        (warn or say)(f"two-stage challenger not trained ({exc}): the champion's ranker is carried over")
        return None
    champion_metrics = week_metrics(inputs, champion.ranker, data.val)
    challenger_metrics = week_metrics(inputs, fitted.ranker, data.val)
    say(f"two-stage gate week: champion NDCG@10 {champion_metrics['ndcg@10']:.4f}, "
        f"challenger {challenger_metrics['ndcg@10']:.4f} ({'full' if full else 'incremental'}, {weeks} weeks)")
    return {"champion": champion_metrics, "challenger": challenger_metrics, "weeks": weeks,
            "model": final_model(inputs, fitted.ranker, seconds(end)), "seconds": fitted.seconds,
            "ranker": fitted.ranker.metrics}
