"""Synthetic shops unlike Complete Journey, to check that the defaults adapt (no re-buy habits).

    python benchmarks/shops.py films --out /tmp/films     # interactions.csv + items.csv

``films``: a catalogue that grows every week (new releases sell in their first weeks), users with
two or three favourite genres, popularity that decays with a release's age, and **no repeat
purchases** (a user buys a title at most once): personal top-frequency scores zero on it, and
what works is popularity, trends, co-purchase and neighbours. Then, for example::

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
    ev = pd.DataFrame(rows, columns=["u", "i", "day"])
    interactions = pd.DataFrame({
        "user_id": "u" + ev["u"].astype(str),
        "item_id": "f" + ev["i"].astype(str),
        "timestamp": (start + pd.to_timedelta(ev["day"], unit="D")).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "event_type": "purchase",
        "quantity": 1,
    })
    items = pd.DataFrame({
        "item_id": "f" + pd.Series(np.arange(n_items)).astype(str),
        "title": [f"{GENRES[g]} film {n}" for n, g in enumerate(genre)],
        "category": [GENRES[g] for g in genre],
    })
    return interactions, items


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shop", choices=["films"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    interactions, items = films(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    interactions.to_csv(args.out / "interactions.csv", index=False)
    items.to_csv(args.out / "items.csv", index=False)
    print(f"{len(interactions):,} interactions, {len(items):,} items -> {args.out}")


if __name__ == "__main__":
    main()
