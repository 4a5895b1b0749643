"""Online updates from several workers are never lost: two processes (spawned, as serving workers
are separate processes) push disjoint events of the same user at once into the same SQLite online
store; under ``<home>/locks/online-push.lock`` every event ends up in the user's row."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

PUSHES = 25  # one read-merge-write per event, per worker


def _push_worker(settings: Any, worker: int, start: Any, locked: bool) -> None:
    """Push ``PUSHES`` events of user "a", one call each (as a busy worker's push loop does)."""
    from recflow import feature_store as fs
    from serving.online_push import ONLINE_PUSH_LOCK, push_events

    store = fs.get_store(settings)
    lock = settings.paths.locks / ONLINE_PUSH_LOCK if locked else None
    start.wait(120)
    for n in range(PUSHES):
        ev = pd.DataFrame({
            "event_id": [f"w{worker}-{n}"], "user_id": ["a"], "item_id": [f"w{worker}-item{n}"],
            "event_type": ["purchase"],
            "event_timestamp": [pd.Timestamp("2024-05-20T10:00:00Z") + pd.Timedelta(seconds=2 * n + worker)],
            "basket_id": [f"w{worker}-b{n}"], "quantity": [1.0], "price": [1.0],
        })
        push_events(store, ev, history_length=settings.features.history_length, category_of=lambda _: None,
                    lock_path=lock, lock_timeout_s=30)


def test_two_processes_pushing_one_user_lose_no_update(tiny_features) -> None:  # noqa: ANN001
    from recflow import feature_store as fs
    from serving.online_push import _read_online

    settings = tiny_features
    store = fs.get_store(settings)
    fs.apply(settings, store)
    fs.materialize(settings, *fs.default_window(settings), store=store)
    before = list(_read_online(store, ["a"])[0]["user_history__history_item_ids"] or [])

    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_push_worker, args=(settings, w, start, True)) for w in (0, 1)]
    for p in procs:
        p.start()
    try:
        start.set()
        for p in procs:
            p.join(180)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    row = _read_online(fs.get_store(settings), ["a"])[0]
    history = list(row["user_history__history_item_ids"])
    pushed = {f"w{w}-item{n}" for w in (0, 1) for n in range(PUSHES)}
    missing = pushed - set(history)
    assert not missing, f"{len(missing)} of {len(pushed)} concurrent updates were lost: {sorted(missing)[:5]}"
    assert history[len(pushed):] == before, "the user's earlier history is kept behind the pushed events"
    assert row["user_activity__purchases_90d"] >= len(pushed)
