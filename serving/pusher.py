"""The online push of accepted feedback, run in a process of its own (or, in tests, a thread).

Each worker's :class:`~serving.runtime.Runtime` calls :func:`push_pending` and :func:`pending_count`
on its push executor: by default a one-process ``ProcessPoolExecutor`` (``feedback.push_process``),
so the push's Python work (Feast's proto conversion, the read-merge-write of every user's rows)
holds that process's GIL and not the event loop's. In the worker, a busy push thread took the GIL
back after every socket read or write of a request and multiplied ``/feedback/batch``'s latency
several times, with the CPU far from saturated.

A push process keeps, per recflow home, its own feature store (rebuilt when the runtime's
``epoch`` changes, i.e. after a reload refreshed the registry), its :class:`~serving.online_push.
OnlineRows`, a journal session (``recflow.event_log.JournalSession``, bookkeeping without fsync)
and the served model's item categories (sent once per model: ``categories_key``). Nothing here
runs at import time; errors are returned, not logged, so the runtime reports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feast import FeatureStore

    from recflow.event_log import JournalSession
    from recflow.settings import Settings
    from serving.online_push import OnlineRows


@dataclass
class PushResult:
    """One push: the event ids still pending, and the error that kept them so (None: pushed)."""

    pending: set[str] = field(default_factory=set)
    error: str | None = None


@dataclass
class _Context:
    key: tuple[str, int, int]  # (home, epoch, id of the runtime's store or 0)
    store: FeatureStore
    rows: OnlineRows
    session: JournalSession


_context: _Context | None = None
_categories: tuple[str, dict[str, str | None]] | None = None


def _ctx(settings: Settings, store: FeatureStore | None, epoch: int) -> _Context:
    """This process's store, online rows and journal session for ``settings.home`` (built once)."""
    global _context
    key = (str(settings.home), epoch, id(store) if store is not None else 0)
    if _context is not None and _context.key[::2] == key[::2] and _context.key != key:  # a reload: same store
        from serving.online_push import OnlineRows

        if store is None:
            _context.store.refresh_registry()
        _context.key, _context.rows = key, OnlineRows(_context.store)
        with contextlib.suppress(Exception):
            _context.rows.resolve()
    if _context is None or _context.key != key:
        from recflow.event_log import EventLog
        from serving.online_push import OnlineRows

        if store is None:
            from recflow import feature_store as fs

            store = fs.get_store(settings)
        if _context is not None:
            with contextlib.suppress(Exception):  # a thread's connection closes only from that thread
                _context.session.close()
        log = EventLog(settings.paths.event_log, timeout_s=settings.feedback.journal_timeout_s)
        _context = _Context(key, store, OnlineRows(store), log.session(durable=False))
    return _context


def push_lock(settings: Settings, store: FeatureStore) -> Callable[[], AbstractContextManager[Any]]:
    """The lock the online read-merge-write runs under: with the Redis online store a Redis lock
    next to the rows (``recflow:<project>:online-push``), which serialises the workers of every
    machine sharing that Redis; otherwise ``<home>/locks/online-push.lock``, the machine's workers.
    Both wait at most ``feedback.push_lock_timeout_s``; the Redis lock's lease is
    ``feedback.push_lock_lease_s``."""
    from recflow import locks

    fb = settings.feedback
    if settings.feast.online_store == "redis":
        from recflow.feature_store import redis_client

        name = f"recflow:{store.config.project}:online-push"
        return lambda: locks.redis_lock(redis_client(store), name, fb.push_lock_timeout_s, fb.push_lock_lease_s)
    from serving.online_push import ONLINE_PUSH_LOCK

    path = settings.paths.locks / ONLINE_PUSH_LOCK
    return lambda: locks.file_lock(path, fb.push_lock_timeout_s)


def push_pending(settings: Settings, store: FeatureStore | None, epoch: int, categories_key: str,
                 categories: dict[str, str | None] | None, limit: int = 5000) -> PushResult | None:
    """Push up to ``limit`` pending events online and record the outcome in the journal.

    ``store``: the caller's store when this runs in its process (a thread), else None (this process
    opens its own). ``categories``: item id -> category of the served model, needed once per
    ``categories_key``; returns None when this process lacks them (call again with them)."""
    global _categories
    from serving import online_push

    if categories is not None:
        _categories = (categories_key, categories)
    if _categories is None or _categories[0] != categories_key:
        return None
    ctx = _ctx(settings, store, epoch)
    pending = ctx.session.pending_push(limit=limit)
    if pending.empty:
        return PushResult()
    ids = pending["event_id"].astype(str).tolist()
    try:
        online_push.push_events(ctx.store, pending, history_length=settings.features.history_length,
                             category_of=_categories[1].get, lock=push_lock(settings, ctx.store), rows=ctx.rows)
    except Exception as exc:  # noqa: BLE001 - the events stay pending and are retried
        ctx.session.mark_pushed(ids, ok=False)
        return PushResult(set(ids), f"{type(exc).__name__}: {str(exc)[:200]}")
    ctx.session.mark_pushed(ids, ok=True)
    return PushResult()


def pending_count(settings: Settings, store: FeatureStore | None, epoch: int) -> int:
    """How many events wait to be pushed (an index range of the journal)."""
    return _ctx(settings, store, epoch).session.pending_count()


def categories_of(state: Any) -> dict[str, str | None]:
    """Item id -> category of a served model (``ServingState``), as the push's ``category_of``."""
    cats = state.catalogue.categories
    return {item: cats[p] for item, p in state.index.position.items()}


PUSH_NICE = 5  # the push is background work: requests (and the worker's model load) go first


def init_process(parent_pid: int) -> None:
    """Initializer of the push process: a lower CPU priority (``PUSH_NICE``), and an exit when the
    worker that started it is gone (a SIGKILLed worker cannot stop it), checked every second."""
    import os
    import threading
    import time

    with contextlib.suppress(OSError):
        os.nice(PUSH_NICE)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="recflow-push-watchdog", daemon=True).start()


def warm(settings: Settings) -> int:
    """Import what a push needs and open the journal, in the push process (called once at start)."""
    ctx = _ctx(settings, None, 0)
    with contextlib.suppress(Exception):  # no registry yet (before `recflow features`): at the first push
        ctx.rows.resolve()
    return ctx.session.pending_count()
