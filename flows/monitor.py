"""Prefect flow ``monitor``: Evidently drift and quality reports for the last window, the policy's
decision, and a ``recflow.drift.detected`` Prefect event when it says drift.

Thin: the reports and the policy are ``monitoring.monitor_run.run_monitor``; the reference (the champion's
answers for its validation week, through the serving code path) is ``monitoring.reference``. The
``retrain/on-drift`` deployment (``flows/deployments.py``) is triggered by the event. While a canary
runs (``recflow.canary``), the run also compares its users with the champion's and promotes it, rolls it
back or lets it run (``monitoring.canary``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from recflow.settings import Settings, flow_settings
from recflow.timeutil import to_utc


@task(name="reference", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def reference_task(settings: Settings, tag: str) -> pd.DataFrame:
    """The champion's reference predictions, built once per model and cached under the reports folder."""
    from monitoring.reference import build_reference, validation_users
    from recflow import registry
    from recflow.features.training_set import load_events
    from recflow.modeling import read_metadata

    # pseudonymised user ids; profile attributes only with privacy.log_profile (as the service logs them)
    kind = "profile" if settings.privacy.log_profile else "visits"
    cache = settings.paths.reports / "reference" / f"{tag.replace(':', '-')}-{kind}-pseudonymised.parquet"
    if cache.exists():
        return pd.read_parquet(cache)
    folder = registry.model_path(settings, tag)
    meta = read_metadata(folder)
    window = meta.get("data_window") or {}
    if "cutoff" not in window:
        raise ValueError(f"model {tag} has no data_window.cutoff in its metadata: it cannot define a reference week")
    as_of = to_utc(window["cutoff"])
    events = load_events(settings)
    users = validation_users(events, as_of, settings.training.eval_days)
    if not len(users):
        raise ValueError(f"no purchases in the reference week from {as_of.date()} for model {tag}")
    ranker = folder / registry.RANKER_DIR
    two_stage = None
    if settings.serving.two_stage and ranker.is_dir():  # what /recommend serves for this model
        from recflow.ranker import load_two_stage

        two_stage = load_two_stage(ranker)
    if two_stage is not None and kind == "visits":  # one row per basket, at its time, as traffic arrives
        from monitoring.reference import visit_reference
        from recflow.privacy import pseudonym_key

        ref = visit_reference(two_stage, events, start=as_of, days=settings.training.eval_days,
                              k=settings.serving.default_k, model_version=tag, key=pseudonym_key(settings),
                              max_rows=settings.monitoring.max_rows, seed=settings.monitoring.seed)
    else:
        ref = build_reference(settings, registry.load(settings, tag), as_of=as_of, users=users, model_version=tag,
                              k=settings.serving.default_k, two_stage=two_stage)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    ref.to_parquet(tmp, index=False)
    os.replace(tmp, cache)
    get_run_logger().info("reference for %s: %d requests from the week of %s", tag, len(ref), as_of.date())
    return ref


@task(name="run-monitor", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def run_monitor_task(settings: Settings, reference: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp,
                     offline_tag: str | None = None) -> Any:
    from monitoring.monitor_run import run_monitor

    if offline_tag is None:
        return run_monitor(settings, reference=reference, start=start, end=end)
    from monitoring.reference import offline_window

    current, feedback = offline_window(settings, offline_tag, start, end, reference=reference)
    return run_monitor(settings, reference=reference, start=start, end=end, current=current, feedback=feedback)


@task(name="emit-drift-event", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def emit_drift_task(window: str, champion: str, reasons: list[str], summary: Path) -> str | None:
    from prefect.events import emit_event

    from recflow.schemas import DRIFT_EVENT

    event = emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"recflow.monitor.{window}", "prefect.resource.name": "recflow monitor"},
        related=[{"prefect.resource.id": f"recflow.model.{champion}", "prefect.resource.role": "model"}],
        payload={"window": window, "champion": champion, "reasons": reasons, "summary": str(summary)},
    )
    return str(event.id) if event else None


@task(name="canary-analysis", cache_policy=NO_CACHE)
def canary_task(settings: Settings, until: pd.Timestamp) -> dict[str, Any] | None:
    """While a canary runs: compare its users' hit rate with the champion's up to ``until``, then promote it,
    roll it back or let it run (``monitoring.canary.run``); None when no canary runs."""
    from monitoring.canary import run

    record = run(settings, until=until)
    if record is not None:
        get_run_logger().info("canary %s: %s: %s", record["canary"], record["action"], record["reason"])
    return record


@flow(name="monitor", log_prints=True)
def monitor(end: str | None = None, days: int | None = None, home: str | None = None, emit: bool = True,
            overrides: dict[str, dict[str, Any]] | None = None, offline: bool = False) -> dict[str, Any]:
    """Monitor ``[end - days, end)`` (default: the last ``monitoring.window_days`` up to now) against
    the champion's reference; write the reports; emit ``recflow.drift.detected`` on drift. ``home`` and
    ``overrides`` (``{section: {field: value}}``) select the settings (:func:`recflow.settings.flow_settings`).

    ``offline``: instead of the request log, the champion's answers for the window's baskets computed
    through the two-stage serving core (``monitoring.reference.offline_window``), e.g. a control over a
    stretch the service did not serve; no event is emitted.

    Returns ``{window, champion, drift, verdict, reasons, run_dir, summary, index, event_id}``.
    """
    from recflow import registry
    from recflow.event_log import EventLog

    settings = flow_settings(home, overrides)
    log = get_run_logger()
    pointer = registry.get_champion(settings)
    if pointer is None:
        raise FileNotFoundError(f"no champion under {settings.paths.models}: run `recflow train` first")
    end_ts = to_utc(end) if end else pd.Timestamp.now(tz="UTC").ceil("D")
    start_ts = end_ts - pd.Timedelta(days=days or settings.monitoring.window_days)
    EventLog(settings.paths.event_log).flush()  # feedback becomes readable as parquet
    reference = reference_task(settings, pointer["tag"])
    result = run_monitor_task(settings, reference, start_ts, end_ts, pointer["tag"] if offline else None)
    emit = emit and not offline
    d = result.decision
    verdict = "drift" if d.drift else ("ok" if d.drift is False else "insufficient_data")
    window = f"{start_ts.date()}..{end_ts.date()}"
    event_id = None
    if d.drift and emit:
        event_id = emit_drift_task(window, pointer["tag"], list(d.reasons), result.summary_path)
        log.warning("DRIFT in %s: %s (event %s)", window, "; ".join(d.reasons), event_id)
    else:
        log.info("%s in %s: %s", verdict, window, "; ".join(d.reasons))
    skew = result.summary.get("skew") or {}
    if skew.get("verdict") == "skew":
        log.warning("SKEW in %s: %s", window, skew.get("reason"))
    canary = None if offline else canary_task(settings, end_ts)
    create_markdown_artifact(
        key="recflow-monitor",
        markdown=(f"# Monitor {window}: {verdict}\n\nChampion `{pointer['tag']}`.\n\n"
                  + "\n".join(f"- {r}" for r in d.reasons)
                  + f"\n\nSkew (served vs offline features, apart from drift): {skew.get('verdict', 'n/a')}: "
                    f"{skew.get('reason', '')}"
                  + (f"\n\nCanary `{canary['canary']}`: **{canary['action']}**: {canary['reason']}" if canary else "")
                  + f"\n\nReports: `{result.run_dir}` (index: `{result.index_path}`)\n"),
        description=f"recflow monitor {window}: {verdict}",
    )
    return {"window": window, "champion": pointer["tag"], "drift": d.drift, "verdict": verdict,
            "reasons": list(d.reasons), "run_dir": str(result.run_dir), "summary": str(result.summary_path),
            "index": str(result.index_path), "event_id": event_id,
            "skew": {k: skew.get(k) for k in ("verdict", "compared", "features_mismatched", "max_abs_diff", "reason")},
            "canary": canary}
