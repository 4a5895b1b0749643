"""Cost curve: every pipeline stage on synthetic shops at 1x, 4x and 16x Complete Journey.

    python benchmarks/scale.py [--scales 1,4,16] [--home DIR] [--out PATH] [--rounds N] [--budget-s S]

The shop (:func:`synthetic_shop`) has Complete Journey's shape at ``scale`` times its users,
catalogue and purchase lines, over the same year: Zipf-like item popularity, a staple set per
user re-bought at personal intervals (in shopping trips, with jitter), exploration purchases from
the popularity curve, trips over the day as CJ's. It is written as a shop's own files
(``interactions.parquet`` + ``items.parquet``) and goes through the same pipeline as any shop:

1. ``ingest``: :func:`recflow.datasets.ingest` of the files (``data.source=generic``).
2. ``features``: :func:`recflow.features.build.build_feature_tables` (DuckDB).
3. ``materialize``: ``feast apply`` and materialisation of the whole window into the SQLite online
   store (:mod:`recflow.feature_store`), then the p99 of one-user reads of the serving service.
4. ``training_set``: the two-stage ranker's examples (:func:`training.ranker.build_week`: the item
   side as of each weekly anchor, candidates, LightGBM features, labels) for ``--train-weeks``
   anchors and the validation week, **on a sample** of ``--train-users`` active users per week.
5. ``train``: :func:`training.ranker.fit_ranker` with a fixed ``--rounds`` boosting rounds per
   booster (patience above the rounds: no early stopping), on those examples.
6. ``serving``: the servable model (:func:`training.two_stage.final_model`) and the **in-process
   scoring core** of ``/recommend`` (:func:`recflow.ranker.recommend.recommend`), driven open loop at
   ``--rate`` requests/s (``benchmarks/serving.py``'s generator: latency from each request's
   scheduled time) with adaptive batching; no HTTP and no online read (step 3 measures that).

Stages run in the order 1, 4, 5, 6, 2, 3 (the sampled ones first). Each size runs in its own process
(peak RSS per size; a crash costs that size only; DuckDB spills into the size's home). The cap:
before a stage at a size, its time is predicted from the smaller sizes measured in this run (scaled
by events with the measured growth exponent, at least linear); a stage predicted over
``--budget-s`` is skipped with the stages that need it, and the JSON says so with the prediction;
a stage still running at 1.5 x the budget ends its size's process (recorded as killed); a stage
whose predicted peak RSS passes 90% of the memory available (``--max-rss-gb``) is skipped too.
Sampling is recorded per size; ``training_set`` also gives ``projected_full_s`` (examples linear in
users: an estimate, not a measurement).

Duration: extrapolated from 0.05x-0.2x runs on the 2-core machine (while another job used about one
core), the defaults take about 30 minutes for 1,4,16 (1x ~4 min, 4x ~14 min, 16x ~14 min), the 16x
feature build (predicted ~40 min) and materialisation being skipped by the cap; ``--budget-s 3600``
runs them too (about 1.5 hours, and the memory guard may still skip them).

Writes ``--out`` (default benchmarks/results/scale.json) and a log-log plot next to it (``.png``):
seconds per stage against events, with a linear reference; ``growth_exponents`` are the slopes of
log seconds against log events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"

# Complete Journey as ingested here (canonical tables of `recflow ingest`): the 1x reference.
CJ = {
    "users": 2469,
    "items": 92331,
    "items_sold": 68492,
    "events": 1464471,
    "baskets": 155691,
    "categories": 303,
    "departments": 32,
    "start": "2017-01-01",
    "end": "2018-01-01",
    "top10pct_item_share": 0.720,
    "repeat_share": 0.409,
}
ZIPF_ALPHA = 1.3  # item popularity ~ 1 / (rank / items + ZIPF_OFFSET) ** ZIPF_ALPHA: the same curve
ZIPF_OFFSET = 0.014  # over rank quantiles at every size (an item's share of lines falls with the catalogue)
STAPLES_MEAN = 13.0  # staples per user (more for busier users)
EXPLORE_MEAN = 5.4  # exploration lines per trip
UNSOLD_SHARE = 0.15  # of the catalogue
SKIP_SHARE = 0.1  # a due staple is forgotten on this share of trips
ACTIVITY_SIGMA = 0.75  # users' trips per year ~ lognormal
ADOPT_SHARE = 0.3  # staples adopted at some point of the year rather than from its start

# sampled stages first: a feature stage that runs long (it is killed at HARD_FACTOR x budget) costs only itself
STAGES = ("generate", "ingest", "training_set", "train", "serving", "features", "materialize")
HARD_FACTOR = 1.5
RSS_UNGUARDED = {"generate", "features"}  # DuckDB bounds its own memory (memory_limit) and spills to disk
NEEDS = {
    "ingest": "generate",
    "features": "ingest",
    "materialize": "features",
    "training_set": "ingest",
    "train": "training_set",
    "serving": "train",
}


# --- the synthetic shop --------------------------------------------------------------------------
def _segment_cumsum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at every segment of ``lengths``."""
    total = np.cumsum(values)
    starts = np.cumsum(lengths) - lengths
    before = np.where(starts > 0, total[np.maximum(starts - 1, 0)], 0.0)
    return total - np.repeat(before, lengths)


def _draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n)), len(cdf) - 1)


def synthetic_shop(scale: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(interactions, items)`` of a shop shaped like Complete Journey at ``scale`` times its users,
    catalogue and purchase lines (see the module docstring); ids are integers as in CJ, one purchase
    line per (basket, item) with its quantity, ``event_id = "<basket_id>:<item_id>"``."""
    rng = np.random.default_rng(seed)
    n_users = max(20, round(CJ["users"] * scale))
    n_items = max(200, round(CJ["items"] * scale))
    start = pd.Timestamp(CJ["start"], tz="UTC")
    days = (pd.Timestamp(CJ["end"], tz="UTC") - start).days

    rank = rng.permutation(n_items)
    pop = (rank / n_items + ZIPF_OFFSET) ** -ZIPF_ALPHA
    pop[rng.random(n_items) < UNSOLD_SHARE] = 0.0  # listed, never sold in the year (CJ: 26% of its products)
    cdf = np.cumsum(pop / pop.sum())

    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, n_users)
    activity /= activity.mean()
    trips = np.maximum(1, rng.poisson(CJ["baskets"] / CJ["users"] * activity))
    trip_user = np.repeat(np.arange(n_users), trips)
    first_trip = np.cumsum(trips) - trips
    hour = np.mod(rng.normal(19.0, 4.0, len(trip_user)), 24.0)
    trip_s = rng.integers(0, days, len(trip_user)) * 86400 + (hour * 3600).astype(np.int64)
    trip_s = trip_s[np.lexsort((trip_s, trip_user))]  # each user's trips in time order

    # staples: bought every ~period trips (gamma jitter), from a phase (some adopted mid-year)
    n_staples = 1 + rng.poisson(STAPLES_MEAN * activity**0.3)
    st_user = np.repeat(np.arange(n_users), n_staples)
    st_item = _draw(cdf, rng, len(st_user))
    period = 1.0 + rng.gamma(1.5, 2.0, len(st_user))
    phase = rng.uniform(0, period) + np.where(
        rng.random(len(st_user)) < ADOPT_SHARE, rng.uniform(0, trips[st_user]), 0.0
    )
    n_draws = np.ceil(np.maximum(trips[st_user] - phase, 0) / period).astype(np.int64) + 1
    gaps = np.repeat(period, n_draws) * rng.gamma(6.0, 1 / 6.0, int(n_draws.sum()))
    pos = np.repeat(phase, n_draws) + _segment_cumsum(gaps, n_draws) - gaps
    k = np.floor(pos).astype(np.int64)
    owner = np.repeat(st_user, n_draws)
    keep = (k < trips[owner]) & (rng.random(len(k)) >= SKIP_SHARE)
    staple_trip = first_trip[owner[keep]] + k[keep]
    staple_item = np.repeat(st_item, n_draws)[keep]

    # exploration: lines from the popularity curve on every trip
    n_explore = rng.poisson(EXPLORE_MEAN, len(trip_user))
    explore_trip = np.repeat(np.arange(len(trip_user)), n_explore)
    explore_item = _draw(cdf, rng, len(explore_trip))

    key = np.concatenate([staple_trip, explore_trip]) * n_items + np.concatenate([staple_item, explore_item])
    key, count = np.unique(key, return_counts=True)
    trip, item = key // n_items, key % n_items
    del key, staple_trip, staple_item, explore_trip, explore_item, gaps, pos, k, owner, keep

    price = np.round(rng.lognormal(0.7, 0.6, n_items), 2)
    n_cat = max(10, round(CJ["categories"] * scale))
    category = _draw(np.cumsum(rng.dirichlet(np.full(n_cat, 0.5))), rng, n_items)  # uneven category sizes
    basket_id = 30_000_000_000 + trip
    item_id = 1_000_000 + item
    event_id = pc.binary_join_element_wise(
        pc.cast(pa.array(basket_id), pa.string()), pc.cast(pa.array(item_id), pa.string()), ":"
    )
    interactions = pd.DataFrame(
        {
            "event_id": pd.Series(pd.arrays.ArrowExtensionArray(event_id)),
            "user_id": 1 + trip_user[trip],
            "item_id": item_id,
            "timestamp": start + pd.to_timedelta(trip_s[trip], unit="s"),
            "event_type": "purchase",
            "basket_id": basket_id,
            "quantity": (count + rng.poisson(0.25, len(trip))).astype(np.float64),
            "price": np.round(price[item] * rng.choice([1.0, 1.0, 1.0, 0.8], len(trip)), 2),
        }
    )
    names = np.arange(n_cat).astype(str).astype(object)
    items = pd.DataFrame(
        {
            "item_id": 1_000_000 + np.arange(n_items),
            "title": "product type " + names[category],
            "category": "category " + names[category],
            "department": "department "
            + (np.arange(n_cat) % CJ["departments"]).astype(str).astype(object)[category],
            "brand": np.where(rng.random(n_items) < 0.15, "Private", "National"),
            "price": price,
        }
    )
    return interactions, items


def shop_stats(interactions: pd.DataFrame, n_items: int | None = None) -> dict[str, float]:
    """Shape of a shop: counts, the top 10% of the catalogue's share of lines, the share of lines
    re-buying an item the user bought before, lines per basket."""
    ev = interactions
    counts = ev["item_id"].value_counts().to_numpy()
    n = n_items or int(ev["item_id"].nunique())
    top = max(1, n // 10)
    order = np.lexsort((ev["timestamp"].to_numpy(), ev["item_id"].to_numpy(), ev["user_id"].to_numpy()))
    u, i = ev["user_id"].to_numpy()[order], ev["item_id"].to_numpy()[order]
    repeat = (u[1:] == u[:-1]) & (i[1:] == i[:-1])
    per_user = ev.groupby("user_id").size()
    return {
        "users": int(ev["user_id"].nunique()),
        "items": int(n),
        "items_sold": int(ev["item_id"].nunique()),
        "events": int(len(ev)),
        "baskets": int(ev["basket_id"].nunique()),
        "top10pct_item_share": round(float(counts[:top].sum() / counts.sum()), 4),
        "repeat_share": round(float(repeat.sum() / len(ev)), 4),
        "lines_per_basket": round(len(ev) / ev["basket_id"].nunique(), 2),
        "lines_per_user_median": float(per_user.median()),
        "lines_per_user_cv": round(float(per_user.std() / per_user.mean()), 3),
    }


def growth_exponent(events: list[float], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(events): 1 is linear (None with < 2 usable points)."""
    pts = [
        (math.log(e), math.log(s))
        for e, s in zip(events, seconds, strict=True)
        if e and s and e > 0 and s > 0
    ]
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    return round(float(np.polyfit(x, y, 1)[0]), 3)


# --- one size ------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak RSS of this process so far (MB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    """Current RSS of this process (MB)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """The peak RSS since :meth:`reset`, sampled every ``every`` s by a daemon thread: one stage's own
    peak (memory an earlier stage freed but the allocator kept counts too)."""

    def __init__(self, every: float = 0.1) -> None:
        self.peak = rss_mb()
        self.every = every
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every)

    def reset(self) -> float:
        self.peak = rss_mb()
        return round(self.peak, 1)

    def read(self) -> float:
        return round(max(self.peak, rss_mb()), 1)


def _timed(fn, *a, **kw) -> tuple[Any, float]:  # noqa: ANN001
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def stage_generate(home: Path, scale: float, seed: int) -> dict[str, Any]:
    (interactions, items), secs = _timed(synthetic_shop, scale, seed)
    shop = home / "shop"
    shop.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    interactions.to_parquet(shop / "interactions.parquet", index=False)
    items.to_parquet(shop / "items.parquet", index=False)
    write_s = time.perf_counter() - t
    stats = shop_stats(interactions, len(items))
    return {
        "seconds": round(secs, 2),
        "write_s": round(write_s, 2),
        "files": {"interactions": str(shop / "interactions.parquet"), "items": str(shop / "items.parquet")},
        "shop": stats,
    }


def _settings(home: Path):  # noqa: ANN202
    from recflow.settings import load_settings

    shop = home / "shop"
    return load_settings(
        home=home,
        data={
            "source": "generic",
            "interactions_path": shop / "interactions.parquet",
            "items_path": shop / "items.parquet",
        },
    )


def stage_ingest(settings) -> dict[str, Any]:  # noqa: ANN001
    from recflow.datasets import ingest

    report, secs = _timed(ingest, settings)
    ev = report.tables["events"]
    return {
        "seconds": round(secs, 2),
        "rows": ev.total_rows,
        "accepted": ev.accepted_rows,
        "rows_per_s": round(ev.total_rows / secs),
        "rejected": ev.rejected_rows,
    }


def stage_features(settings) -> dict[str, Any]:  # noqa: ANN001
    from recflow.features.build import build_feature_tables

    built, secs = _timed(build_feature_tables, settings)
    return {
        "seconds": round(secs, 2),
        "rows": int(sum(built.tables.values())),
        "tables": built.tables,
        "rows_per_s": round(sum(built.tables.values()) / secs),
        "table_seconds": built.seconds,
    }


def stage_materialize(settings, reads: int) -> dict[str, Any]:  # noqa: ANN001
    from benchmarks.features import read_latency
    from recflow import feature_store as fs

    store = fs.get_store(settings)
    _, apply_s = _timed(fs.apply, settings, store)
    start, end = fs.default_window(settings)
    m = fs.materialize(settings, start, end, store=store)
    users = sorted(pd.read_parquet(settings.paths.users, columns=["user_id"]).user_id.astype(str))
    service = store.get_feature_service(settings.feast.serving_service)
    read = read_latency(store, service, users, reads, 1)
    return {
        "seconds": round(m.seconds, 2),
        "rows": m.rows_in_window,
        "rows_per_s": round(m.rows_per_s),
        "feast_apply_s": round(apply_s, 2),
        "window": [str(start), str(end)],
        "online_store": settings.feast.online_store,
        "online_read_1_user": {k: round(v, 3) for k, v in read.items()},
    }


class Training:
    """State the training stages share within one size's process."""

    def __init__(self) -> None:
        self.inputs = self.cfg = self.weeks = self.val = self.ranker = None


def stage_training_set(
    settings, tr: Training, weeks: int, users: int, rounds: int, seed: int
) -> dict[str, Any]:  # noqa: ANN001
    from recflow.schemas import LOG_COLUMNS
    from training.protocol import Protocol
    from training.ranker import build_week, item_side_at, targets_of
    from training.two_stage import Inputs, config_for
    from training.two_stage import seconds as epoch

    t0 = time.perf_counter()
    events = pd.read_parquet(settings.paths.events, columns=list(LOG_COLUMNS))
    items = pd.read_parquet(settings.paths.items)
    protocol = Protocol.default(events, weeks, 1, 7)
    tr.inputs = Inputs.build(events, items, None)
    del events, items
    load_s = time.perf_counter() - t0
    # patience above the rounds: every booster trains exactly `rounds` rounds
    tr.cfg = config_for(tr.inputs, max_rounds=rounds, early_stopping_rounds=rounds + 1)
    log = tr.inputs.log
    off = log.offsets()
    first_ts = np.where(
        np.diff(off) > 0, log.ts[np.minimum(off[:-1], max(len(log) - 1, 0))], np.iinfo(np.int64).max
    )
    rng = np.random.default_rng(seed)
    side_s = ex_s = 0.0
    rows = sampled = eligible_total = 0
    per_week = []
    built = []
    for a in (*protocol.train, protocol.validation):
        anchor = epoch(a)
        side, s = _timed(item_side_at, log, anchor, tr.inputs.items, tr.cfg.candidates.neighbors)
        _, active = targets_of(log, anchor, protocol.days)
        eligible = active[first_ts[active] < anchor]
        pick = np.sort(rng.choice(eligible, size=min(users, len(eligible)), replace=False))
        w, e = _timed(build_week, log, anchor, protocol.days, tr.inputs.items, tr.cfg, side=side, users=pick)
        side_s, ex_s = side_s + s, ex_s + e
        rows, sampled, eligible_total = rows + len(w.y), sampled + len(pick), eligible_total + len(eligible)
        per_week.append(
            {
                "anchor": str(a.date()),
                "eligible_users": int(len(eligible)),
                "sampled_users": int(len(pick)),
                "rows": int(len(w.y)),
                "positives": int(w.y.sum()),
                "item_side_s": round(s, 2),
                "examples_s": round(e, 2),
            }
        )
        if a is not protocol.validation:
            w.side = None
        built.append(w)
    tr.weeks, tr.val = built[:-1], built[-1]
    secs = time.perf_counter() - t0
    return {
        "seconds": round(secs, 2),
        "rows": rows,
        "rows_per_s": round(rows / max(secs, 1e-9)),
        "load_s": round(load_s, 2),
        "item_side_s": round(side_s, 2),
        "examples_s": round(ex_s, 2),
        "sampled_users": sampled,
        "eligible_users": eligible_total,
        "projected_full_s": round(load_s + side_s + ex_s * eligible_total / max(sampled, 1), 1),
        "projection": "load + item side as measured, examples scaled linearly to every eligible user",
        "weeks": per_week,
        "protocol": protocol.describe(),
        "features": len(tr.cfg.features),
    }


def stage_train(tr: Training, threads: int, rounds: int) -> dict[str, Any]:
    from training.ranker import fit_ranker

    tr.cfg.threads = threads
    tr.ranker, secs = _timed(fit_ranker, tr.weeks, tr.val, tr.cfg)
    tr.cfg.threads = 0  # serving: the ranker's own choice per batch, as in the service
    m = tr.ranker.metrics
    # every booster trains `rounds` rounds (patience above them); LightGBM keeps the trees up to the
    # best validation iteration in the returned booster
    kept = {"ranker": int(tr.ranker.booster.current_iteration())}
    if tr.ranker.unseen is not None:
        kept["unseen"] = int(tr.ranker.unseen.current_iteration())
    if tr.ranker.seen is not None:
        kept["seen"] = int(tr.ranker.seen.current_iteration())
    rows = m["train_rows"] + m.get("unseen", {}).get("train_rows", 0) + m.get("seen", {}).get("train_rows", 0)
    tr.weeks = None
    return {
        "seconds": round(secs, 2),
        "rows": int(rows),
        "rows_per_s": round(rows / max(secs, 1e-9)),
        "rounds_per_booster": rounds,
        "boosters": len(kept),
        "trees_kept": kept,
        "lgb_threads": threads or "LightGBM default (every core)",
        "ranker_rows": m["train_rows"],
        "ranker_groups": m["train_groups"],
        "unseen_rows": m.get("unseen", {}).get("train_rows"),
        "early_stopping": False,
        "fit_seconds": {"ranker": m["fit_seconds"], "unseen": m.get("unseen", {}).get("fit_seconds")},
    }


def drive(model, asks: list, rate: float, duration: float, max_batch: int, seed: int) -> dict[str, Any]:  # noqa: ANN001
    """Open loop at ``rate`` requests/s for ``duration`` s (``benchmarks/serving.py``'s ``_open_loop``:
    latency from each request's scheduled time) into one worker thread that ranks whatever has
    queued, up to ``max_batch`` requests at once, with :func:`recflow.ranker.recommend.recommend`."""
    from benchmarks.serving import _open_loop
    from recflow.ranker.recommend import recommend

    n = int(rate * duration)
    picks = np.random.default_rng(seed).integers(0, len(asks), n)
    lat, status = np.full(n, np.nan), np.zeros(n, np.int32)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    sizes: list[int] = []

    def settle(fut: asyncio.Future, ok: bool) -> None:
        if not fut.done():
            fut.set_result(ok)

    def worker() -> None:
        while (first := inbox.get()) is not None:
            batch = [first]
            while len(batch) < max_batch:
                try:
                    nxt = inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    inbox.put(None)
                    break
                batch.append(nxt)
            try:
                recommend(model, [asks[picks[i]] for i, _, _ in batch])
                ok = True
            except Exception:  # noqa: BLE001 - counted as an error
                ok = False
            sizes.append(len(batch))
            for _, fut, loop in batch:
                loop.call_soon_threadsafe(settle, fut, ok)

    async def run() -> float:
        loop = asyncio.get_running_loop()

        async def send(i: int) -> None:
            fut = loop.create_future()
            inbox.put((i, fut, loop))
            if not await fut:
                raise RuntimeError("recommend failed")
            status[i] = 200

        return await _open_loop(rate, n, send, lat, status)

    recommend(model, asks[:20])  # warm up
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    cpu0 = time.process_time()
    wall = asyncio.run(run())
    cpu = time.process_time() - cpu0
    inbox.put(None)
    thread.join(timeout=60)
    ok = status == 200
    return {
        "requests": n,
        "target_rps": rate,
        "rps": round(float(ok.sum()) / duration, 1),
        "wall_s": round(wall, 2),
        "p50_ms": round(float(np.nanpercentile(lat, 50)), 2),
        "p95_ms": round(float(np.nanpercentile(lat, 95)), 2),
        "p99_ms": round(float(np.nanpercentile(lat, 99)), 2),
        "max_ms": round(float(np.nanmax(lat)), 2),
        "errors": int((~ok).sum()),
        "mean_batch": round(float(np.mean(sizes)), 2) if sizes else None,
        "batches": len(sizes),
        "process_cpu_s": round(cpu, 2),
    }


def stage_serving(
    settings, tr: Training, rate: float, duration: float, pool: int, seed: int
) -> dict[str, Any]:  # noqa: ANN001
    from recflow.ranker.recommend import Ask
    from training.two_stage import final_model

    log = tr.inputs.log
    as_of = int(log.ts.max()) + 1 if len(log) else 0
    model, build_s = _timed(final_model, tr.inputs, tr.ranker, as_of)
    recent = log.recent(settings.features.history_length)  # what the online user_history holds
    off = recent.offsets()
    with_lines = np.flatnonzero(np.diff(off) > 0)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(with_lines, size=min(pool, len(with_lines)), replace=False)
    ids = np.asarray(model.item_ids).astype(str)
    asks = [
        Ask(
            ids[recent.item[off[u] : off[u + 1]]].tolist(),
            recent.ts[off[u] : off[u + 1]].tolist(),
            as_of,
            10,
            user_id=str(recent.user_ids[u]),
        )
        for u in chosen
    ]
    max_batch = settings.serving.max_batch_size
    run = drive(model, asks, rate, duration, max_batch, seed)
    hist = np.diff(off)[chosen]
    return {
        "seconds": round(build_s + run["wall_s"], 2),
        "model_build_s": round(build_s, 2),
        **run,
        "mode": "in-process scoring core: recflow.ranker.recommend.recommend on the two-stage model "
        "(training.two_stage.final_model as of the data end), one worker thread ranking what queued "
        f"(up to serving.max_batch_size={max_batch}), open loop (benchmarks/serving.py _open_loop); "
        "histories from the canonical events cut to features.history_length as user_history holds "
        "them; no HTTP, no BentoML, no online read (see materialize.online_read_1_user)",
        "user_pool": len(asks),
        "history_lines_mean": round(float(hist.mean()), 1),
        "k": 10,
    }


def run_size(scale: float, home: Path, part: Path, skip: dict[str, str], args: argparse.Namespace) -> None:
    """Every stage of one size (in this process), the JSON rewritten at ``part`` after each one; a
    stage still running after ``HARD_FACTOR x --budget-s`` ends the process (recorded as killed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"scale": scale, "home": str(home), "stages": {}}
    stages: dict[str, Any] = out["stages"]
    hard = args.budget_s * HARD_FACTOR

    def save() -> None:
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str))
        os.replace(tmp, part)

    def expire(name: str, t0: float) -> None:
        stages[name] = {
            "killed": f"still running after {hard:.0f} s ({HARD_FACTOR:g} x --budget-s); the size's "
            "process was ended",
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": sampler.read(),
            "process_peak_rss_mb": peak_rss_mb(),
        }
        out["peak_rss_mb"] = peak_rss_mb()
        save()
        print(f"[{scale:g}x] {name}: killed after {hard:.0f} s", flush=True)
        os._exit(3)

    tr = Training()
    settings = None
    sampler = RssSampler()
    for name in STAGES:
        need = NEEDS.get(name)
        if name in skip:
            stages[name] = {"skipped": skip[name]}
        elif need and "seconds" not in stages.get(need, {}):
            stages[name] = {"skipped": f"needs {need}, which did not run"}
        if "skipped" in stages.get(name, {}):
            save()
            continue
        print(f"[{scale:g}x] {name} ...", flush=True)
        start_rss = sampler.reset()
        timer = threading.Timer(hard, expire, args=(name, time.perf_counter()))
        timer.daemon = True
        timer.start()
        try:
            if name == "generate":
                res = stage_generate(home, scale, args.seed)
                out.update({k: res["shop"][k] for k in ("users", "items", "events")})
            else:
                settings = settings or _settings(home)
                if name == "ingest":
                    res = stage_ingest(settings)
                    out["events"] = res["accepted"]
                elif name == "features":
                    res = stage_features(settings)
                elif name == "materialize":
                    res = stage_materialize(settings, args.reads)
                elif name == "training_set":
                    res = stage_training_set(
                        settings, tr, args.train_weeks, args.train_users, args.rounds, args.seed
                    )
                elif name == "train":
                    res = stage_train(tr, args.lgb_threads, args.rounds)
                else:
                    res = stage_serving(
                        settings, tr, args.rate, args.serve_seconds, args.user_pool, args.seed
                    )
        except Exception as exc:  # noqa: BLE001 - recorded; later stages that need it are skipped
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            timer.cancel()
        if name == "serving" or (name in ("training_set", "train") and "seconds" not in res):
            tr = Training()  # the feature stages run after these: free the log and examples
        res["rss_at_start_mb"] = start_rss
        res["peak_rss_mb"] = sampler.read()  # this stage's (sampled)
        res["process_peak_rss_mb"] = peak_rss_mb()  # the size's process so far
        stages[name] = res
        print(
            f"[{scale:g}x] {name}: {res.get('seconds', res.get('error'))} s, peak RSS {res['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        save()
    out["peak_rss_mb"] = peak_rss_mb()
    save()


# --- the run -------------------------------------------------------------------------------------
def predict(sizes: list[dict[str, Any]], stage: str, events: float) -> float | None:
    """Seconds of ``stage`` at ``events`` from the sizes measured so far: the largest one, scaled with
    the measured growth exponent (at least 1; 1 with a single size). Serving's load phase lasts the
    same at every size: only its model build is scaled."""
    scaled = "model_build_s" if stage == "serving" else "seconds"
    done = [
        (
            s["events"],
            s["stages"][stage].get(scaled, s["stages"][stage]["seconds"]),
            s["stages"][stage]["seconds"],
        )
        for s in sizes
        if "seconds" in s.get("stages", {}).get(stage, {}) and s.get("events")
    ]
    if not done:
        return None
    slope = growth_exponent([e for e, _, _ in done], [t for _, t, _ in done]) or 1.0
    e0, t0, total = max(done)
    return t0 * (events / e0) ** max(slope, 1.0) + (total - t0)


def predict_rss(sizes: list[dict[str, Any]], stage: str, events: float) -> float | None:
    """Peak RSS (MB) of ``stage`` at ``events``: the RSS it started from at the largest size measured
    plus its own growth (peak - start), linear in events through the two largest sizes (through zero
    with one). None for stages in :data:`RSS_UNGUARDED`."""
    if stage in RSS_UNGUARDED:
        return None
    done = sorted(
        (
            s["events"],
            s["stages"][stage]["peak_rss_mb"] - s["stages"][stage].get("rss_at_start_mb", 0.0),
            s["stages"][stage].get("rss_at_start_mb", 0.0),
        )
        for s in sizes
        if s.get("events")
        and "seconds" in s.get("stages", {}).get(stage, {})
        and "peak_rss_mb" in s["stages"][stage]
    )
    if not done:
        return None
    e2, g2, start = done[-1]
    if len(done) == 1 or done[-2][0] >= e2:
        return start + max(g2, 0.0) * events / e2
    e1, g1, _ = done[-2]
    return start + max(g2 + max((g2 - g1) / (e2 - e1), 0.0) * (events - e2), 0.0)


def plan(
    sizes: list[dict[str, Any]], scale: float, budget: float, rss_limit_mb: float = math.inf
) -> tuple[dict[str, str], dict[str, float]]:
    """Stages to skip at ``scale`` (predicted over the time budget or the memory limit, or not run at a
    smaller size) and the predictions (seconds; ``<stage>_peak_rss_mb``)."""
    events = CJ["events"] * scale
    skip, pred = {}, {}
    for stage in STAGES[1:]:
        earlier = [s["stages"].get(stage, {}) for s in sizes if s.get("scale", 0) < scale]
        if any("seconds" not in e for e in earlier):
            skip[stage] = "did not run at a smaller size"
            continue
        p = predict(sizes, stage, events)
        if p is not None:
            pred[stage] = round(p, 1)
            if p > budget:
                skip[stage] = f"predicted {p:.0f} s > budget {budget:g} s (--budget-s)"
        m = predict_rss(sizes, stage, events)
        if m is not None:
            pred[f"{stage}_peak_rss_mb"] = round(m)
            if m > rss_limit_mb and stage not in skip:
                skip[stage] = (
                    f"predicted peak RSS {m / 1024:.1f} GB > {rss_limit_mb / 1024:.1f} GB (--max-rss-gb)"
                )
    return skip, pred


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return math.inf


# what the cost curve plots per stage: its seconds (serving: building the servable model; its load
# phase lasts --serve-seconds at every size, its latency is the right-hand panel)
CURVES = {stage: (stage, "seconds") for stage in STAGES} | {
    "serving": ("serving (model build)", "model_build_s")
}


def series(sizes: list[dict[str, Any]], stage: str, key: str) -> tuple[list[float], list[float]]:
    """(events, values) of ``stage``'s ``key`` over the sizes where it was measured."""
    pts = [
        (s["events"], s["stages"][stage][key])
        for s in sizes
        if s.get("events") and key in s.get("stages", {}).get(stage, {})
    ]
    return [e for e, _ in pts], [v for _, v in pts]


def exponents(sizes: list[dict[str, Any]]) -> dict[str, float | None]:
    out = {label: growth_exponent(*series(sizes, stage, key)) for stage, (label, key) in CURVES.items()}
    out["training_set (projected to every user)"] = growth_exponent(
        *series(sizes, "training_set", "projected_full_s")
    )
    out["serving p99_ms"] = growth_exponent(*series(sizes, "serving", "p99_ms"))
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = doc["sizes"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    xs_all: list[float] = []
    first: tuple[float, float] | None = None
    for stage, (label, key) in CURVES.items():
        x, y = series(sizes, stage, key)
        if not x:
            continue
        xs_all += x
        slope = doc["growth_exponents"].get(label)
        ax.plot(x, y, "o-", label=label + (f" (slope {slope:.2f})" if slope is not None else ""))
        if stage == "ingest":
            first = (x[0], y[0])
    if xs_all:
        x0, y0 = first or (min(xs_all), 1.0)
        xs = np.array([min(xs_all), max(xs_all)])
        ax.plot(xs, y0 * xs / x0, "k--", lw=1, label="linear reference (slope 1, through ingest)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="purchase events (log)",
        ylabel="seconds (log)",
        title="stage seconds vs shop size (training_set/train/serving on fixed samples)",
    )
    ax.legend(fontsize=7)
    x, y = series(sizes, "serving", "p99_ms")
    if x:
        ax2.plot(x, y, "o-", color="C6", label=f"p99 at {doc['settings']['rate']:g} req/s")
        ax2.plot(*series(sizes, "serving", "p50_ms"), "o--", color="C7", label="p50")
        ax2.legend(fontsize=8)
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="purchase events (log)",
        ylabel="ms (log)",
        title="/recommend in-process scoring core",
    )
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scales", default="1,4,16", help="Sizes as multiples of Complete Journey (e.g. 0.05 for a test)."
    )
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="Work folder (one home per size under it; default: a temp one).",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON path; the plot goes next to it (.png).")
    p.add_argument(
        "--rounds", type=int, default=100, help="Boosting rounds of each booster (no early stopping)."
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="Per-stage time budget (s): a stage predicted over it is skipped; one running 1.5x over it is killed.",
    )
    p.add_argument(
        "--max-rss-gb",
        type=float,
        default=0.0,
        help="Skip a stage predicted to need more memory (default: 90%% of the memory available when a size starts).",
    )
    p.add_argument(
        "--lgb-threads",
        type=int,
        default=0,
        help="LightGBM threads of the train stage (0: its default, every core, as the train flow).",
    )
    p.add_argument(
        "--train-weeks", type=int, default=4, help="Weekly training anchors (plus the validation week)."
    )
    p.add_argument(
        "--train-users", type=int, default=1000, help="Active users sampled per anchor for the examples."
    )
    p.add_argument("--rate", type=float, default=100.0, help="Requests per second of the serving stage.")
    p.add_argument("--serve-seconds", type=float, default=20.0, help="Seconds of open-loop load per size.")
    p.add_argument(
        "--user-pool", type=int, default=2000, help="Users the serving requests are drawn from (uniformly)."
    )
    p.add_argument(
        "--reads", type=int, default=300, help="One-user online reads timed after materialisation."
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep", action="store_true", help="Keep each size's home (default: removed after the size)."
    )
    p.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # internal: run one size
    p.add_argument("--part", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        run_size(args.one, args.home, args.part, json.loads(args.skip), args)
        return None
    import shutil
    import tempfile

    from benchmarks.serving import machine

    scales = sorted(float(s) for s in args.scales.split(",") if s.strip())
    if args.out.resolve() == RESULTS and min(scales) < 1:
        p.error(f"sizes below 1x are a test, not the results: pass --out (default {RESULTS})")
    work = (args.home or Path(tempfile.mkdtemp(prefix="recflow-scale-"))).resolve()
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "benchmark": "cost curve on synthetic shops shaped like Complete Journey (benchmarks/scale.py)",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "command": " ".join(
            shlex.quote(a) for a in [sys.executable, "benchmarks/scale.py", *(argv or sys.argv[1:])]
        ),
        "reference_1x": CJ,
        "generator": {
            "zipf_alpha": ZIPF_ALPHA,
            "zipf_offset": ZIPF_OFFSET,
            "staples_mean": STAPLES_MEAN,
            "explore_lines_per_trip": EXPLORE_MEAN,
            "skip_share": SKIP_SHARE,
            "adopt_share": ADOPT_SHARE,
            "seed": args.seed,
            "files": "interactions.parquet (event_id, user_id, item_id, timestamp, "
            "event_type, basket_id, quantity, price) + items.parquet (item_id, title, category, department, "
            "brand, price); no users file",
        },
        "settings": {
            "rounds": args.rounds,
            "lgb_threads": args.lgb_threads,
            "budget_s": args.budget_s,
            "train_weeks": args.train_weeks,
            "train_users_per_week": args.train_users,
            "rate": args.rate,
            "serve_seconds": args.serve_seconds,
            "user_pool": args.user_pool,
            "online_reads": args.reads,
        },
        "sampling": {
            "ingest, features, materialize": "whole shop (no sampling)",
            "training_set": f"{args.train_weeks} weekly anchors + the validation week; at each, up to {args.train_users} "
            "of the users with a purchase in the week and one before, drawn uniformly; the item side "
            "(statistics, co-purchase, user vectors) from every user's lines; no text features "
            "(no MiniLM vectors)",
            "train": f"LightGBM on those examples, exactly {args.rounds} rounds per booster (ranker and never-bought "
            "ranker), patience above the rounds so early stopping never fires",
            "serving": "the in-process scoring core of /recommend, not the BentoML HTTP service (each size's "
            f"serving.mode): {args.rate:g} req/s open loop for {args.serve_seconds:g} s, users drawn uniformly from "
            f"a pool of {args.user_pool} users with a history",
            "cap": f"a stage predicted over {args.budget_s:g} s (--budget-s) from the smaller sizes of this run is "
            "skipped with the stages that need it (each size's predicted_s); a stage still running after "
            f"{HARD_FACTOR * args.budget_s:g} s ends its size's process (killed; later stages of that size not "
            "reached); a stage whose predicted peak RSS (linear in events through the two largest sizes) passes "
            "the size's rss_limit_mb is skipped too (not the feature build: DuckDB bounds its memory itself); the first size has no prediction and always runs",
        },
        "sizes": [],
    }
    for scale in scales:
        rss_limit = args.max_rss_gb * 1024 if args.max_rss_gb else 0.9 * mem_available_mb()
        skip, pred = plan(doc["sizes"], scale, args.budget_s, rss_limit)
        home = work / f"scale-{scale:g}"
        part = work / f"scale-{scale:g}.json"
        limit = args.budget_s * HARD_FACTOR * len(STAGES) + 120  # backstop: each stage has its own limit
        (home / "tmp").mkdir(parents=True, exist_ok=True)  # DuckDB spills here: removed with the home
        own = [a for a in (argv or sys.argv[1:]) if a != "--keep"]  # the last --home wins: this size's
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *own,
            "--one",
            str(scale),
            "--home",
            str(home),
            "--part",
            str(part),
            "--skip",
            json.dumps(skip),
        ]
        t = time.perf_counter()
        load = os.getloadavg()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, start_new_session=True, env={**os.environ, "TMPDIR": str(home / "tmp")}
        )
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"killed after {limit:.0f} s (stages x budget)"
        if isinstance(rc, int) and rc < 0:
            rc = f"ended by signal {-rc}" + (" (out of memory?)" if rc == -signal.SIGKILL else "")
        elif rc == 3:
            rc = "3 (a stage ran past its limit)"
        size = json.loads(part.read_text()) if part.exists() else {"scale": scale, "stages": {}}
        size["exit"] = rc
        size["load_average_before"] = load
        size["rss_limit_mb"] = round(rss_limit)
        size["wall_s"] = round(time.perf_counter() - t, 1)
        size["predicted_s"] = pred
        for stage in STAGES:
            size["stages"].setdefault(stage, {"skipped": f"not reached (size process exit: {rc})"})
        doc["sizes"].append(size)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    doc["growth_exponents"] = exponents(doc["sizes"])
    doc["growth_exponents_note"] = (
        "least-squares slope of log seconds vs log accepted events over the sizes where the stage ran (1 = linear); "
        "training_set, train and serving run on a fixed sample per size, so theirs is the growth at a fixed sample "
        "(what the catalogue and the item side cost), 'training_set (projected to every user)' that of the linear "
        "projection; serving's curve is building the servable model, 'serving p99_ms' the latency's slope"
    )
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    doc["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    png = args.out.with_suffix(".png")
    try:
        plot(doc, png)
        print(f"wrote {args.out} and {png}")
    except ImportError:
        print(
            f"wrote {args.out} (no plot: matplotlib is not installed; pip install -c constraints.txt matplotlib)"
        )
    summary = {
        f"{s['scale']:g}x": {st: s["stages"][st].get("seconds", "-") for st in STAGES} for s in doc["sizes"]
    }
    print(
        json.dumps(
            {
                "seconds": summary,
                "growth_exponents": doc["growth_exponents"],
                "total_seconds": doc["total_seconds"],
            },
            indent=1,
        )
    )
    return doc


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # benchmarks/serving.py would shadow the `serving` package otherwise
    main()
