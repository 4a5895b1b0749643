"""One monitor run: frames -> three Evidently reports -> policy decision -> summary.json -> index.html."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from monitoring import data as mdata
from monitoring.index import write_index
from monitoring.policy import (
    ADVISORY_METRICS,
    FEATURE_DRIFT,
    PREDICTION_DRIFT,
    QUALITY_METRICS,
    Decision,
    DriftPolicy,
    Observation,
    decide,
)
from monitoring.reports import ReportFiles, drift_report, quality_report
from recflow.privacy import apply_retention, pseudonym_key, pseudonymise_frame
from recflow.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class MonitorResult:
    """What a monitor run produced: the decision, the run folder and every file written."""

    decision: Decision
    run_dir: Path
    summary_path: Path
    index_path: Path
    reports: dict[str, ReportFiles]
    summary: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def drift(self) -> bool | None:
        return self.decision.drift


def run_id_for(end: pd.Timestamp) -> str:
    """Folder name of the run for a window ending at ``end``, e.g. ``2017-10-08T000000Z``."""
    return end.strftime("%Y-%m-%dT%H%M%SZ")


def purchase_paths(settings: Settings) -> list[Path]:
    """Where purchases are read from: the event log and/or the canonical events (``monitoring.feedback_sources``)."""
    sources = settings.monitoring.feedback_sources
    paths = []
    if "event_log" in sources:
        paths.append(settings.paths.event_log)
    if "canonical" in sources:
        paths.append(settings.paths.events)
    return paths


def _skew(settings: Settings, model: Any, log: pd.DataFrame, end: pd.Timestamp, key: bytes) -> dict[str, Any]:
    """:func:`monitoring.skew.skew_report` of the window's requests against every purchase known
    (canonical events and the feedback journal, pseudonymised like the log) before ``end``."""
    from monitoring.skew import skew_report

    rows = settings.monitoring.skew_rows
    if rows == 0:
        return {"verdict": "off", "reason": "monitoring.skew_rows is 0"}
    if model is None:
        model = _champion_two_stage(settings)
        if model is None:
            return {"verdict": "no_data", "reason": "the champion has no two-stage model"}
    purchases = mdata.load_events([settings.paths.event_log, settings.paths.events], "1970-01-01", end)
    return skew_report(model, log, pseudonymise_frame(purchases, key), max_rows=rows, seed=settings.monitoring.seed,
                       history_length=settings.features.history_length)


def _champion_two_stage(settings: Settings) -> Any:
    """The registry champion's two-stage model, or None (no champion, or a two-tower one)."""
    from recflow import registry
    from recflow.ranker import load_two_stage

    pointer = registry.get_champion(settings)
    if pointer is None:
        return None
    folder = registry.model_path(settings, pointer["tag"]) / registry.RANKER_DIR
    return load_two_stage(folder) if folder.is_dir() else None


def _serving_stats(log: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in ("fallback", "degraded"):
        if col in log and len(log):
            out[f"{col}_rate"] = float(log[col].fillna(False).astype(bool).mean())
    if "latency_ms" in log and log["latency_ms"].notna().any():
        out["latency_p50_ms"] = float(log["latency_ms"].quantile(0.5))
        out["latency_p95_ms"] = float(log["latency_ms"].quantile(0.95))
    if "model_version" in log and len(log):
        out["model_versions"] = {str(k): int(v) for k, v in log["model_version"].value_counts().head(5).items()}
    return out


def _pending_feedback(settings: Settings) -> int | None:
    """Accepted feedback events not yet pushed online, at the time of the run (None: unreadable)."""
    from recflow.event_log import EventLog

    try:
        return EventLog(settings.paths.event_log, timeout_s=settings.feedback.journal_timeout_s).stats()["pending_push"]
    except Exception as exc:  # noqa: BLE001 - a locked or damaged journal must not fail the monitor
        log.warning("pending feedback unknown: %s", exc)
        return None


def run_monitor(
    settings: Settings,
    *,
    reference: pd.DataFrame,
    start: datetime | str,
    end: datetime | str,
    item_popularity: pd.Series | None = None,
    items: pd.DataFrame | None = None,
    current: pd.DataFrame | None = None,
    feedback: pd.DataFrame | None = None,
    reference_feedback: pd.DataFrame | None = None,
    train_purchases: pd.DataFrame | None = None,
    model: Any = None,
    write_index_page: bool = True,
) -> MonitorResult:
    """Monitor the window ``[start, end)`` against ``reference`` and write reports + summary.

    - ``reference``: request-log-shaped frame (``user_id, ts, features, item_ids, scores``) of the
      model's predictions for validation users (the training pipeline builds it).
    - ``current``: request-log rows to monitor; default: read ``settings.paths.request_log`` for
      ``[start - horizon, end)`` (drift uses ``[start, end)``; quality uses the lagged window
      ``[start - horizon, end - horizon)`` so that every list had the full horizon to be bought).
    - ``feedback`` / ``reference_feedback``: purchase events (canonical events schema, raw user ids);
      default: read ``monitoring.feedback_sources`` (event log and/or canonical events). Their user
      ids are pseudonymised here (``recflow.privacy``), to match the request-log frames, whose
      ``user_id`` holds the service's pseudonyms.
    - ``train_purchases``: purchases defining item popularity (novelty, popularity bias); default:
      the ``monitoring.popularity_days`` before ``start``. ``item_popularity`` (item_id -> buyers)
      defaults to distinct buyers in ``train_purchases``.
    - ``items``: catalogue (``item_id`` + ``monitoring.mix_level`` column) for the category mix;
      default: ``settings.paths.items`` when it exists.
    - ``model``: the two-stage model (:class:`recflow.ranker.TwoStage`) whose item catalogue the
      skew report maps histories with; default: the registry champion's, when it has one.

    Writes ``<reports>/<run_id>/{feature_drift,prediction_drift,recommendation_quality}.{html,json}``
    and ``summary.json`` (run_id = window end, e.g. ``2017-10-08T000000Z``; re-running a window
    overwrites it), then rebuilds ``<reports>/index.html``. First it deletes report runs and request
    logs past ``privacy.report_days`` / ``request_log_days``. Returns a :class:`MonitorResult`.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ms = settings.monitoring
    retention = apply_retention(settings, on_reports_removed=write_index)  # request logs and report runs past privacy.*_days
    start_ts, end_ts = mdata.to_utc(start), mdata.to_utc(end)
    if end_ts <= start_ts:
        raise ValueError(f"monitor window is empty: start {start_ts} must be before end {end_ts}")
    horizon = pd.Timedelta(days=ms.horizon_days)
    mdata.check_log_frame(reference, name="reference")
    policy = DriftPolicy.from_settings(ms)
    notes: list[str] = []

    # --- inputs ---------------------------------------------------------------------------------
    if current is None:
        log = mdata.load_request_log(settings.paths.request_log, start_ts - horizon, end_ts, ms.endpoints)
    else:
        mdata.check_log_frame(current, name="current")
        log = current
        if "endpoint" in log.columns:
            log = log[log["endpoint"].isin(list(ms.endpoints))]
    log = log.assign(ts=pd.to_datetime(log["ts"], utc=True))
    if "arm" in log.columns:  # a canary's answers are judged by the canary analysis, not against the champion's reference
        log = log[log["arm"].ne("canary")]
    ref = reference.assign(ts=pd.to_datetime(reference["ts"], utc=True))
    if "endpoint" in ref.columns:
        ref = ref[ref["endpoint"].isin(list(ms.endpoints)) | ref["endpoint"].isna()]
    drift_log = log[(log["ts"] >= start_ts) & (log["ts"] < end_ts)]
    warnings = mdata.log_problems(ref, name="reference") + mdata.log_problems(drift_log, name="current")
    q_start, q_end = start_ts - horizon, end_ts - horizon
    quality_log = log[(log["ts"] >= q_start) & (log["ts"] < q_end)]

    paths = purchase_paths(settings)
    if feedback is None:
        feedback = mdata.load_events(paths, q_start, end_ts)
    if reference_feedback is None:
        if len(ref):
            reference_feedback = mdata.load_events(paths, ref["ts"].min(), ref["ts"].max() + horizon)
        else:
            reference_feedback = feedback.iloc[0:0]
    if train_purchases is None:
        train_purchases = mdata.load_events(paths, start_ts - pd.Timedelta(days=ms.popularity_days), start_ts)
    if item_popularity is None:
        item_popularity = mdata.item_popularity_from(train_purchases)
    # The request log holds keyed pseudonyms of the user ids: the event side of every join gets the same.
    key = pseudonym_key(settings)
    feedback = pseudonymise_frame(feedback, key)
    reference_feedback = pseudonymise_frame(reference_feedback, key)
    train_purchases = pseudonymise_frame(train_purchases, key)
    if items is None and settings.paths.items.is_file():
        import pyarrow.parquet as pq

        cols = [c for c in ("item_id", ms.mix_level) if c in pq.read_schema(settings.paths.items).names]
        items = pq.read_table(settings.paths.items, columns=cols).to_pandas()
    if items is None or ms.mix_level not in items.columns:
        notes.append(f"no item catalogue with '{ms.mix_level}': category mix not monitored")
        items = None
    timings["load"] = time.perf_counter() - t0

    # --- sampling -------------------------------------------------------------------------------
    cur_s = mdata.sample_rows(drift_log, ms.max_rows, ms.seed)
    ref_s = mdata.sample_rows(ref, ms.max_rows, ms.seed)
    sampling = []
    if len(cur_s) < len(drift_log):
        sampling.append(f"current requests sampled: {len(cur_s)} of {len(drift_log)}")
    if len(ref_s) < len(ref):
        sampling.append(f"reference rows sampled: {len(ref_s)} of {len(ref)}")

    run_dir = settings.paths.reports / run_id_for(end_ts)
    window_text = f"{start_ts:%Y-%m-%d %H:%M} → {end_ts:%Y-%m-%d %H:%M} UTC"

    # --- feature drift --------------------------------------------------------------------------
    t = time.perf_counter()
    f_ref, f_cur, f_info = mdata.feature_frames(ref_s, cur_s, lifetime=ms.lifetime_features)
    feat = drift_report(
        f_ref, f_cur, numerical=f_info["numerical"], categorical=f_info["categorical"], out_dir=run_dir,
        name="feature_drift", title="recflow · feature drift (served user features)", subtitle=window_text,
        drift_share=policy.rules[FEATURE_DRIFT].threshold, method=ms.drift_method,
        threshold=ms.drift_method_threshold,
    )
    if len(f_ref) and len(f_cur) and (f_info["only_reference"] or f_info["only_current"]):
        warnings.append(f"feature schema changed: only in reference {f_info['only_reference']}, "
                     f"only in current {f_info['only_current']}")
    for col, share in f_info["null_share"].items():
        if abs(share["current"] - share["reference"]) > 0.1:
            warnings.append(f"feature {col}: null share {share['current']:.0%} now vs {share['reference']:.0%} "
                            "in the reference")
    timings["feature_drift"] = time.perf_counter() - t

    # --- prediction drift -----------------------------------------------------------------------
    t = time.perf_counter()
    groups = mdata.mix_groups(mdata.explode_lists(ref_s), items, ms.mix_level, ms.mix_top_n) if len(ref_s) else []
    kwargs = {"item_popularity": item_popularity if len(item_popularity) else None, "items": items,
              "level": ms.mix_level, "groups": groups}
    p_ref = mdata.prediction_descriptors(ref_s, **kwargs) if len(ref_s) else pd.DataFrame()
    p_cur = mdata.prediction_descriptors(cur_s, **kwargs) if len(cur_s) else pd.DataFrame()
    p_cols = [c for c in p_ref.columns if c in set(p_cur.columns)
              and p_ref[c].notna().any() and p_cur[c].notna().any()]
    p_cat = [c for c in p_cols if not pd.api.types.is_numeric_dtype(p_ref[c])]
    p_num = [c for c in p_cols if c not in p_cat]
    pred = drift_report(
        p_ref, p_cur, numerical=p_num, categorical=p_cat, out_dir=run_dir, name="prediction_drift",
        title="recflow · prediction drift (scores, category mix, popularity)", subtitle=window_text,
        drift_share=policy.rules[PREDICTION_DRIFT].threshold, method=ms.drift_method,
        threshold=ms.drift_method_threshold,
    )
    timings["prediction_drift"] = time.perf_counter() - t

    # --- recommendation quality -----------------------------------------------------------------
    t = time.perf_counter()
    q_ref = mdata.relevance_frame(ref, reference_feedback, horizon=horizon) if len(ref) else _empty_relevance()
    q_cur = (mdata.relevance_frame(quality_log, feedback, horizon=horizon, until=end_ts)
             if len(quality_log) else _empty_relevance())
    for label, frame in (("reference", q_ref), ("current", q_cur)):
        n_users = frame["user_id"].nunique()
        if n_users > ms.max_quality_users:
            sampling.append(f"{label} quality users sampled: {ms.max_quality_users} of {n_users}")
    q_ref = _cap_users(q_ref, ms.max_quality_users, ms.seed)
    q_cur = _cap_users(q_cur, ms.max_quality_users, ms.seed)
    qual = quality_report(
        q_ref, q_cur, train=train_purchases, k=ms.k, out_dir=run_dir,
        title="recflow · recommendation quality vs feedback",
        subtitle=f"lists served {q_start:%Y-%m-%d} → {q_end:%Y-%m-%d}, purchases within {ms.horizon_days} days",
    )
    if qual.note:
        notes.append(qual.note)
    timings["quality"] = time.perf_counter() - t

    # --- skew: served features against the offline truth (its own verdict, not drift) ------------
    t = time.perf_counter()
    skew = _skew(settings, model, drift_log, end_ts, key)
    timings["skew"] = time.perf_counter() - t

    # --- decision + summary ---------------------------------------------------------------------
    n_drift = min(len(cur_s), len(ref_s))
    n_quality = min(qual.users_with_feedback)
    observations = [
        Observation(metric=FEATURE_DRIFT, value=feat.share, n=n_drift),
        Observation(metric=PREDICTION_DRIFT, value=pred.share, n=n_drift),
    ]
    for name in QUALITY_METRICS + ADVISORY_METRICS:
        n = min(qual.users) if name in ADVISORY_METRICS else n_quality
        if name == "coverage":
            n = min(len(cur_s), len(ref_s))
        observations.append(Observation(metric=name, value=qual.current.get(name),
                                        reference=qual.reference.get(name), n=n))
    decision = decide(observations, policy, n_current=len(drift_log), n_reference=len(ref))
    decision.reasons.extend(f"warning: {w}" for w in warnings)  # data problems on-call should see

    reports = {"feature_drift": feat.files, "prediction_drift": pred.files, "recommendation_quality": qual.files}
    verdict = "insufficient_data" if decision.drift is None else ("drift" if decision.drift else "ok")
    summary: dict[str, Any] = {
        "run_id": run_dir.name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "window": {"start": start_ts.isoformat(), "end": end_ts.isoformat()},
        "quality_window": {"start": q_start.isoformat(), "end": q_end.isoformat(), "horizon_days": ms.horizon_days,
                           "k": qual.k},
        "decision": {"drift": decision.drift, "verdict": verdict, "reasons": decision.reasons},
        "metrics": [m.model_dump() for m in decision.metrics],
        "extra_metrics": {"current": qual.current, "reference": qual.reference},
        "samples": {
            "current_requests": len(drift_log), "current_sampled": len(cur_s),
            "reference_requests": len(ref), "reference_sampled": len(ref_s),
            "quality_users": {"current": qual.users[1], "reference": qual.users[0]},
            "quality_users_with_feedback": {"current": qual.users_with_feedback[1],
                                            "reference": qual.users_with_feedback[0]},
            "feedback_purchases": len(feedback), "train_purchases": len(train_purchases),
        },
        "sampling": "; ".join(sampling) + (f" (seed {ms.seed})" if sampling else ""),
        "features": {**f_info, "drifted": feat.drifted_columns, "per_column": feat.columns},
        "predictions": {"numerical": p_num, "categorical": p_cat, "drifted": pred.drifted_columns,
                        "per_column": pred.columns, "mix_groups": groups},
        "serving": {**_serving_stats(drift_log), "pending_feedback": _pending_feedback(settings)},
        "skew": skew,
        "policy": policy.model_dump(),
        "reports": {name: {"html": f.html.name, "json": f.json.name} for name, f in reports.items()},
        "notes": notes,
        "warnings": warnings,
        "retention_removed": retention,
        "evidently_version": _evidently_version(),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    if ms.workspace:
        t = time.perf_counter()
        snapshots = {"feature_drift": feat.snapshot, "prediction_drift": pred.snapshot,
                     "recommendation_quality": qual.snapshot}
        summary["workspace"] = _record(settings, summary, run_dir, snapshots)
        timings["workspace"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    index_path = write_index(settings.paths.reports) if write_index_page else settings.paths.reports / "index.html"
    return MonitorResult(decision=decision, run_dir=run_dir, summary_path=summary_path, index_path=index_path,
                         reports=reports, summary=summary)


def _record(settings: Settings, summary: dict[str, Any], run_dir: Path, snapshots: dict[str, Any]) -> dict[str, Any]:
    """Record the run in the Evidently workspace; a failure there is noted, never fails the run."""
    from monitoring.workspace import record_run

    try:
        done = record_run(settings.paths.workspace, summary, run_dir, snapshots)
    except Exception as exc:  # noqa: BLE001 - the trend view is secondary to the run's own reports
        summary["warnings"].append(f"not recorded in the Evidently workspace {settings.paths.workspace}: "
                                   f"{type(exc).__name__}: {exc}")
        return {"recorded": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"recorded": True, "project_id": done["project_id"], "snapshots_added": done["snapshots_added"],
            "pruned_runs": done["pruned_runs"]}


def _empty_relevance() -> pd.DataFrame:
    return pd.DataFrame({"user_id": pd.Series(dtype=str), "item_id": pd.Series(dtype=str),
                         "rank": pd.Series(dtype="int64"), "target": pd.Series(dtype="int64"),
                         "recommended": pd.Series(dtype=bool)})


def _cap_users(long: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    users = long["user_id"].drop_duplicates()
    if len(users) <= cap:
        return long
    keep = users.sample(n=cap, random_state=seed)
    return long[long["user_id"].isin(keep)].reset_index(drop=True)


def _evidently_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evidently")
    except PackageNotFoundError:
        return None
