"""Online updates from several workers are never lost: two processes (spawned, as serving workers
are separate processes) push disjoint events of the same user at once into the same online store.
With SQLite they serialise on ``<home>/locks/online-push.lock`` (one machine); with Redis on a Redis
lock next to the rows, which no file is involved in (workers of several machines); either way every
event ends up in the user's row."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

PUSHES = 25  # one read-merge-write per event, per worker


def _push_worker(settings: Any, worker: int, start: Any, locked: bool) -> None:
    """Push ``PUSHES`` events of user "a", one call each (as a busy worker's push loop does), under
    the lock the service would take (:func:`serving.pusher.push_lock`)."""
    from recflow import feature_store as fs
    from serving.online_push import push_events
    from serving.pusher import push_lock

    store = fs.get_store(settings)
    lock = push_lock(settings, store) if locked else None
    start.wait(120)
    for n in range(PUSHES):
        ev = pd.DataFrame({
            "event_id": [f"w{worker}-{n}"], "user_id": ["a"], "item_id": [f"w{worker}-item{n}"],
            "event_type": ["purchase"],
            "event_timestamp": [pd.Timestamp("2024-05-20T10:00:00Z") + pd.Timedelta(seconds=2 * n + worker)],
            "basket_id": [f"w{worker}-b{n}"], "quantity": [1.0], "price": [1.0],
        })
        push_events(store, ev, history_length=settings.features.history_length, category_of=lambda _: None, lock=lock)


@pytest.fixture(params=["sqlite", "redis"])
def pushing_settings(request, tiny_features):  # noqa: ANN001, ANN201
    """The tiny shop's settings with a generous lock wait, on SQLite or on a fresh Redis."""
    settings = tiny_features
    settings = settings.model_copy(update={"feedback": settings.feedback.model_copy(update={"push_lock_timeout_s": 30.0})})
    if request.param == "redis":
        import redis

        address = request.getfixturevalue("redis_server")
        host, port = address.split(":")
        redis.Redis(host=host, port=int(port)).flushall()
        settings = settings.model_copy(
            update={"feast": settings.feast.model_copy(update={"online_store": "redis", "redis_connection_string": address})})
    return settings


def test_two_processes_pushing_one_user_lose_no_update(pushing_settings) -> None:  # noqa: ANN001
    from recflow import feature_store as fs
    from serving.online_push import ONLINE_PUSH_LOCK, _read_online

    settings = pushing_settings
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
    # with Redis the machine's lock file played no part: the Redis lock alone serialised the writers
    assert (settings.paths.locks / ONLINE_PUSH_LOCK).exists() == (settings.feast.online_store != "redis")


def test_redis_lock_times_out_naming_it_and_reports_an_expired_lease(redis_server: str) -> None:
    import time

    import redis

    from recflow.locks import LockLost, LockTimeout, redis_lock

    host, port = redis_server.split(":")
    client = redis.Redis(host=host, port=int(port), socket_timeout=2)
    with redis_lock(client, "recflow:test:lock", 1.0, 10.0):
        t0 = time.perf_counter()
        with pytest.raises(LockTimeout, match="recflow:test:lock"), redis_lock(client, "recflow:test:lock", 0.2, 10.0):
            pass
        assert 0.15 < time.perf_counter() - t0 < 1.5
    with redis_lock(client, "recflow:test:lock", 0.2, 10.0):  # released on exit
        pass
    with pytest.raises(LockLost, match="lease"), redis_lock(client, "recflow:test:lock", 0.2, 0.1):
        time.sleep(0.3)  # the lease runs out while the block still holds it
    with redis_lock(client, "recflow:test:lock", 0.2, 10.0):  # an expired lease frees the lock
        pass
