"""The feedback path under faults, through the serving runtime without BentoML: a hung online push
never delays the durable append, idempotency keys (409 on a reused key), the timestamp window
(422), /status without a journal query, and readiness before traffic."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from serving.api import FeedbackRequest

EVENT = {"user_id": "a", "item_id": "x", "event_type": "purchase", "quantity": 1.0, "price": 2.0}


def _runtime(make_settings: Any, **feedback: float) -> Any:
    from serving.runtime import Runtime

    settings = make_settings(feedback={"push_wait_s": 0.2, "push_timeout_s": 0.5, **feedback},
                             serving={"push_retry_s": 0.1})
    rt = Runtime(settings)
    rt.models.state = SimpleNamespace(index=SimpleNamespace(position={"x": 0, "w": 1}),
                               catalogue=SimpleNamespace(categories=["dairy", "bakery"]), version="v1",
                               source=SimpleNamespace(source="model_path"), n_items=2, ann=None,
                               scorer=SimpleNamespace(name="exact"), loaded_at="now")
    rt.online.store = object()
    rt.feedback_path._journal = ThreadPoolExecutor(1)
    rt.feedback_path._push = ThreadPoolExecutor(1)
    return rt


async def _with_push_loop(rt: Any, body: Any) -> Any:
    loop = asyncio.get_running_loop()
    path = rt.feedback_path
    path._push_kick, path._next_push = asyncio.Event(), loop.create_future()
    task = loop.create_task(path._push_loop())
    try:
        return await body()
    finally:
        task.cancel()
        path._journal.shutdown(wait=False)
        path._push.shutdown(wait=False)


def test_a_hung_online_push_never_delays_the_durable_append(make_settings, monkeypatch) -> None:  # noqa: ANN001
    from recflow.event_log import EventLog
    from serving import online_push

    hang, entered = threading.Event(), threading.Event()
    pushed: list[list[str]] = []

    def hung_push(store: Any, events: pd.DataFrame, **_: Any) -> int:
        entered.set()
        hang.wait(20)  # the online store is frozen (SIGSTOP) until the test releases it
        pushed.append(sorted(events["event_id"]))
        return len(events)

    monkeypatch.setattr(online_push, "push_events", hung_push)
    rt = _runtime(make_settings)

    async def body() -> None:
        times = []
        for n in range(5):
            t0 = time.perf_counter()
            resp = await rt.feedback(FeedbackRequest(**EVENT, event_id=f"e{n}"))
            times.append(time.perf_counter() - t0)
            assert resp.accepted and not resp.pushed and resp.event_id == f"e{n}"
        assert entered.is_set(), "the push was attempted"
        assert max(times) < 1.0, f"acknowledged after the durable append, not after the push: {times}"
        log = EventLog(rt.settings.paths.event_log)
        assert sorted(log.read().event_id) == [f"e{n}" for n in range(5)]
        monkeypatch.setattr(EventLog, "stats", lambda self: pytest.fail("/status must not query the journal"))
        t0 = time.perf_counter()
        status = await rt.status()
        assert time.perf_counter() - t0 < 0.1 and status.ready
        hang.set()  # the store answers again: everything pending is pushed
        deadline = time.monotonic() + 10
        while (log.pending_count() or rt.feedback_path.pending_feedback != 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert log.pending_count() == 0 and rt.feedback_path.pending_feedback == 0, (log.pending_count(), rt.feedback_path.pending_feedback)
        assert sorted(e for batch in pushed for e in batch) == [f"e{n}" for n in range(5)]
        assert (await rt.status()).pending_feedback == 0

    asyncio.run(_with_push_loop(rt, body))


def test_a_quick_push_is_reported_as_pushed(make_settings, monkeypatch) -> None:  # noqa: ANN001
    from serving import online_push

    monkeypatch.setattr(online_push, "push_events", lambda store, events, **_: len(events))
    rt = _runtime(make_settings)

    async def body() -> None:
        resp = await rt.feedback(FeedbackRequest(**EVENT, event_id="quick"))
        assert resp.pushed is True

    asyncio.run(_with_push_loop(rt, body))


def test_idempotency_keys_reused_derived_and_conflicting(make_settings, monkeypatch) -> None:  # noqa: ANN001
    from recflow.datasets.validation import validate_events
    from recflow.event_log import EventLog
    from serving import online_push
    from serving.errors import Conflict, Unprocessable

    monkeypatch.setattr(online_push, "push_events", lambda store, events, **_: len(events))
    rt = _runtime(make_settings)
    ts = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

    async def body() -> None:
        first = await rt.feedback(FeedbackRequest(**EVENT, event_id="k1"))
        again = await rt.feedback(FeedbackRequest(**EVENT, event_id="k1"))
        assert not first.duplicate and again.duplicate, "same key, same payload: an idempotent success"
        with pytest.raises(Conflict) as err:
            await rt.feedback(FeedbackRequest(**EVENT, event_id="k1", timestamp=ts))  # another time than the recorded one
        assert "timestamp" in err.value.message
        with pytest.raises(Conflict) as err:
            await rt.feedback(FeedbackRequest(**{**EVENT, "quantity": 3.0}, event_id="k1"))
        assert err.value.status == 409 and "'k1'" in err.value.message and "quantity" in err.value.message
        assert err.value.field == "event_id"
        with pytest.raises(Unprocessable) as err:
            await rt.feedback(FeedbackRequest(**EVENT))  # no key and no timestamp: a retry could not be recognised
        assert err.value.status == 422 and err.value.field == "event_id"
        derived = await rt.feedback(FeedbackRequest(**EVENT, timestamp=ts))
        retried = await rt.feedback(FeedbackRequest(**EVENT, timestamp=ts))
        assert derived.event_id.startswith("fb-") and retried.event_id == derived.event_id and retried.duplicate
        raw = pd.DataFrame([{**EVENT, "timestamp": ts.isoformat(), "basket_id": None}])
        accepted, _ = validate_events(raw, known_items=None, event_id_prefix="fb")
        assert accepted["event_id"].item() == derived.event_id, "derived exactly as ingest derives it"
        batch = [FeedbackRequest(**EVENT, event_id="b1"), FeedbackRequest(**{**EVENT, "item_id": "w"}, event_id="k1")]
        with pytest.raises(Conflict):
            await rt.feedback_batch(batch)
        assert "b1" not in set(EventLog(rt.settings.paths.event_log).read().event_id), "a 409 records nothing"
        assert len(EventLog(rt.settings.paths.event_log).read()) == 2

    asyncio.run(_with_push_loop(rt, body))


def test_timestamps_outside_the_window_are_a_422_naming_the_field(make_settings) -> None:  # noqa: ANN001
    from serving.errors import Unprocessable

    rt = _runtime(make_settings, max_age_days=30, max_future_s=60)
    now = datetime.now(UTC)
    for ts in (datetime(1970, 1, 1, tzinfo=UTC), now - timedelta(days=31), now + timedelta(minutes=5)):
        with pytest.raises(Unprocessable) as err:
            rt.feedback_path.check_feedback(FeedbackRequest(**EVENT, event_id="t", timestamp=ts), now)
        assert err.value.status == 422 and err.value.field == "timestamp" and "feedback.max_" in err.value.message
    with pytest.raises(Unprocessable) as err:
        rt.feedback_path.check_feedback(FeedbackRequest(**EVENT, event_id="t", timestamp=now + timedelta(days=2)), now, "events.1.")
    assert err.value.field == "events.1.timestamp"
    for ok in (now - timedelta(days=29), now + timedelta(seconds=30), now):
        rt.feedback_path.check_feedback(FeedbackRequest(**EVENT, event_id="t", timestamp=ok), now)
    naive = FeedbackRequest(**EVENT, event_id="t", timestamp=datetime(2999, 1, 1))  # parsed; the service refuses
    assert naive.timestamp is not None and naive.timestamp.utcoffset() == timedelta(0)


def test_start_up_waits_for_the_first_load(make_settings, monkeypatch) -> None:  # noqa: ANN001
    """The BentoML start-up hook awaits wait_first_load: the worker accepts connections only then."""
    from serving import model_holder
    from serving import runtime as rmod
    from serving.model_source import ModelNotFound
    from serving.store_client import StoreClient

    def slow_load(settings: Any, store: Any) -> Any:
        time.sleep(0.5)
        return SimpleNamespace(version="v1", n_items=2, two_stage=None)

    monkeypatch.setattr(StoreClient, "open", lambda self: setattr(self, "store", object()))
    monkeypatch.setattr(model_holder.ModelHolder, "warm_up", lambda self, state: 0.0)
    monkeypatch.setattr(model_holder, "load_state", slow_load)

    async def start(expect_ready: bool) -> float:
        rt = rmod.Runtime(make_settings(serving={"load_retry_s": 60}))
        await rt.start()
        try:
            assert not rt.ready
            t0 = time.perf_counter()
            assert await rt.wait_first_load(10) is expect_ready
            return time.perf_counter() - t0
        finally:
            await rt.stop()

    assert asyncio.run(start(True)) >= 0.3, "start-up returned before the model was loaded"

    def no_model(settings: Any, store: Any) -> Any:
        raise ModelNotFound("no champion model yet")

    monkeypatch.setattr(model_holder, "load_state", no_model)
    assert asyncio.run(start(False)) < 5, "with nothing to load the worker goes live (unready) at once"


def test_the_sqlite_online_store_waits_at_most_the_store_timeout(make_settings) -> None:  # noqa: ANN001
    from recflow import feature_store as fs

    settings = make_settings(feast={"store_timeout_s": 0.25})
    store = fs.get_store(settings)
    conn = fs.online_store(store)._get_conn(store.config)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 250
