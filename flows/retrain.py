"""Prefect flow ``retrain``: refresh features with the served feedback, warm-start a challenger from
the champion, gate it against the champion on the latest held-out days, promote atomically.

Thin: the work is in ``flows.features`` (feature tables + materialisation), ``recflow.features``
(point-in-time training data), ``training`` (warm start, replay sample, fit, gate) and
``recflow.registry`` (BentoML model store, champion pointer). The drift trigger of the
``retrain/on-drift`` deployment (``flows/deployments.py``) runs it when the monitor flow emits
``recflow.drift.detected``.

Timeline, with ``as_of`` = the day after the newest event (canonical + event log):
the gate week is ``[as_of - eval_days, as_of)``, which neither model trained on; the challenger
trains on weekly examples before it: the last ``retrain_recent_weeks`` in full plus a
``retrain_replay_share`` sample of the ``retrain_replay_weeks`` before them (``full=True``: a new
model on ``train_weeks`` weeks, no warm start).

When the champion has a two-stage ranker (what ``/recommend`` serves), the gate is the two-stage
model's: the challenger's ranker continues boosting from the champion's on the last
``retrain_recent_weeks`` weekly anchors before the gate week, early-stopped on the week before it
(``full``: a fresh ranker on ``ranker_train_weeks`` anchors); both rankers are scored on the gate
week with features as of its start (``training.two_stage.week_metrics``, the scoring core the
train flow's gate uses). The two-tower challenger, which answers ``/similar`` and ``/search``, is
trained as above and registered with it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from recflow.progress import report
from recflow.settings import Settings, flow_settings


def _log(message: str) -> None:
    """To the run's log (Prefect API and UI) and to the CLI's progress line."""
    get_run_logger().info(message)
    report("retrain", message=message)


@task(name="window-data", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def window_data_task(settings: Settings, events: pd.DataFrame, cutoff: pd.Timestamp, weeks: int) -> Any:
    from flows.training_data import window_data

    return window_data(settings, cutoff=cutoff, train_weeks=weeks, events=events, name="retrain", progress=_log)


@task(name="fit-challenger", cache_policy=NO_CACHE)
def fit_task(settings: Settings, data: Any, champion: Any, full: bool) -> Any:
    from training.incremental import replay_sample
    from training.trainer import fit, train_config

    t = settings.training
    if full:  # a new model, trained as `train` trains its search's base configuration
        return fit(data, train_config(settings), progress=_log)
    kept = replay_sample(data, t.retrain_recent_weeks, t.retrain_replay_share, seed=t.seed)
    _log(f"incremental: {kept['recent']:,} recent examples + {kept['replayed']:,} replayed of {kept['older_total']:,} older")
    # warm start from the champion: its architecture and its encoder as they are (an incremental retrain
    # does not fine-tune MiniLM, so encoder_mode is frozen here whatever training.encoder_mode says)
    cfg = train_config(settings, epochs=t.retrain_epochs, lr=t.retrain_lr, encoder_mode="frozen")
    return fit(data, cfg, progress=_log, init=champion)


@task(name="two-stage-challenger", cache_policy=NO_CACHE)
def two_stage_task(settings: Settings, events: pd.DataFrame, data: Any, champion_ranker: Any, cutoff: pd.Timestamp,
                   end: pd.Timestamp, full: bool) -> dict[str, Any] | None:
    """The two-stage challenger and both rankers' gate-week metrics (None, with a warning, when the
    window is too short for weekly examples: the champion's ranker is then carried over refreshed)."""
    from recflow.ranker import load_two_stage
    from training.two_stage import retrain_and_score

    return retrain_and_score(load_two_stage(champion_ranker), events, data, cutoff, end, full, settings.training,
                             progress=_log, warn=get_run_logger().warning)


@task(name="evaluate-gate-week", cache_policy=NO_CACHE)
def evaluate_task(data: Any, model: Any) -> dict[str, float]:
    from training.trainer import evaluate_model

    return evaluate_model(model, data, data.val)


@task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def promote_task(settings: Settings, tag: str, reason: str) -> dict[str, Any]:
    from recflow import registry

    return registry.set_champion(settings, tag, reason=reason)


@task(name="start-canary", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def canary_task(settings: Settings, tag: str, reason: str) -> dict[str, Any]:
    """Make the challenger that passed the gate the canary for ``canary.share`` of users (``recflow.canary``)."""
    from recflow import canary

    return canary.start(settings, tag, settings.canary.share, reason)


@task(name="reload-service", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def reload_task(settings: Settings, url: str) -> dict[str, Any]:
    """Ask the running service at ``url`` to load the promoted champion."""
    from recflow.reload import reload_service

    return reload_service(settings, url)


def _same_catalogue(model: Any, data: Any) -> None:
    if list(model.item_ids) != [str(i) for i in data.catalogue.item_ids]:
        raise ValueError(
            "the champion's catalogue differs from the items table (items were added or removed): an incremental "
            "retrain cannot compare the two models item by item; run a full retrain: recflow retrain --full"
        )


@flow(name="retrain", log_prints=True)
def retrain(
    full: bool = False,
    as_of: str | None = None,
    refresh_features: bool = True,
    reload_url: str | None = None,
    reason: str = "manual",
    home: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Retrain (incremental by default), gate against the champion, promote when better.

    ``as_of`` (ISO date) ends the gate week; default: the day after the newest event. With
    ``reload_url``, a promoted model is loaded by the running service there (no downtime).
    With ``canary.share`` > 0 a challenger that passes the gate is not promoted but becomes the canary
    for that share of users; the monitor flow promotes it or rolls it back on their feedback
    (``monitoring.canary``). Returns ``{challenger, champion_before, champion_after, promoted, canary, gate,
    window, seconds}`` and writes it to ``<reports>/retrain/<time>.json``.
    """
    from dataclasses import asdict

    from recflow import registry
    from recflow.features.training_set import load_events
    from training.incremental import gate, retrain_markdown, retrain_window

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = flow_settings(home, overrides)
    t = settings.training
    log = get_run_logger()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    champion, pointer = registry.load_champion(settings)
    log.info("champion %s (%s retrain, reason: %s)", pointer["tag"], "full" if full else "incremental", reason)
    if refresh_features:
        from flows.features import build_features

        t0 = time.perf_counter()
        build_features(skip_ingest=True, home=home, overrides=overrides)  # flushes the event log first
        lap("features", t0)
    events, end, cutoff, weeks = retrain_window(load_events(settings), as_of, t, full)
    t0 = time.perf_counter()
    data = window_data_task(settings, events, cutoff, weeks)
    lap("data", t0)
    _same_catalogue(champion, data)
    t0 = time.perf_counter()
    result = fit_task(settings, data, champion, full)
    lap("fit", t0)
    t0 = time.perf_counter()
    champ_metrics = evaluate_task(data, champion)
    chall_metrics = evaluate_task(data, result.model)
    lap("evaluate", t0)
    two_tower = {"champion": champ_metrics, "challenger": chall_metrics}
    champion_ranker = registry.model_path(settings, pointer["tag"]) / registry.RANKER_DIR
    staged = None
    if champion_ranker.is_dir():  # /recommend serves the two-stage model: gate on it
        t0 = time.perf_counter()
        staged = two_stage_task(settings, events, data, champion_ranker, cutoff, end, full)
        lap("two_stage", t0)
        if staged is not None:
            champ_metrics, chall_metrics = staged["champion"], staged["challenger"]
    decision = gate(champ_metrics, chall_metrics, metric=t.promotion_metric, margin=t.promotion_margin)
    log.info("gate on %s .. %s: %s -> %s", cutoff.date(), end.date(), decision.reason,
             "promote" if decision.promote else "reject")
    metadata = {
        "metrics": {"gate": chall_metrics},
        "champion_on_gate": champ_metrics,
        "gate": decision.to_dict(),
        "gate_model": "two-stage" if staged is not None else "two-tower",
        "two_tower_on_gate": two_tower,
        "retrain": {"mode": "full" if full else "incremental", "warm_start_from": None if full else pointer["tag"],
                    "reason": reason, "recent_weeks": t.retrain_recent_weeks, "replay_weeks": t.retrain_replay_weeks,
                    "replay_share": t.retrain_replay_share, "epochs": t.retrain_epochs, "lr": t.retrain_lr},
        **registry.provenance(settings, data.window),
    }
    two_stage = None
    if staged is not None:
        two_stage = staged["model"]
        metadata["ranker"] = staged["ranker"]
    elif champion_ranker.is_dir():
        from recflow.ranker import load_two_stage
        from training.two_stage import refresh

        two_stage = refresh(load_two_stage(champion_ranker), events, int(end.value // 10**9))
        log.info("two-stage ranker carried over from %s with item statistics as of %s", pointer["tag"], end.date())
    tag = registry.register(settings, result.model, metadata, two_stage=two_stage)
    after = pointer["tag"]
    reload: dict[str, Any] | None = None
    canary: dict[str, Any] | None = None
    if decision.promote and settings.canary.share > 0:  # first a share of users, then the monitor decides
        canary = canary_task(settings, tag, f"retrain ({reason}): {decision.reason}")
        if reload_url:
            reload = reload_task(settings, reload_url)
    elif decision.promote:
        after = promote_task(settings, tag, f"retrain ({reason}): {decision.reason}")["tag"]
        if reload_url:
            reload = reload_task(settings, reload_url)
    timings["total"] = round(time.perf_counter() - started, 1)
    summary = {
        "challenger": tag, "champion_before": pointer["tag"], "champion_after": after,
        "promoted": decision.promote and canary is None, "canary": canary,
        "gate": decision.to_dict(), "gate_model": metadata["gate_model"],
        "window": {"gate_week": f"{cutoff.date()} .. {end.date()}", **data.window},
        "mode": "full" if full else "incremental", "reason": reason, "reload": reload, "seconds": timings,
        "train": {"samples": result.samples, "steps": result.steps, "samples_per_s": round(result.samples_per_s, 1),
                  "config": asdict(result.model.config) if hasattr(result.model.config, "__dataclass_fields__") else None},
    }
    out = settings.paths.reports / "retrain" / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{tag.split(':')[-1]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    verdict = ("in canary" if canary else "promoted") if decision.promote else "rejected"
    create_markdown_artifact(
        key="recflow-retrain", description=f"recflow retrain: challenger {verdict}",
        markdown=retrain_markdown(pointer["tag"], tag, champ_metrics, chall_metrics, decision,
                                  f"{cutoff.date()} .. {end.date()}", after)
        + (f"\nPassed the gate, so it is the **canary** for {canary['share']:.0%} of users: the monitor promotes it or "
           "rolls it back on their feedback.\n" if canary else ""),
    )
    log.info("challenger %s %s; champion: %s (%ss)", tag, verdict, after, timings["total"])
    return summary
