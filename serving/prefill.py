"""Answer prefill: rank the most recently active users' default answers before a model serves.

A two-stage answer costs a worker several milliseconds of CPU (candidates, features, LightGBM),
so on 2 cores a fresh deploy queues: each user's first request is a miss of the
:class:`~serving.ranking.AnswerCache`. Precomputing the answers of the users who are most likely to
ask (the latest rows of the offline ``user_history`` table) turns those first requests into
hits. A prefilled answer is exactly what a request would get for the same history, as of the
prefill time: the same key (:func:`~serving.ranking.answer_key` of the default options), the same
history fingerprint, the same scoring core. A push changes the fingerprint, so a user who buys
something is ranked again at once; the cache's ``max_age_s`` bounds how old an answer may be.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recflow.ranker.log import history_lines
from serving.ranking import AnswerCache, HistoryAsk, answer_key

log = logging.getLogger("recflow.serving")

Fetch = Callable[[list[str]], "dict[str, dict[str, Any]] | None"]
Rank = Callable[[list[HistoryAsk]], list[Any]]  # one cached answer per ask


@dataclass(frozen=True)
class PrefillResult:
    """What a prefill did: users asked for, answers cached, seconds, and why it stopped early."""

    users: int
    answered: int
    seconds: float
    stopped: str | None = None  # None: every user was ranked


def recent_users(table: Path, limit: int) -> list[str]:
    """The ``limit`` users whose latest ``user_history`` row is most recent, most recent first
    ([] when ``limit`` is 0 or the table is missing, e.g. a bento served away from its home)."""
    if limit <= 0 or not table.is_file():
        return []
    import pyarrow.parquet as pq

    df = pq.read_table(table, columns=["user_id", "event_timestamp"]).to_pandas()
    if df.empty:
        return []
    last = df.groupby("user_id", sort=False)["event_timestamp"].max()
    return [str(u) for u in last.sort_values(ascending=False, kind="stable").index[:limit]]


def prefill(cache: AnswerCache, users: list[str], fetch: Fetch, rank: Rank, k: int, budget_s: float,
            batch: int = 64, clock: Callable[[], float] = time.time,
            stop: Callable[[], bool] | None = None, engagement: bool = False) -> PrefillResult:
    """Rank ``users``' default answers (``k`` items, no filters, as of now) in batches of ``batch``
    and put them in ``cache``. Stops after ``budget_s`` seconds, when ``stop()`` says so (the
    worker is stopping), or when the online store does not answer (``fetch`` returns None); users without an online history are skipped (they get
    popularity, which costs nothing). ``engagement``: the model reads views and carts too."""
    started = time.perf_counter()
    answered, stopped = 0, None
    if not cache.enabled:
        return PrefillResult(len(users), 0, 0.0, "the answer cache is off")
    for lo in range(0, len(users), batch):
        if time.perf_counter() - started > budget_s:
            stopped = f"time budget of {budget_s:g} s spent"
            break
        if stop is not None and stop():
            stopped = "the service is stopping"
            break
        chunk = users[lo:lo + batch]
        rows = fetch(chunk)
        if rows is None:
            stopped = "the online store did not answer"
            break
        as_of = int(clock())
        asks, fingerprints = [], []
        for u in chunk:
            row = rows.get(u)
            hist = history_lines(row, engagement) if row is not None else None
            if hist is None:
                continue
            ids, stamps, kinds = hist
            asks.append(HistoryAsk(ids, stamps, as_of, k, False, None, u, kinds if engagement else None))
            fingerprints.append(cache.fingerprint(ids, stamps, kinds))
        if not asks:
            continue
        for ask, fp, answer in zip(asks, fingerprints, rank(asks), strict=True):
            cache.put(answer_key(ask.user_id or "", k), fp, as_of, answer)
        answered += len(asks)
    return PrefillResult(len(users), answered, round(time.perf_counter() - started, 3), stopped)
