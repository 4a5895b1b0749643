"""Synthetic shops unlike Complete Journey, to check that the defaults adapt (no re-buy habits).

    python benchmarks/shops.py films --out /tmp/films     # interactions.csv + items.csv

``films``: a catalogue that grows every week (new releases sell in their first weeks), users with
two or three favourite genres, popularity that decays with a release's age, and **no repeat
purchases** (a user buys a title at most once): personal top-frequency scores zero on it, and
what works is popularity, trends, co-purchase and neighbours.

``fashion``: a catalogue that grows every week, shoppers who browse in sessions (views of items
that suit their styles, some put in the cart) and buy mostly what they viewed or carted in the
last days, **almost never twice** (2% of purchases are repeats): what predicts a purchase is the
shopper's own recent views and carts, which purchase-only baselines cannot see. Then, for example::

    RECFLOW_HOME=/tmp/films/home recflow ingest --interactions /tmp/films/interactions.csv --items /tmp/films/items.csv
    RECFLOW_HOME=/tmp/films/home python benchmarks/quality.py --no-text --dataset "synthetic films" \\
        --out benchmarks/results/quality_films.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ("drama", "comedy", "thriller", "documentary", "animation", "horror", "romance", "sci-fi", "western", "musical")


def films(n_users: int = 3000, n_weeks: int = 30, releases_per_week: int = 60, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(interactions, items)`` of a no-repeat shop (see the module docstring)."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    n_items = n_weeks * releases_per_week + 400
    release_week = np.concatenate([np.full(400, -20), np.repeat(np.arange(n_weeks), releases_per_week)])
    genre = rng.integers(0, len(GENRES), n_items)
    quality = rng.lognormal(0.0, 1.0, n_items)
    taste = np.stack([rng.dirichlet(np.full(len(GENRES), 0.3)) for _ in range(n_users)])
    activity = rng.gamma(1.5, 1.0, n_users)
    rows: list[tuple[int, int, float]] = []
    bought = np.zeros((n_users, n_items), bool)
    for w in range(n_weeks):
        age = w - release_week
        live = age >= 0
        appeal = np.where(live, quality * np.exp(-np.maximum(age, 0) / 4.0), 0.0)
        n_buys = rng.poisson(activity * 1.2)
        for u in np.flatnonzero(n_buys):
            p = appeal * taste[u, genre] * ~bought[u]
            if p.sum() <= 0:
                continue
            k = min(int(n_buys[u]), int((p > 0).sum()))
            picks = rng.choice(n_items, size=k, replace=False, p=p / p.sum())
            bought[u, picks] = True
            for it in picks:
                rows.append((u, int(it), w * 7 + float(rng.uniform(0, 7))))
    ev = pd.DataFrame(rows, columns=["u", "i", "day"]).assign(event_type="purchase")
    return _files(ev, start, ("u", "f"), [GENRES[g] for g in genre], "film")


def _files(ev: pd.DataFrame, start: pd.Timestamp, prefixes: tuple[str, str], categories: list[str],
           noun: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The interactions and items files of a generated shop: ``ev`` holds user and item numbers
    (``u``, ``i``), days since ``start`` and the event type; item ``n`` is of ``categories[n]``."""
    user, item = prefixes
    interactions = pd.DataFrame({
        "user_id": user + ev["u"].astype(str),
        "item_id": item + ev["i"].astype(str),
        "timestamp": (start + pd.to_timedelta(ev["day"], unit="D")).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "event_type": ev["event_type"].to_numpy(),
        "quantity": 1,
    })
    items = pd.DataFrame({
        "item_id": item + pd.Series(np.arange(len(categories))).astype(str),
        "title": [f"{c} {noun} {n}" for n, c in enumerate(categories)],
        "category": categories,
    })
    return interactions, items


STYLES = ("casual", "formal", "sport", "vintage", "street", "outdoor", "beach", "evening", "basics", "kids")


def fashion(n_users: int = 3000, n_weeks: int = 26, new_per_week: int = 150, seed: int = 0
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(interactions, items)`` of a browse-then-buy shop with views and carts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    n_items = 1500 + n_weeks * new_per_week
    launch = np.concatenate([np.full(1500, -10), np.repeat(np.arange(n_weeks), new_per_week)]) * 7.0
    launch = launch + rng.uniform(0, 7, n_items) * (launch >= 0)
    style = rng.integers(0, len(STYLES), n_items)
    appeal0 = rng.lognormal(0.0, 1.0, n_items)
    taste = np.stack([rng.dirichlet(np.full(len(STYLES), 0.4)) for _ in range(n_users)])
    activity = rng.gamma(1.2, 1.0, n_users)
    rows: list[tuple[int, int, float, str]] = []
    bought = np.zeros((n_users, n_items), bool)
    for day in range(n_weeks * 7):
        age = day - launch
        appeal = np.where(age >= 0, appeal0 * np.exp2(-np.maximum(age, 0) / 42.0), 0.0)  # 6-week half-life
        sessions = rng.poisson(activity * 0.35)
        for u in np.flatnonzero(sessions):
            p = appeal * taste[u, style]
            if p.sum() <= 0:
                continue
            p = p / p.sum()
            for _ in range(int(sessions[u])):
                t0 = day + rng.uniform(0, 1)
                n_view = int(rng.integers(3, 9))
                viewed = rng.choice(n_items, size=min(n_view, int((p > 0).sum())), replace=False, p=p)
                for j, it in enumerate(viewed):
                    tv = t0 + j * 0.002
                    rows.append((u, int(it), tv, "view"))
                    if rng.random() < 0.12:  # into the cart
                        rows.append((u, int(it), tv + 0.001, "cart"))
                        if rng.random() < 0.55 and (not bought[u, it] or rng.random() < 0.02):
                            bought[u, it] = True  # bought in the session or within a few days
                            rows.append((u, int(it), tv + 0.002 + rng.exponential(1.5) * (rng.random() < 0.5), "purchase"))
    ev = pd.DataFrame(rows, columns=["u", "i", "day", "event_type"])
    return _files(ev[ev["day"] < n_weeks * 7], start, ("s", "a"), [STYLES[g] for g in style], "piece")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shop", choices=["films", "fashion"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    interactions, items = (films if args.shop == "films" else fashion)(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    interactions.to_csv(args.out / "interactions.csv", index=False)
    items.to_csv(args.out / "items.csv", index=False)
    print(f"{len(interactions):,} interactions, {len(items):,} items -> {args.out}")


if __name__ == "__main__":
    main()
