"""Prefect flow ``refresh_items``: the champion's (and a running canary's) two-stage item side recomputed as of a day (popularity
windows, trend, launches, re-buy gaps, co-purchase neighbours, user vectors), with its weights unchanged.

Thin: the item side is ``training.two_stage.refresh`` (the function training, evaluation and retraining
use for the item side as of a time), over every purchase before ``as_of`` (canonical events and the
feedback journal, ``recflow.features.training_set.load_events``); the result is saved with the
``recflow.item_refresh`` contract, which the service loads at its next model load. The
``refresh_items/daily`` deployment runs it every day at 00:15 UTC; a service following the champion
picks the refresh up within ``serving.champion_poll_s``, or at once when ``service_url`` is given.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from recflow.settings import flow_settings
from recflow.timeutil import to_utc


@flow(name="refresh_items", log_prints=True)
def refresh_items(as_of: str | None = None, home: str | None = None, service_url: str | None = None,
                  overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Refresh the champion's item side as of ``as_of`` (default: today 00:00 UTC); with ``service_url``,
    ask that service to reload. Returns ``{model, as_of, folder, seconds, events}`` (``model`` None, and
    nothing written, when the champion has no two-stage ranker)."""
    from recflow import canary as canary_pointer
    from recflow import item_refresh, registry
    from recflow.event_log import EventLog
    from recflow.features.training_set import load_events
    from recflow.ranker import load_two_stage
    from recflow.reload import reload_service
    from training.two_stage import refresh

    settings = flow_settings(home, overrides)
    log = get_run_logger()
    started = time.perf_counter()
    pointer = registry.get_champion(settings)
    if pointer is None:
        raise FileNotFoundError(f"no champion under {settings.paths.models}: run `recflow train` first")
    folder = registry.model_path(settings, pointer["tag"]) / registry.RANKER_DIR
    ts = to_utc(as_of) if as_of else pd.Timestamp.now(tz="UTC").floor("D")
    if not folder.is_dir():
        log.info("champion %s has no two-stage ranker: nothing to refresh", pointer["tag"])
        return {"model": None, "as_of": ts.isoformat(), "folder": None, "seconds": 0.0, "events": 0}
    EventLog(settings.paths.event_log).flush()  # accepted feedback becomes readable as parquet
    events = load_events(settings)
    events = events[(events["event_type"] == "purchase") & (events["event_timestamp"] < ts)]
    model = refresh(load_two_stage(folder), events, int(ts.timestamp()))
    seconds = round(time.perf_counter() - started, 2)
    out = item_refresh.write(settings, pointer["tag"], model, ts, seconds=seconds, events=len(events))
    canary = canary_pointer.get(settings)  # a canary is compared on the same day's item side as the champion
    canary_folder = registry.model_path(settings, canary["tag"]) / registry.RANKER_DIR if canary else None
    if canary_folder is not None and canary_folder.is_dir() and canary["tag"] != pointer["tag"]:  # type: ignore[index]
        item_refresh.write(settings, canary["tag"], refresh(load_two_stage(canary_folder), events, int(ts.timestamp())),
                           ts, seconds=seconds, events=len(events))
        log.info("item side of the canary %s refreshed as of %s", canary["tag"], ts)
    log.info("item side of %s refreshed as of %s from %d purchase lines in %.1f s", pointer["tag"], ts, len(events),
             seconds)
    create_markdown_artifact(
        key="recflow-item-refresh",
        markdown=(f"# Item refresh of `{pointer['tag']}` as of {ts.isoformat()}\n\n{len(events):,} purchase lines, "
                  f"{seconds:.1f} s. Folder: `{out}`. The service loads it at its next champion poll.\n"),
        description=f"recflow item refresh {ts.date()}",
    )
    if service_url:
        reload_service(settings, service_url)
    return {"model": pointer["tag"], "as_of": ts.isoformat(), "folder": str(out), "seconds": seconds,
            "events": len(events)}
