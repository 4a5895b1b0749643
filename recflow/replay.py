"""Replay real events through the running service, day by day, as production traffic would arrive.

For every simulated day, each active user's baskets are replayed in time order: the user first
asks ``/recommend`` (with the basket's time as the request time), then the basket's lines go to
``/feedback/batch`` in one call (or, one by one, to ``/feedback``). Users are replayed concurrently;
one user's requests stay in order. A callback after each day lets the caller run the monitor every
simulated week.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from recflow.progress import report
from recflow.settings import Settings
from recflow.timeutil import to_utc

MAX_BATCH = 200  # events per /feedback/batch call (the service's limit)


@dataclass
class DayResult:
    """What one simulated day sent and how the service answered."""

    day: date
    users: int = 0
    baskets: int = 0
    events: int = 0
    recommend_calls: int = 0
    feedback_calls: int = 0
    feedback_events: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    fallback: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        return {
            "day": self.day.isoformat(),
            "users": self.users,
            "baskets": self.baskets,
            "events": self.events,
            "recommend_calls": self.recommend_calls,
            "feedback_calls": self.feedback_calls,
            "feedback_events": self.feedback_events,
            "errors": self.errors,
            "error_examples": self.error_examples[:3],
            "fallback": self.fallback,
            "p50_ms": round(float(np.nanpercentile(lat, 50)), 2),
            "p99_ms": round(float(np.nanpercentile(lat, 99)), 2),
            "seconds": round(self.seconds, 2),
        }


def load_replay_events(settings: Settings, start: date | datetime | str, days: int) -> pd.DataFrame:
    """Purchase events in [start, start + days): from the holdout file if ingest kept one, else canonical."""
    paths = settings.paths
    source = paths.holdout_events if paths.holdout_events.exists() else paths.events
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: run `recflow features` (with --until for a holdout) first.")
    lo = to_utc(start)
    hi = lo + pd.Timedelta(days=days)
    events = pd.read_parquet(source, filters=[("event_timestamp", ">=", lo), ("event_timestamp", "<", hi)])
    if events.empty:
        raise ValueError(f"no events in [{lo.date()}, {hi.date()}) in {source}; pick dates inside the data.")
    events = events.sort_values(["event_timestamp", "event_id"], kind="stable").reset_index(drop=True)
    events["basket"] = events["basket_id"].fillna(events["user_id"] + "@" + events["event_timestamp"].astype(str))
    return events


def _feedback_body(line: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": line.event_id,  # idempotency: a retried replay does not double-count
        "user_id": line.user_id,
        "item_id": line.item_id,
        "event_type": line.event_type,
        "timestamp": line.event_timestamp.isoformat(),
    }
    if pd.notna(line.basket_id):
        body["basket_id"] = line.basket_id
    if pd.notna(line.quantity):
        body["quantity"] = float(line.quantity)
    if pd.notna(line.price):
        body["price"] = float(line.price)
    return body


async def _replay_user(
    client: Any, user_events: pd.DataFrame, k: int, headers: dict[str, str], result: DayResult, gate: asyncio.Semaphore,
    batch: bool, last_post: dict[str, float], settle_s: float,
) -> None:
    for _, basket in user_events.groupby("basket", sort=False):
        first = basket.iloc[0]
        # A shopper's baskets are hours apart; replayed, they would be milliseconds apart, faster than
        # the previous basket's online push lands. Wait (without holding a slot) until settle_s has
        # passed since this user's last post, as real time would.
        wait = settle_s - (time.perf_counter() - last_post.get(first.user_id, -math.inf))
        if wait > 0:
            await asyncio.sleep(wait)
        async with gate:
            await _call(client, "/recommend", {"user_id": first.user_id, "k": k,
                                                "timestamp": first.event_timestamp.isoformat()}, {}, result)
            bodies = [_feedback_body(line) for line in basket.itertuples(index=False)]
            if batch:  # a checkout posts its basket at once: one durable append and one online push
                for s in range(0, len(bodies), MAX_BATCH):
                    await _call(client, "/feedback/batch", {"events": bodies[s : s + MAX_BATCH]}, headers, result,
                                n_events=len(bodies[s : s + MAX_BATCH]))
            else:
                for body in bodies:
                    await _call(client, "/feedback", body, headers, result)
        last_post[first.user_id] = time.perf_counter()


async def _call(client: Any, path: str, body: dict[str, Any], headers: dict[str, str], result: DayResult,
                n_events: int = 1) -> None:
    t = time.perf_counter()
    try:
        response = await client.post(path, json=body, headers=headers)
        ok = response.status_code == 200
        detail = "" if ok else f"{path} {response.status_code}: {response.text[:200]}"
        if ok and path == "/recommend" and response.json().get("fallback"):
            result.fallback += 1
    except Exception as exc:  # noqa: BLE001 - a replay reports errors, it does not stop on one
        ok, detail = False, f"{path}: {type(exc).__name__}: {exc}"
    result.latencies_ms.append((time.perf_counter() - t) * 1e3)
    if path == "/recommend":
        result.recommend_calls += 1
    else:
        result.feedback_calls += 1
        result.feedback_events += n_events
    if not ok:
        result.errors += 1
        if len(result.error_examples) < 5:
            result.error_examples.append(detail)


async def _replay_day(base_url: str, day_events: pd.DataFrame, k: int, token: str | None, concurrency: int,
                      day: date, batch: bool, last_post: dict[str, float] | None = None,
                      settle_s: float = 0.0) -> DayResult:
    import httpx

    result = DayResult(day=day, users=day_events["user_id"].nunique(), baskets=day_events["basket"].nunique(),
                       events=len(day_events))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        await asyncio.gather(
            *(_replay_user(client, g, k, headers, result, gate, batch, last_post if last_post is not None else {},
                           settle_s) for _, g in day_events.groupby("user_id", sort=False))
        )
    result.seconds = time.perf_counter() - started
    return result


def replay(
    settings: Settings,
    base_url: str,
    start: date | datetime | str,
    days: int,
    *,
    k: int = 10,
    token: str | None = None,
    concurrency: int = 8,
    on_day: Callable[[DayResult], None] | None = None,
    batch: bool = True,
    settle_s: float = 1.0,
) -> list[DayResult]:
    """Replay ``days`` days of real events from ``start`` through the service at ``base_url``.

    ``batch``: each basket's lines go to ``/feedback/batch`` in one call (as a checkout would post
    them); otherwise one ``/feedback`` call per line. ``token`` defaults to the home's write token
    (``recflow.security.serving_token``). ``settle_s``: the least wall time between two baskets of
    one user (their order is kept; other users go on meanwhile), so a basket's online push has
    landed before the same shopper asks again, as hours of real time would ensure."""
    from recflow.security import serving_token

    token = token or serving_token(settings)
    events = load_replay_events(settings, start, days)
    day_of = events["event_timestamp"].dt.floor("D")
    results = []
    last_post: dict[str, float] = {}  # user -> wall time of their last post (across days)
    first = pd.Timestamp(start).date()
    for offset in range(days):
        day = first + timedelta(days=offset)
        day_events = events[day_of.dt.date == day]
        report("replay", offset, days, f"{day}: {len(day_events):,} events")
        result = asyncio.run(_replay_day(base_url, day_events, k, token, concurrency, day, batch, last_post,
                                         settle_s)) if len(day_events) else \
            DayResult(day=day)
        results.append(result)
        if on_day is not None:
            on_day(result)
    report("replay", days, days, "done")
    return results
