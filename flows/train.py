"""Prefect flow ``train``: training set (Feast) -> text embeddings -> Ray Tune -> test week -> registry.

Thin: the work is in ``training/`` (data, model fitting, search, evaluation), ``recflow.features``
(the point-in-time training set) and ``recflow.registry`` (BentoML store and champion pointer).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from recflow.progress import report
from recflow.schemas import LOG_COLUMNS
from recflow.settings import Settings, flow_settings


def _log(message: str) -> None:
    """To the run's log (Prefect API and UI) and to the CLI's progress line."""
    get_run_logger().info(message)
    report("train", message=message)


@task(name="load-tables", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_tables_task(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Canonical events and items, and the item popularity feature table."""
    paths = settings.paths
    for p in (paths.events, paths.items, paths.feature_table("item_popularity")):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: run `recflow features` (ingest + feature tables) first")
    events = pd.read_parquet(paths.events, columns=list(LOG_COLUMNS))
    items = pd.read_parquet(paths.items)
    popularity = pd.read_parquet(paths.feature_table("item_popularity"))
    _log(f"{len(events):,} events, {len(items):,} items, {len(popularity):,} item popularity rows")
    return events, items, popularity


@task(name="training-set", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def training_set_task(settings: Settings, entities: pd.DataFrame) -> str:
    """Point-in-time user features of ``training_v1`` for every (user, anchor week), via Feast."""
    from recflow.features.training_set import build_training_set

    out = settings.paths.training_sets / f"{settings.feast.training_service}_weekly.parquet"
    result = build_training_set(settings, entities, out_path=out)
    _log(f"training set: {result.rows:,} rows in {result.seconds:.1f}s ({result.lookups} lookups) -> {result.path}")
    return str(result.path)


@task(name="text-states", retries=1, cache_policy=NO_CACHE)
def text_states_task(settings: Settings, items: pd.DataFrame) -> Any:
    """MiniLM's lower-layer token states of the unique texts (cached once) when the top layers fine-tune."""
    t = settings.training
    if t.encoder_mode != "top_k":
        return None
    from training.pipeline import text_states

    states, info = text_states(items, settings.paths.cache, t.unfrozen_layers, max_length=t.text_max_length,
                               progress=_log)
    _log(f"MiniLM states after layer {info['layer']} of {info['unique_texts']:,} texts ({info['tokens']:,} tokens, "
         f"{info['megabytes']:.0f} MB; {'cache hit' if info['cache_hit'] else 'encoded'}, {info['seconds']:.1f}s)")
    return states


@task(name="text-embeddings", retries=1, cache_policy=NO_CACHE)
def text_embeddings_task(settings: Settings, items: pd.DataFrame, states: Any = None) -> Any:
    from training.pipeline import text_embeddings

    emb, info = text_embeddings(
        items, settings.paths.cache, max_length=settings.training.text_max_length, progress=_log, states=states,
    )
    _log(f"MiniLM embeddings of {info['unique_texts']:,} unique texts "
         f"({'cache hit' if info['cache_hit'] else 'encoded'}, {info['seconds']:.1f}s)")
    return emb


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(settings: Settings, events: pd.DataFrame, items: pd.DataFrame, popularity: pd.DataFrame,
                 training_set: str, cutoff: pd.Timestamp, emb: Any, states: Any = None) -> Any:
    import pyarrow.parquet as pq

    from training.pipeline import default_encoder_dir, encoder_config
    from training.train_data import prepare_data

    enc_dir = default_encoder_dir()
    data = prepare_data(
        events=events, items=items, training_set=pq.read_table(training_set), item_popularity=popularity,
        cutoff=cutoff, train_weeks=settings.training.train_weeks, text_emb=emb, encoder=encoder_config(enc_dir),
        encoder_dir=str(enc_dir), eval_days=settings.training.eval_days,
    )
    data.token_states = states
    _log(f"{len(data.train):,} training examples over {settings.training.train_weeks} weeks; "
         f"validation users {len(data.val):,}; test users {len(data.test) if data.test else 0:,}")
    return data


@task(name="tune", cache_policy=NO_CACHE)
def tune_task(settings: Settings, data: Any, trials: int, max_minutes: float) -> Any:
    from training.tune import run_search, tune_config

    return run_search(data, tune_config(settings, trials, max_minutes), progress=_log)


@task(name="evaluate-test-week", cache_policy=NO_CACHE)
def evaluate_task(data: Any, events: pd.DataFrame, model: Any) -> dict[str, Any]:
    from training.pipeline import evaluate_all, goals

    ev = data.test if data.test is not None else data.val
    results = evaluate_all(model, data, events, ev, progress=_log)
    return {"week": ev.name, "anchor": str(ev.anchor), "results": results, "goals": goals(results)}


@task(name="two-stage", cache_policy=NO_CACHE)
def two_stage_task(settings: Settings, events: pd.DataFrame, items: pd.DataFrame, emb: Any, cutoff: pd.Timestamp,
                   data: Any) -> dict[str, Any] | None:
    """The two-stage model (``training.two_stage.train_and_score``); None, with a warning, when the data
    is too short for weekly examples (the two-tower model then serves)."""
    from training.two_stage import train_and_score

    return train_and_score(events, items, emb, cutoff, data, settings.training, progress=_log,
                           warn=get_run_logger().warning, storage_path=str(settings.paths.ray_results))


@task(name="evaluate-champion", cache_policy=NO_CACHE)
def champion_task(settings: Settings, data: Any, events: pd.DataFrame, items: pd.DataFrame,
                  emb: Any) -> dict[str, Any] | None:
    """The champion on the challenger's test week, scored as the challenger's headline is: its
    two-stage ranker when it has one (features rebuilt from the current log), else its two-tower model
    (same catalogue only). None without a champion; ``error`` says why it could not be evaluated."""
    from recflow import registry

    pointer = registry.get_champion(settings)
    if pointer is None:
        return None
    tag = pointer["tag"]
    ev = data.test if data.test is not None else data.val
    try:
        from recflow.ranker import load_two_stage
        from training.pipeline import score_champion

        ranker_dir = registry.model_path(settings, tag) / registry.RANKER_DIR
        ranker = load_two_stage(ranker_dir).ranker if ranker_dir.is_dir() else None
        kind, metrics = score_champion(ranker, lambda: registry.load(settings, tag), data, events, items, emb, ev)
    except Exception as exc:  # noqa: BLE001 - reported in the flow's result; the challenger is not promoted
        get_run_logger().warning("champion %s could not be evaluated on the %s week: %s", tag, ev.name, exc)
        return {"tag": tag, "error": f"{type(exc).__name__}: {exc}"}
    _log(f"champion {tag} ({kind}) {ev.name} NDCG@10 {metrics['ndcg@10']:.4f}")
    return {"tag": tag, "kind": kind, "week": ev.name, "metrics": {k: float(v) for k, v in metrics.items()}}


@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_task(settings: Settings, model: Any, metadata: dict[str, Any], promote: bool, reason: str,
                  two_stage: Any = None) -> dict[str, Any]:
    """Register the model; make it the champion only when ``promote`` (the gate's decision), or, with
    ``canary.share`` > 0 and a champion to compare with, the canary for that share of users (``recflow.canary``)."""
    from recflow import canary, registry

    tag = registry.register(settings, model, metadata, two_stage=two_stage)
    pointer = registry.get_champion(settings)
    started = None
    if promote and pointer is not None and settings.canary.share > 0:
        started = canary.start(settings, tag, settings.canary.share, f"train flow: {reason}")
    elif promote:
        pointer = registry.set_champion(settings, tag, reason=f"train flow: {reason}")
    _log(f"registered {tag}; {reason}; champion: {pointer['tag'] if pointer else None}"
         + (f"; canary for {started['share']:.0%} of users" if started else ""))
    return {"tag": tag, "champion": pointer["tag"] if pointer else None, "path": str(registry.model_path(settings, tag)),
            "canary": started}


@flow(name="train", log_prints=True)
def train(
    trials: int | None = None,
    max_minutes: float | None = None,
    cutoff: str | None = None,
    home: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train, search, evaluate on the test week, register, and promote through the promotion gate.

    ``trials`` / ``max_minutes`` default to ``settings.training`` (the search's time budget; the
    flow adds data preparation and evaluation). ``cutoff`` (ISO date, UTC midnight) defaults to
    ``settings.training.cutoff`` or, unset, (last event day + 1) - 2 * eval_days.
    The model is promoted only when it passes ``training.incremental.gate`` (the retrain flow's gate:
    ``training.promotion_metric`` / ``promotion_margin``, the new-to-user guard) against the champion
    evaluated on the same test week; the first model of an empty registry is promoted without one. With
    ``canary.share`` > 0 a model that passes the gate becomes the canary instead (``recflow.canary``).
    Returns a summary: ``tag``, ``champion`` (after), ``champion_before``, ``promoted``,
    ``promotion`` (``reason``, ``gate``: the gate's figures or None), ``cutoff``, ``window``,
    ``validation`` (best trial), ``test`` (all models on the test week), ``goals``, ``best_config``,
    ``trials``, ``seconds``.
    """
    from dataclasses import asdict

    from recflow import registry
    from training.examples import default_cutoff, entity_frame, split_anchors, to_utc
    from training.incremental import promotion_decision
    from training.pipeline import markdown_table, train_metadata, train_notes, with_two_stage

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = flow_settings(home, overrides)
    t = settings.training
    trials = trials or t.trials
    max_minutes = max_minutes or t.max_minutes
    log = get_run_logger()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    if settings.features.history_length < 500:
        log.warning(
            "features.history_length=%s: the re-buy signal needs long histories (top-frequency over the last "
            "50 lines scored NDCG@10 0.184 vs 0.2805 over 500 on Complete Journey); consider 500",
            settings.features.history_length,
        )
    t0 = time.perf_counter()
    events, items, popularity = load_tables_task(settings)
    lap("load", t0)
    cut = to_utc(cutoff) if cutoff else (to_utc(t.cutoff) if t.cutoff else default_cutoff(events, t.eval_days))
    train_anchors, val_anchor, test_anchor = split_anchors(cut, t.train_weeks, t.eval_days)
    log.info("cutoff %s: %s training weeks from %s; validation from %s; test from %s",
             cut.date(), t.train_weeks, train_anchors[0].date(), val_anchor.date(), test_anchor.date())
    t0 = time.perf_counter()
    entities = entity_frame(events, [*train_anchors, val_anchor, test_anchor], t.eval_days)
    ts_path = training_set_task(settings, entities)
    lap("training_set", t0)
    t0 = time.perf_counter()
    states = text_states_task(settings, items)
    emb = text_embeddings_task(settings, items, states)
    lap("text_embeddings", t0)
    t0 = time.perf_counter()
    data = prepare_task(settings, events, items, popularity, ts_path, cut, emb, states)
    lap("prepare", t0)
    t0 = time.perf_counter()
    outcome = tune_task(settings, data, trials, max_minutes)
    lap("tune", t0)
    t0 = time.perf_counter()
    evaluation = evaluate_task(data, events, outcome.model)
    lap("evaluate", t0)
    two_stage = None
    if t.ranker:
        t0 = time.perf_counter()
        two_stage = two_stage_task(settings, events, items, emb, cut, data)
        lap("two_stage", t0)
        evaluation = with_two_stage(evaluation, two_stage)
    metadata = train_metadata(outcome, evaluation, {"trials": trials, "max_minutes": max_minutes},
                              registry.provenance(settings, data.window),
                              two_stage["model"].ranker.metrics if two_stage is not None else None)
    t0 = time.perf_counter()
    champion = champion_task(settings, data, events, items, emb)
    decision = promotion_decision(settings.training, champion, evaluation["results"]["recflow"])
    lap("champion", t0)
    (log.info if decision["promote"] else log.warning)("promotion: %s", decision["reason"])
    metadata["promotion"] = {**decision, "champion_before": champion["tag"] if champion else None}
    t0 = time.perf_counter()
    reg = register_task(settings, outcome.model, metadata, decision["promote"], decision["reason"],
                        two_stage["model"] if two_stage is not None else None)
    lap("register", t0)
    timings["total"] = round(time.perf_counter() - started, 1)
    table = markdown_table(evaluation["results"], f"{evaluation['week']} week from {evaluation['anchor']}")
    notes = train_notes(reg["tag"], reg["champion"], decision["reason"], evaluation["goals"], timings)
    create_markdown_artifact(markdown=table + notes, key="recflow-train-metrics", description="recflow train: test-week metrics")
    log.info("\n%s%s", table, notes)
    return {
        "tag": reg["tag"],
        "champion": reg["champion"],
        "champion_before": champion["tag"] if champion else None,
        "promoted": decision["promote"] and reg["canary"] is None,
        "canary": reg["canary"],
        "promotion": {"reason": decision["reason"], "gate": decision["gate"]},
        "model_path": reg["path"],
        "cutoff": cut.isoformat(),
        "window": data.window,
        "validation": outcome.metrics,
        "test": evaluation["results"],
        "goals": evaluation["goals"],
        "best_config": asdict(outcome.config),
        "trials": outcome.trials,
        "seconds": timings,
    }
