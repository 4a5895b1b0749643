"""``/feedback`` and ``/feedback/batch``: durable appends to the event log, then online pushes.

Threads: one journal thread (durable event-log appends: what ``/feedback`` waits for) and one push
executor (online pushes of pending events, serialised so a user's online row is never updated by
two writers of this worker; each push bounded by ``feedback.push_timeout_s``): a process of its
own by default (``feedback.push_process``), so the push's Python work never holds this process's
GIL while requests wait for it. An append never queues behind a push: a hung online store leaves
``/feedback`` acknowledging durably, with ``pushed: false``.

Group commit: appends that arrive while the journal thread is committing wait and then go
together, in one transaction and one fsync (``recflow.event_log.JournalSession.append_many``); each
request is answered only after that commit returned, and a conflicting one (409) records nothing
without failing the others. Under load the fsync is paid once per group, not once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from recflow.event_log import EventLog, JournalSession
from recflow.settings import Settings
from serving.aio import cancel_tasks
from serving.api import FeedbackBatchResponse, FeedbackRequest, FeedbackResponse
from serving.errors import BadRequest, Conflict, NotFound, NotReady, RateLimitedLog, Unprocessable
from serving.metrics import metrics
from serving.model_holder import ModelHolder
from serving.serving_state import ServingState

if TYPE_CHECKING:
    from feast import FeatureStore

    from recflow.event_log import Record

log = logging.getLogger("recflow.serving")
MAX_GROUP_COMMIT = 512  # appends per journal transaction (each at most MAX_FEEDBACK_BATCH events)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a process pool's processes now (a push hung on the store would otherwise outlive the worker)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.terminate()


@dataclass
class FeedbackHandler:
    """The feedback path of one worker (see the module docstring)."""

    settings: Settings
    models: ModelHolder
    pending_feedback: int | None = None  # kept by the push loop for /status (no journal query on a request)
    _journal: Executor | None = None
    _push: Executor | None = None
    _push_kick: asyncio.Event | None = None
    _next_push: asyncio.Future[set[str] | None] | None = None
    _stalled_push: asyncio.Future[set[str]] | None = None
    _journal_queue: list[tuple[list[Record], list[str], asyncio.Future[int]]] = field(default_factory=list)
    _journal_busy: bool = False
    _journal_session: JournalSession | None = None
    _push_categories: str | None = None  # the model whose item categories the push executor holds
    _push_pool: ProcessPoolExecutor | None = None  # the push process while it warms up
    _push_warn: RateLimitedLog = field(default_factory=RateLimitedLog)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def event_log(self) -> EventLog:
        return EventLog(self.settings.paths.event_log, timeout_s=self.settings.feedback.journal_timeout_s)

    def start(self) -> None:
        """Start the journal thread, the push executor and the push loop (inside the event loop)."""
        self._journal = ThreadPoolExecutor(1, thread_name_prefix="recflow-journal")
        self._push = ThreadPoolExecutor(1, thread_name_prefix="recflow-push")  # until the push process is warm
        self._start_push_process()
        loop = asyncio.get_running_loop()
        self._push_kick = asyncio.Event()
        self._next_push = loop.create_future()
        self._tasks = [loop.create_task(self._push_loop(), name="recflow-push")]

    async def stop(self) -> None:
        await cancel_tasks(self._tasks)
        if self._journal is not None and self._journal_session is not None:
            with contextlib.suppress(Exception):
                self._journal.submit(self._journal_session.close)
        for ex in (self._journal, self._push):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        for pool in (self._push, self._push_pool):
            if isinstance(pool, ProcessPoolExecutor):
                pool.shutdown(wait=False, cancel_futures=True)
                _terminate(pool)

    async def _run(self, executor: Executor | None, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _push_loop(self) -> None:
        """Push pending feedback online when kicked (after an append) or every ``serving.push_retry_s``,
        at most once per ``feedback.push_interval_s``.

        Each cycle resolves the future that requests appended before it wait on (with the ids still
        pending, None when no push ran). A push slower than ``feedback.push_timeout_s`` is left to
        finish on its thread (its events stay pending); no new push starts behind it. The pending
        count that ``/status`` reports is refreshed here, never on a request."""
        assert self._push_kick is not None and self._next_push is not None
        loop = asyncio.get_running_loop()
        last = -float("inf")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._push_kick.wait(), self.settings.serving.push_retry_s)
            gap = self.settings.feedback.push_interval_s - (loop.time() - last)
            if gap > 0:  # events of the next moment go along in this push
                await asyncio.sleep(gap)
            last = loop.time()
            self._push_kick.clear()
            done, self._next_push = self._next_push, loop.create_future()
            result: set[str] | None = None
            try:
                result = await self._push_cycle()
            except Exception:  # noqa: BLE001 - the loop must survive; reported by the push path
                log.exception("feedback push failed")
            if not done.done():
                done.set_result(result)

    def _start_push_process(self) -> None:
        """With ``feedback.push_process``: start a one-process pool and import what a push needs there,
        at a low priority; pushes move to it once that is done (until then, and if it fails, they run
        on a thread: a cold process takes seconds, tens of them on a busy machine)."""
        if not self.settings.feedback.push_process:
            return
        import multiprocessing

        from serving import pusher

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=pusher.init_process,
                                   initargs=(os.getpid(),))
        self._push_pool = pool
        loop = asyncio.get_running_loop()

        def warmed(f: Any) -> None:
            if f.cancelled() or f.exception() is not None:
                log.warning("push process warm-up failed, pushing on a thread: %s", None if f.cancelled() else f.exception())
                return
            with contextlib.suppress(RuntimeError):  # the loop is closed: the service stopped
                loop.call_soon_threadsafe(self._use_push_process, pool)

        pool.submit(pusher.warm, self.settings).add_done_callback(warmed)

    def _use_push_process(self, pool: ProcessPoolExecutor) -> None:
        """Move pushes to the warm push process (event loop; the push loop runs one cycle at a time)."""
        if self._push_pool is not pool:
            return
        if self._stalled_push is not None and not self._stalled_push.done():  # once the stalled push returns
            self._stalled_push.add_done_callback(lambda _: self._use_push_process(pool))
            return
        old, self._push, self._push_pool = self._push, pool, None
        self._push_categories = None
        if old is not None:
            old.shutdown(wait=False)
        log.info("online pushes now run in a process of their own")

    def _push_args(self) -> tuple[Settings, FeatureStore | None, int]:
        """What the push functions get: a thread shares this process's store; a process opens its own."""
        return self.settings, None if isinstance(self._push, ProcessPoolExecutor) else self.models.online.store, self.models.registry_epoch

    async def _push_once(self, state: ServingState) -> set[str] | None:
        """One push on the push executor (``serving.pusher.push_pending``), sending the model's item
        categories when the executor lacks them; returns the ids still pending."""
        from serving import pusher

        key = f"{state.version}:{id(state)}"
        cats = None if self._push_categories == key else await self._run(None, pusher.categories_of, state)
        for _ in range(2):
            got = await self._run(self._push, pusher.push_pending, *self._push_args(), key, cats)
            if got is not None:
                break
            cats = await self._run(None, pusher.categories_of, state)
        else:  # pragma: no cover - the second call carries the categories
            return None
        self._push_categories = key
        if got.error is not None:
            metrics()["store_errors"].labels("push").inc()
            self._push_warn.warn("feedback push failed, %d event(s) stay pending in the event log: %s",
                                 len(got.pending), got.error)
        return got.pending

    async def _push_cycle(self) -> set[str] | None:
        """One push (None: not ready, or the previous push is still stalled), then the pending count."""
        from concurrent.futures.process import BrokenProcessPool

        from serving import pusher

        state = self.models.state
        if not self.models.ready or state is None:
            return None
        if self._stalled_push is not None and not self._stalled_push.done():
            return None
        self._stalled_push = None
        fut = asyncio.ensure_future(self._push_once(state))
        timeout = self.settings.feedback.push_timeout_s
        result: set[str] | None
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self._stalled_push, result = fut, None
            metrics()["store_errors"].labels("push_timeout").inc()
            self._push_warn.warn("feedback push still running after %.1f s (feedback.push_timeout_s): its events "
                                 "stay pending; appends go on, pushes resume when the store answers", timeout)
            fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        except BrokenProcessPool as exc:  # the push process died: its events stay pending; start another
            metrics()["store_errors"].labels("push").inc()
            self._push_warn.warn("the push process died (%s): pushing on a thread while a new one starts; pending "
                                 "events stay in the event log", exc)
            self._push = ThreadPoolExecutor(1, thread_name_prefix="recflow-push")
            self._push_categories = None
            self._start_push_process()
            return None
        if self._stalled_push is None:
            with contextlib.suppress(Exception):  # /status keeps the last known count
                self.pending_feedback = await self._run(self._push, pusher.pending_count, *self._push_args())
                metrics()["pending"].set(self.pending_feedback)
        return result

    async def _await_push(self, wait_s: float) -> set[str] | None:
        """Kick the push loop and wait up to ``wait_s`` for a push that started after this call's
        append; returns the ids still pending (None: no answer in time)."""
        if self._push_kick is None or self._next_push is None:
            return None
        fut = self._next_push
        self._push_kick.set()
        if wait_s <= 0:
            return fut.result() if fut.done() else None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except TimeoutError:
            return None

    async def _append(self, records: list[Record], reqs: list[FeedbackRequest]) -> int:
        """Durably append feedback events (group commit on the journal thread, see the module
        docstring): 409 on a reused event_id with another payload, 503 when the journal stays locked
        past ``feedback.journal_timeout_s``. Returns how many events were new."""
        import sqlite3

        from recflow.event_log import EventConflict

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        server_timed = [r[0] for r, q in zip(records, reqs, strict=True) if q.timestamp is None]
        self._journal_queue.append((records, server_timed, fut))
        if not self._journal_busy:
            self._commit_group(loop)
        try:
            return await fut
        except EventConflict as exc:
            metrics()["feedback"].labels("conflict").inc()
            raise Conflict(f"{exc}; nothing was recorded. Send a new event_id for a new event, or the original "
                           "payload to retry", field="event_id") from exc
        except sqlite3.OperationalError as exc:
            raise NotReady(f"the event log is busy ({exc}); nothing was recorded: retry with the same event_id",
                           field=None) from exc
        except ValueError as exc:
            raise BadRequest(f"{exc}; nothing was recorded") from exc

    def _commit_group(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit every queued append in one journal transaction, then resolve their futures and start
        the next group if more arrived meanwhile (event loop only)."""
        group, self._journal_queue = self._journal_queue[:MAX_GROUP_COMMIT], self._journal_queue[MAX_GROUP_COMMIT:]
        if self._journal_session is None:
            self._journal_session = self.event_log.session()
        self._journal_busy = True
        try:
            done = loop.run_in_executor(self._journal, self._journal_session.append_many, [(r, t) for r, t, _ in group])
        except RuntimeError as exc:  # the executor is shut down: the service is stopping
            self._journal_busy = False
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(NotReady(f"the service is stopping ({exc}); nothing was recorded"))
            return

        def resolve(f: asyncio.Future[list[int | Exception]]) -> None:
            self._journal_busy = False
            error = f.exception() if not f.cancelled() else NotReady("the journal write was cancelled")
            results: list[int | Exception] = [] if error else f.result()
            for i, (_, _, fut) in enumerate(group):
                if fut.done():  # the request went away; its events are committed (or not) all the same
                    continue
                outcome = error or results[i]
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)
            if self._journal_queue:
                self._commit_group(loop)

        done.add_done_callback(resolve)

    def check_feedback(self, req: FeedbackRequest, now: datetime, where: str = "") -> None:
        """422 naming the field when an event has neither an event_id nor a timestamp (no idempotency
        key can be derived), or its timestamp is outside the ``feedback`` window."""
        fb = self.settings.feedback
        if req.event_id is None and req.timestamp is None:
            raise Unprocessable(f"{where}event_id is missing: send an event_id (idempotency key) or the event's "
                                "timestamp (the id is then derived from the content), so a retry is not recorded twice",
                                field=f"{where}event_id")
        if req.timestamp is None:
            return
        ts = req.timestamp if req.timestamp.tzinfo else req.timestamp.replace(tzinfo=UTC)
        ahead = (ts - now).total_seconds()
        if ahead > fb.max_future_s:
            raise Unprocessable(f"{where}timestamp {ts.isoformat()} is {ahead:.0f} s in the future; at most "
                                f"{fb.max_future_s:.0f} s ahead is accepted (feedback.max_future_s)",
                                field=f"{where}timestamp")
        if fb.max_age_days is not None and (now - ts).total_seconds() > fb.max_age_days * 86_400:
            raise Unprocessable(f"{where}timestamp {ts.isoformat()} is older than {fb.max_age_days:g} days "
                                "(feedback.max_age_days)", field=f"{where}timestamp")

    async def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        """Append the event durably (idempotent by event_id), then wait up to ``feedback.push_wait_s``
        for the online push (the push runs on its own thread; the answer never waits longer)."""
        from serving.online_push import event_records

        state = self.models.require_state()
        if req.item_id not in state.index.position:
            raise NotFound(f"item_id {req.item_id!r} is not in the catalogue", field="item_id")
        now = datetime.now(UTC)
        self.check_feedback(req, now)
        records = event_records([req], now)
        event_id = records[0][0]
        new = await self._append(records, [req])  # durable from here on
        pending = await self._await_push(self.settings.feedback.push_wait_s)  # None: still pushing
        pushed = pending is not None and event_id not in pending
        metrics()["feedback"].labels("pushed" if pushed else "pending").inc()
        return FeedbackResponse(event_id=event_id, accepted=True, duplicate=new == 0, pushed=pushed)

    async def feedback_batch(self, reqs: list[FeedbackRequest]) -> FeedbackBatchResponse:
        """Append several events durably in one transaction (all or none), then push them online
        (waiting at most ``feedback.batch_push_wait_s`` for that). A conflicting event_id (409) or an
        event outside the window (422) records nothing."""
        from serving.online_push import event_records

        started = time.perf_counter()
        state = self.models.require_state()
        position = state.index.position
        for i, req in enumerate(reqs):
            if req.item_id not in position:
                raise NotFound(f"events[{i}].item_id {req.item_id!r} is not in the catalogue; nothing was recorded",
                               field=f"events.{i}.item_id")
        now = datetime.now(UTC)
        for i, req in enumerate(reqs):
            self.check_feedback(req, now, where=f"events.{i}.")
        records = event_records(reqs, now)
        ids = [r[0] for r in records]
        new = await self._append(records, reqs)  # durable from here on
        pending = await self._await_push(self.settings.feedback.batch_push_wait_s)
        pushed = pending is not None and not pending.intersection(ids)
        metrics()["feedback"].labels("pushed" if pushed else "pending").inc(len(ids))
        metrics()["latency"].labels("feedback_batch").observe(time.perf_counter() - started)
        return FeedbackBatchResponse(event_ids=ids, accepted=len(ids), duplicates=len(ids) - new, pushed=pushed)
