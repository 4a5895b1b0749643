"""``recflow demo``: the closed loop on the embedded data, end to end, on one machine.

1. ``build_features`` with the events from ``demo.replay_from`` on held back (the "future");
2. ``train`` the first champion (a small search) and ``deploy`` it as a bento; then the control: the
   ``monitor`` flow with ``offline=True`` on the ``demo.control_days`` before the replay (the
   champion's answers for those baskets through the serving core), which must not say drift;
3. serve the champion locally (the service follows the champion pointer and reloads on promotion);
4. replay the held-back days through ``/recommend`` and ``/feedback``, day by day, each followed by
   the ``refresh_items`` flow and a reload (``demo.refresh_items``), as the daily deployment would;
5. every ``demo.monitor_every_days`` simulated days: the ``monitor`` flow; on a drift decision the
   ``retrain`` flow (incremental, gated) runs, as the ``retrain/on-drift`` deployment would on the
   ``recflow.drift.detected`` event against a Prefect server, and reloads the service; with
   ``demo.scheduled_retrain`` it also runs without drift while a monitor window of the replay is left.
   A challenger that passes the gate becomes the canary for ``demo.canary_share`` of the users
   (``recflow.canary``), and the next monitor run promotes it or rolls it back on their feedback;
6. after the replay: NDCG@10 of the first champion, the final champion, every challenger and personal
   top-frequency on the week after the replay (held out, never seen by any), every gate decision
   scored on the week after it, the on-call index page, a final table, and the summary JSON at
   ``out`` (``recflow demo`` writes ``benchmarks/results/demo.json`` unless told otherwise).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from recflow.settings import Settings

Say = Callable[[str], None]
BASELINE = "personal_top_frequency"


def _with(settings: Settings, section: str, **values: Any) -> Settings:
    return settings.model_copy(update={section: getattr(settings, section).model_copy(update=values)})


def next_week_ndcg(settings: Settings, tags: list[str], week_start: pd.Timestamp, say: Say) -> dict[str, dict[str, Any]]:
    """Full-catalogue metrics of registered models on ``[week_start, week_start + eval_days)``, with
    features as of ``week_start`` (the week itself comes from the held-back events): each model as
    ``/recommend`` serves it, the two-stage ranker when it has one, else the two-tower model.
    ``out["_per_user"][tag]`` holds each model's per-user NDCG@10 (same users, same order)."""
    from flows.training_data import window_data
    from recflow import registry
    from recflow.features.training_set import load_events
    from training.trainer import evaluate_model

    events = load_events(settings, include_holdout=True)
    data = window_data(settings, cutoff=week_start - pd.Timedelta(days=settings.training.eval_days), train_weeks=1,
                       events=events, name="demo_next_week", progress=say)
    if data.test is None:
        raise ValueError(f"the data has no complete week from {week_start.date()}: replay fewer days")
    out: dict[str, dict[str, Any]] = {}
    per_user: dict[str, Any] = {}
    inputs = None
    for tag in dict.fromkeys(tags):
        ranker = registry.model_path(settings, tag) / registry.RANKER_DIR
        if settings.serving.two_stage and ranker.is_dir():  # what /recommend served for this model
            from recflow.ranker import load_two_stage
            from training.two_stage import inputs_for, week_metrics

            ts = load_two_stage(ranker)
            inputs = inputs or inputs_for(ts, data.catalogue, events[events["event_timestamp"] < week_start])
            out[tag] = week_metrics(inputs, ts.ranker, data.test, per_user=True)
        else:
            out[tag] = evaluate_model(registry.load(settings, tag), data, data.test, per_user=True)
        per_user[tag] = out[tag].pop("per_user")["ndcg@10"]
        say(f"next week {week_start.date()}: {tag} ndcg@10 {out[tag]['ndcg@10']:.4f}")
    # the strongest simple reference on this data: re-buy what you bought most (same users, same week)
    from training.baselines import history_before, personal_frequency_scorer
    from training.evaluate import evaluate

    h = history_before(events[events["event_timestamp"] < week_start], data.catalogue, data.test)
    out[BASELINE] = evaluate(personal_frequency_scorer(h, len(data.catalogue)), data.test, per_user=True)
    per_user[BASELINE] = out[BASELINE].pop("per_user")["ndcg@10"]
    say(f"next week {week_start.date()}: {BASELINE} ndcg@10 {out[BASELINE]['ndcg@10']:.4f}")
    out["_users"] = {"n": float(len(data.test))}
    out["_per_user"] = per_user
    return out


def paired_diff(scores: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, float]:
    """Paired bootstrap (users, 1,000 resamples) of NDCG@10 of ``a`` minus ``b`` in ``scores``."""
    from training.evaluate import paired_bootstrap

    boot = paired_bootstrap(scores["_per_user"][a], scores["_per_user"][b])
    return {k: round(float(boot[k]), 6) for k in ("mean_diff", "ci95_lo", "ci95_hi")} | {"n_users": int(boot["n_users"])}


def gate_decision(retrain: dict[str, Any], scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One gate decision checked against the week after it: the challenger and the champion it
    was gated against, scored on that week. The gate was right when it promoted a challenger that
    then scored better, or rejected one that did not score better beyond its 95% interval."""
    d = paired_diff(scores, retrain["challenger"], retrain["champion_before"])
    promoted = bool(retrain["promoted"])
    correct = d["mean_diff"] > 0 if promoted else not d["ci95_lo"] > 0
    return {"decided_at": retrain["decided_at"], "challenger": retrain["challenger"],
            "champion": retrain["champion_before"], "promoted": promoted, "next_week_diff": d["mean_diff"],
            "ci95_lo": d["ci95_lo"], "ci95_hi": d["ci95_hi"], "n_users": d["n_users"], "correct": bool(correct)}


def skew_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The monitors' skew reports in one: the largest served-vs-offline difference and every
    feature that differed in any run (goal: 0 and none)."""
    checked = [r for r in runs if r.get("verdict") in ("ok", "skew")]
    return {"max_abs_diff": max((float(r.get("max_abs_diff") or 0.0) for r in checked), default=None),
            "features_mismatched": sorted({f for r in checked for f in r.get("features_mismatched") or []}),
            "requests_compared": sum(int(r.get("compared") or 0) for r in checked),
            "runs_checked": len(checked), "verdicts": [r.get("verdict") for r in runs]}


def _refresh_summary(days: list[dict[str, Any]]) -> dict[str, Any]:
    """The replay's daily item refreshes: how many, and their cost per day (compute, and with the reload)."""
    total = [x["item_refresh_s"] for x in days if "item_refresh_s" in x]
    compute = [x["item_refresh_compute_s"] for x in days if "item_refresh_compute_s" in x]
    if not total:
        return {"enabled": True, "days": 0}
    return {"enabled": True, "days": len(total), "per_day_s": round(sum(total) / len(total), 1),
            "per_day_max_s": max(total), "compute_per_day_s": round(sum(compute) / max(len(compute), 1), 1),
            "total_s": round(sum(total), 1)}


def run_demo(settings: Settings, *, out: Path | None, say: Say = print) -> dict[str, Any]:
    """Run the whole loop; returns the demo summary and writes it to ``out`` (None: nowhere)."""
    from flows.deploy import deploy
    from flows.features import build_features
    from flows.monitor import monitor
    from flows.refresh_items import refresh_items
    from flows.retrain import retrain
    from flows.train import train
    from recflow import canary as canary_pointer
    from recflow import registry
    from recflow.reload import reload_service
    from recflow.replay import replay
    from serving.launcher import start_local

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = settings.demo
    started = time.perf_counter()
    timings: dict[str, float] = {}
    start = pd.Timestamp(d.replay_from, tz="UTC")
    # What the demo changes, given to every flow it calls as explicit overrides (never through os.environ);
    # the demo's token stays in memory: the demo reloads the service itself after a promotion.
    # No answer prefill: it ranks every recent user at each model load (the daily refresh reloads), while a
    # replayed day asks for a few hundred of them, each ranked on its first request anyway.
    serving = {"request_log_rotate_s": 5.0, "answer_prefill_users": 0}
    overrides: dict[str, dict[str, Any]] = {"data": {"until": start.isoformat()}, "training": {"train_weeks": d.train_weeks},
                                            "serving": serving, "canary": {"share": d.canary_share}}
    settings = _with(settings, "data", until=start.to_pydatetime())
    settings = _with(settings, "training", train_weeks=d.train_weeks)
    settings = _with(settings, "serving", **serving, **({"token": d.token} if d.token else {}))
    settings = _with(settings, "canary", share=d.canary_share)
    flow_args: dict[str, Any] = {"home": str(settings.home), "overrides": overrides}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        say(f"[demo] {name}: {timings[name]:.0f} s (total {time.perf_counter() - started:.0f} s)")

    t0 = time.perf_counter()
    say(f"[demo] 1/6 features: events before {start.date()} (later ones held back for the replay)")
    build_features(**flow_args)
    lap("features", t0)

    t0 = time.perf_counter()
    say(f"[demo] 2/6 train: {d.trials} trials, {d.max_minutes} min search, {d.train_weeks} weeks")
    trained = train(trials=d.trials, max_minutes=d.max_minutes, **flow_args)
    first = trained["tag"]
    if canary_pointer.get(settings) is not None:  # of an earlier run in this home (or the first model itself)
        canary_pointer.end(settings, "rollback", "demo: a new first model")
    if registry.get_champion(settings)["tag"] != first:  # type: ignore[index]
        registry.set_champion(settings, first, reason="demo: first model")
    bento = deploy(**flow_args)["bento"]
    lap("train_deploy", t0)

    control: dict[str, Any] = {"window": None, "drift_detected": None, "verdict": "off", "reasons": []}
    if d.control_days:
        t0 = time.perf_counter()
        say(f"[demo] control: the monitor on the quiet {d.control_days} days before {start.date()}")
        # the champion's answers for the stretch's baskets through the serving core, monitored like a served week
        m = monitor(end=start.isoformat(), days=d.control_days, offline=True, **flow_args)
        control = {"window": m["window"], "drift_detected": m["drift"], "verdict": m["verdict"], "reasons": m["reasons"],
                   "run_dir": m["run_dir"], "how": "monitor --offline: the champion's answers for the stretch's baskets "
                                                   "through the two-stage serving core, against its reference week"}
        say(f"[demo] control {control['window']}: {control['verdict']}: {'; '.join(control['reasons'])[:300]}")
        lap("control", t0)

    monitors: list[dict[str, Any]] = []
    retrains: list[dict[str, Any]] = []
    canaries: list[dict[str, Any]] = []
    days: list[dict[str, Any]] = []
    drift_on: str | None = None
    t0 = time.perf_counter()
    say(f"[demo] 3/6 serve the champion; 4/6 replay {d.replay_days} days from {start.date()}")
    with start_local(settings) as service:
        lap("serve_start", t0)
        t_replay = time.perf_counter()

        def on_day(result: Any) -> None:
            nonlocal drift_on
            days.append(result.summary())
            s = days[-1]
            say(f"[demo] replayed {s['day']}: {s['users']} users, {s['recommend_calls']} recommend, "
                f"{s['feedback_events']} feedback events in {s['feedback_calls']} calls, {s['errors']} errors, p99 {s['p99_ms']} ms")
            if d.refresh_items:  # the daily job of production: the champion's item side as of the next day
                t = time.perf_counter()
                day_end = pd.Timestamp(result.day, tz="UTC") + timedelta(days=1)
                refreshed = refresh_items(as_of=day_end.isoformat(), **flow_args)
                reload_service(settings, service.url)
                s["item_refresh_s"] = round(time.perf_counter() - t, 1)
                s["item_refresh_compute_s"] = refreshed["seconds"]
                say(f"[demo] item side of {refreshed['model']} refreshed as of {day_end.date()} and reloaded: "
                    f"{s['item_refresh_s']:.1f} s")
            n = len(days)
            if n % d.monitor_every_days:
                return
            end = pd.Timestamp(result.day, tz="UTC") + timedelta(days=1)
            sv = settings.serving
            time.sleep(sv.request_log_rotate_s + sv.request_log_flush_s + 1)  # the service closes its log file
            say(f"[demo] 5/6 monitor {(end - timedelta(days=d.monitor_every_days)).date()} .. {end.date()}")
            m = monitor(end=end.isoformat(), days=d.monitor_every_days, **flow_args)
            monitors.append(m)
            say(f"[demo] monitor: {m['verdict']}: {'; '.join(m['reasons'])[:400]}")
            say(f"[demo] skew: {m['skew']['verdict']}: {m['skew']['reason']}")
            if m.get("canary"):
                canary_verdict(m["canary"], end)
            if m["drift"]:
                drift_on = drift_on or m["window"]
            if m["drift"] or (d.scheduled_retrain and d.replay_days - n >= d.monitor_every_days):
                before = registry.get_champion(settings)["tag"]  # type: ignore[index]
                why = f"drift {m['window']}" if m["drift"] else f"scheduled, after {m['window']}"
                r = retrain(as_of=end.isoformat(), reason=why, **flow_args)
                if r["promoted"] or r.get("canary"):
                    reload_service(settings, service.url)
                retrains.append({**r, "decided_at": end.isoformat(), "champion_before": before})
                verdict = ("promoted" if r["promoted"] else
                           f"the canary for {r['canary']['share']:.0%} of users" if r.get("canary") else "rejected")
                say(f"[demo] retrain ({why}): challenger {r['challenger']} {verdict}: {r['gate']['reason']}")

        def canary_verdict(c: dict[str, Any], end: pd.Timestamp) -> None:
            """The monitor's canary step: a verdict ends the challenger's canary, which decides the retrain."""
            canaries.append({k: c.get(k) for k in ("canary", "action", "reason", "arms", "hit_rate@10_diff", "ci95_lo",
                                                   "ci95_hi", "age_days")} | {"at": end.isoformat()})
            say(f"[demo] canary {c['canary']}: {c['action']}: {c['reason']}")
            if c["action"] == "wait":
                return
            for r in retrains:
                if r["challenger"] == c["canary"]:
                    r.update(promoted=c["action"] == "promote", decided_at=end.isoformat(), canary_verdict=c["action"])
            reload_service(settings, service.url)

        replay(settings, service.url, start, d.replay_days, concurrency=d.concurrency, on_day=on_day)
        timings["replay_monitor_retrain"] = round(time.perf_counter() - t_replay, 1)
    final = registry.get_champion(settings)["tag"]  # type: ignore[index]

    t0 = time.perf_counter()
    after_replay = start + pd.Timedelta(days=d.replay_days)
    say(f"[demo] 6/6 evaluate on the held-out week from {after_replay.date()}")
    if not retrains:
        build_features(skip_ingest=True, **flow_args)  # the replayed feedback into the offline features
    challengers = [r["challenger"] for r in retrains]
    scores = next_week_ndcg(settings, [first, final, *challengers], after_replay, say)
    improvement = paired_diff(scores, final, first)
    vs_baseline = {"first_champion": paired_diff(scores, first, BASELINE),
                   "final_champion": paired_diff(scores, final, BASELINE)}
    decisions = []
    for r in retrains:  # each gate decision against the week after it
        if r.get("canary") and r.get("canary_verdict") is None:  # its canary had no verdict when the replay ended
            decisions.append({"decided_at": r["decided_at"], "challenger": r["challenger"], "promoted": False,
                              "correct": None, "note": "its canary had no verdict by the end of the replay"})
            continue
        week = pd.Timestamp(r["decided_at"])
        try:
            week_scores = scores if week == after_replay else next_week_ndcg(
                settings, [r["champion_before"], r["challenger"]], week, say)
        except ValueError as exc:  # no complete week after this decision in the data
            decisions.append({"decided_at": r["decided_at"], "challenger": r["challenger"], "promoted": r["promoted"],
                              "correct": None, "note": str(exc)})
            continue
        decisions.append(gate_decision(r, week_scores))
        g = decisions[-1]
        say(f"[demo] gate decision {g['decided_at'][:10]}: {'promoted' if g['promoted'] else 'rejected'}; next week "
            f"challenger - champion {g['next_week_diff']:+.4f} [{g['ci95_lo']:+.4f}, {g['ci95_hi']:+.4f}]: "
            f"{'right' if g['correct'] else 'WRONG'}")
    lap("evaluate", t0)
    from monitoring.index import write_index

    index = write_index(settings.paths.reports)
    before, after = scores[first]["ndcg@10"], scores[final]["ndcg@10"]
    replay_totals = {k: sum(x[k] for x in days) for k in ("users", "recommend_calls", "feedback_calls", "feedback_events", "errors", "fallback")}
    summary = {
        "wall_s": round(time.perf_counter() - started, 1),
        "drift_detected_on": drift_on,
        "ndcg_next_week_before": round(before, 6),
        "ndcg_next_week_after": round(after, 6),
        "promoted": any(r["promoted"] for r in retrains),
        "improvement_ci95_lo": improvement["ci95_lo"],
        "improvement": improvement,
        "gate_decisions": decisions,
        "gate_correct": (all(g["correct"] for g in decisions)
                         if decisions and all(g["correct"] is not None for g in decisions) else None),
        "retraining_beat_no_retraining": after > before if final != first else None,
        "models": {"first_champion": first, "final_champion": final, "bento": bento,
                   "challengers": [r["challenger"] for r in retrains]},
        "control": control,
        "item_refresh": _refresh_summary(days) if d.refresh_items else {"enabled": False},
        "next_week": {"start": str(after_replay.date()), "users": int(scores["_users"]["n"]),
                      "final_minus_first": improvement,
                      "first_champion": scores[first], "final_champion": scores[final],
                      BASELINE: scores[BASELINE],
                      # each champion minus re-buy-what-you-bought-most, paired over the same users
                      f"minus_{BASELINE}": vs_baseline,
                      # every retrained model, promoted or not: did retraining help on the future week?
                      "challengers": {t: scores[t] for t in challengers}},
        "retrained_beat_first_on_next_week": {t: scores[t]["ndcg@10"] > before for t in challengers},
        "monitor_runs": [{k: m.get(k) for k in ("window", "verdict", "reasons", "run_dir", "skew")} for m in monitors],
        "skew": skew_summary([m.get("skew") or {} for m in monitors]),
        "retrains": [{k: r.get(k) for k in ("challenger", "champion_before", "decided_at", "promoted", "gate", "window",
                                            "mode", "reason", "canary", "canary_verdict", "seconds")} for r in retrains],
        "canary": {"share": d.canary_share, "verdicts": canaries},
        "replay": {"from": str(start.date()), "days": d.replay_days, **replay_totals, "per_day": days},
        "first_model_test_week": trained["test"].get("recflow"),
        "reports_index": str(index),
        "seconds": timings,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary
