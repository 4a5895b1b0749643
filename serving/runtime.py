"""The serving runtime: everything the HTTP layer calls, independent of BentoML.

:class:`Runtime` owns the feature store, the loaded :class:`~serving.model_state.ServingState`
(swapped atomically on reload), the worker threads, the request-log writer, the micro-batcher for
``/recommend`` and the feedback retry loop.

Threads: one compute thread (ranking, one batch at a time: torch and numpy release the GIL),
a small pool for online-store reads (bounded by ``serving.feature_timeout_s``, so a hung store
degrades answers instead of stalling them), one journal thread (durable event-log appends: what
``/feedback`` waits for), one push executor (online pushes of pending events, serialised so a
user's online row is never updated by two writers of this worker; each push bounded by
``feedback.push_timeout_s``): a process of its own by default (``serving.pusher``), so the push's
Python work never holds this process's GIL while requests wait for it; one loader thread. An append
never queues behind a push: a hung online store leaves ``/feedback`` acknowledging durably, with
``pushed: false``.

Group commit: appends that arrive while the journal thread is committing wait and then go
together, in one transaction and one fsync (``recflow.event_log.JournalSession.append_many``); each
request is answered only after that commit returned, and a conflicting one (409) records nothing
without failing the others. Under load the fsync is paid once per group, not once per request.

Errors are :class:`ServiceError` subclasses carrying an HTTP status and the offending field.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import time
import uuid
from collections import Counter
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recflow.event_log import EventLog, JournalSession
from recflow.schemas import request_log_row
from recflow.security import redact
from recflow.settings import Settings
from serving import prefill, ranking, tower
from serving.api import (
    FeedbackBatchResponse,
    FeedbackRequest,
    FeedbackResponse,
    Item,
    Reason,
    RecommendRequest,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
    SimilarRequest,
    SimilarResponse,
    Status,
)
from serving.batching import MicroBatcher
from serving.features import OnlineUserReader, feature_age_s, logged_features
from serving.jsonfast import dumps
from serving.metrics import metrics
from serving.model_state import ModelNotFound, ServingState, files_signature, load_state, resolve_model
from serving.request_log import RequestLogWriter

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

    from recflow.event_log import Record
    from recflow.modeling import UserQuery
    from serving.model_state import ModelSource

log = logging.getLogger("recflow.serving")
MAX_GROUP_COMMIT = 512  # appends per journal transaction (each at most MAX_FEEDBACK_BATCH events)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop a process pool's processes now (a push hung on the store would otherwise outlive the worker)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.terminate()


PROBE_WAIT_S = 0.02  # longest a request waits for a probe of an online store that failed (one per cooldown)


def freeze_heap() -> None:
    """Put every object alive now (the model, catalogue and index: about half a million) out of the
    cyclic garbage collector's reach. A full collection over them takes about 0.3 s, and it holds the
    GIL, so every request in flight waits: on CPU it set the p99. Called after each (re)load; the
    collection here, once, frees the replaced model."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ServiceError(Exception):
    """An answer other than 200: ``status``, a message, and the request field it is about."""

    status = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(ServiceError):
    status = 400


class NotReady(ServiceError):
    status = 503


class NotFound(ServiceError):
    status = 404


class Unauthorized(ServiceError):
    status = 401


class Conflict(ServiceError):
    status = 409


class Unprocessable(ServiceError):
    status = 422


@dataclass
class _Job:
    req: RecommendRequest
    request_id: str
    now: datetime


@dataclass
class _Answer:
    """One /recommend answer: the JSON body (a :class:`RecommendResponse`) and what gets logged."""

    body: bytes
    features_json: str
    k: int
    item_ids: list[str]
    scores: list[float]
    model_version: str
    fallback: bool
    degraded: bool
    feature_age_s: float | None


def _text(value: Any) -> str | None:
    """A catalogue text field as JSON wants it (None for missing or NaN)."""
    return value if isinstance(value, str) else None


class RequestIds:
    """Unique request ids without a system call per request: a random 64-bit prefix per process
    and a counter (32 hex characters, like ``uuid4().hex``)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


@dataclass
class StageTimes:
    """One /recommend batch: size and seconds per stage."""

    batch: int
    features: float
    user_tower: float
    topk: float


@dataclass
class _RateLimitedLog:
    every_s: float = 10.0
    last: float = 0.0
    suppressed: int = 0

    def warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            extra = f" ({self.suppressed} similar message(s) suppressed)" if self.suppressed else ""
            log.warning(msg + extra, *args)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


@dataclass
class Runtime:
    """Serving runtime (see the module docstring). Call :meth:`start` inside the event loop."""

    settings: Settings
    state: ServingState | None = None
    load_error: str | None = None
    store: FeatureStore | None = None
    _reader: OnlineUserReader | None = None
    _query_cache: tower.UserQueryCache | None = None
    _answer_cache: ranking.AnswerCache | None = None
    _compute: Executor | None = None
    _features: Executor | None = None
    _journal: Executor | None = None
    _push: Executor | None = None
    _push_kick: asyncio.Event | None = None
    _next_push: asyncio.Future[set[str] | None] | None = None
    _stalled_push: asyncio.Future[set[str]] | None = None
    _journal_queue: list[tuple[list[Record], list[str], asyncio.Future[int]]] = field(default_factory=list)
    _journal_busy: bool = False
    _journal_session: JournalSession | None = None
    _push_epoch: int = 0  # bumped when the registry is refreshed (the push executor follows)
    _push_categories: str | None = None  # the model whose item categories the push executor holds
    _push_pool: ProcessPoolExecutor | None = None  # the push process while it warms up
    pending_feedback: int | None = None
    _first_load: asyncio.Event | None = None
    _loader: Executor | None = None
    _batcher: MicroBatcher[_Job, _Answer] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _reload_lock: asyncio.Lock | None = None
    request_log: RequestLogWriter | None = None
    _store_warn: _RateLimitedLog = field(default_factory=_RateLimitedLog)
    _push_warn: _RateLimitedLog = field(default_factory=_RateLimitedLog)
    _row_warn: _RateLimitedLog = field(default_factory=_RateLimitedLog)
    _categories: tuple[ServingState, frozenset[str]] | None = None
    _store_down_until: float = 0.0  # 0: the store answers; else the circuit is open (no probe before this time)
    _store_probe: Future[Any] | None = None
    _probe_started: float = 0.0
    _request_ids: RequestIds = field(default_factory=RequestIds)
    write_token: str | None = None
    read_token: str | None = None
    _pseudonym_key: bytes | None = None

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Model and feature store loaded."""
        return self.state is not None and self.store is not None

    @property
    def event_log(self) -> EventLog:
        return EventLog(self.settings.paths.event_log, timeout_s=self.settings.feedback.journal_timeout_s)

    async def start(self) -> None:
        """Start threads, the request log, the batcher and the background loops; loading happens
        in the background (:meth:`wait_first_load` waits for its first attempt)."""
        import torch

        s = self.settings.serving
        torch.set_num_threads(s.torch_threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(s.torch_threads)
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/faiss setups
            pass
        self._resolve_auth()
        from recflow.privacy import pseudonym_key

        self._pseudonym_key = pseudonym_key(self.settings)  # the request log never holds a raw user id
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="recflow-compute")
        self._features = ThreadPoolExecutor(4, thread_name_prefix="recflow-features")
        self._journal = ThreadPoolExecutor(1, thread_name_prefix="recflow-journal")
        self._push = ThreadPoolExecutor(1, thread_name_prefix="recflow-push")  # until the push process is warm
        self._start_push_process()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="recflow-loader")
        self._reload_lock = asyncio.Lock()
        self.request_log = RequestLogWriter(
            self.settings.paths.request_log, flush_s=s.request_log_flush_s, rotate_s=s.request_log_rotate_s,
            max_rows=s.request_log_max_rows, max_bytes=s.request_log_max_bytes,
        )
        self.request_log.start()
        self._batcher = MicroBatcher(self._recommend_batch, self._compute, max_batch=s.max_batch_size,
                                     wait_s=s.batch_wait_ms / 1000, on_batch=self._on_batch)
        self._batcher.start()
        loop = asyncio.get_running_loop()
        self._push_kick = asyncio.Event()
        self._first_load = asyncio.Event()
        self._next_push = loop.create_future()
        self._tasks = [loop.create_task(self._load_loop(), name="recflow-load"),
                       loop.create_task(self._push_loop(), name="recflow-push"),
                       loop.create_task(self._champion_loop(), name="recflow-champion-watch")]

    def _resolve_auth(self) -> None:
        """Tokens for this worker: the write token always (``serving.token``, else the home's generated
        one), the read token when set; neither with ``serving.auth_disabled`` (loopback only)."""
        from recflow.security import check_auth_setting, reveal, serving_token, token_path

        s = self.settings.serving
        check_auth_setting(self.settings)
        if s.auth_disabled:
            self.write_token = self.read_token = None
            log.warning("serving.auth_disabled=true: every endpoint accepts unauthenticated calls (loopback only)")
            return
        self.write_token = serving_token(self.settings, create=True)
        self.read_token = reveal(s.read_token)
        where = "serving.token" if reveal(s.token) else f"the token file {token_path(self.settings)}"
        log.info("auth: /feedback, /feedback/batch and /reload need the bearer token of %s; reads %s", where,
                 "need serving.read_token" if self.read_token else "are open (set serving.read_token to protect them)")

    def pseudonym(self, user_id: str) -> str:
        """The keyed pseudonym the request log stores instead of ``user_id`` (``recflow.privacy``)."""
        from recflow.privacy import pseudonym

        assert self._pseudonym_key is not None, "Runtime.start() loads the pseudonym key"
        return pseudonym(user_id, self._pseudonym_key)

    def authorised(self, header: str, *, write: bool) -> bool:
        """Whether an ``Authorization`` header value may call a write (or, ``write=False``, a read) endpoint."""
        import hmac

        if self.settings.serving.auth_disabled:
            return True
        wanted = [self.write_token] if write else ([self.read_token, self.write_token] if self.read_token else [])
        if not write and not wanted:
            return True  # reads are open without a read token
        scheme, _, value = header.partition(" ")
        given = value.strip().encode()
        ok = False
        for token in wanted:  # every candidate compared, in constant time
            if token:
                ok |= hmac.compare_digest(given, token.encode())
        return scheme.lower() == "bearer" and ok

    async def stop(self) -> None:
        """Stop loops and threads; write the request log out."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._batcher is not None:
            await self._batcher.stop()
        if self._journal is not None and self._journal_session is not None:
            with contextlib.suppress(Exception):
                self._journal.submit(self._journal_session.close)
        for ex in (self._compute, self._features, self._journal, self._push, self._loader):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        for pool in (self._push, self._push_pool):
            if isinstance(pool, ProcessPoolExecutor):
                pool.shutdown(wait=False, cancel_futures=True)
                _terminate(pool)
        if self.request_log is not None:
            self.request_log.close()

    async def _run(self, executor: Executor | None, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _open_store(self) -> tuple[FeatureStore, FeatureService]:
        from recflow import feature_store as fs

        store = fs.get_store(self.settings)
        if not self.settings.paths.feast_registry.exists() and self.settings.feast.online_store == "redis":
            log.warning("no Feast registry at %s: applying the bundled feature definitions", self.settings.paths.feast_registry)
            fs.apply(self.settings, store)
        return store, self._serving_service(store)

    def _serving_service(self, store: FeatureStore) -> FeatureService:
        name = self.settings.feast.serving_service
        try:
            return store.get_feature_service(name)
        except Exception as exc:  # noqa: BLE001 - Feast raises several kinds; make it actionable
            raise ModelNotFound(
                f"Feast feature service {name!r} not found in {self.settings.paths.feast_registry}: run `recflow features`"
            ) from exc

    async def wait_first_load(self, timeout_s: float) -> bool:
        """Wait until the first load attempt ended (the model is in, or it failed) or ``timeout_s``
        passed; returns :attr:`ready`. The service's start-up hook awaits this: uvicorn accepts
        connections only after start-up, so a (re)started worker takes no traffic while it loads."""
        if self._first_load is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_load.wait(), timeout_s)
        return self.ready

    async def _load_loop(self) -> None:
        try:
            await self._load_until_ready()
        finally:
            if self._first_load is not None:
                self._first_load.set()

    async def _load_until_ready(self) -> None:
        last_error = None
        while self.state is None:
            try:
                if self.store is None:
                    store, service = await self._run(self._loader, self._open_store)
                    self._reader = await self._run(self._loader, OnlineUserReader, store, service)
                    self.store = store
                state = await self._run(self._loader, load_state, self.settings, self.store)
                await self._run(self._loader, self.warm_up, state)
                answers = await self._run(self._loader, self.prefill_answers, state)
                await self._run(self._loader, freeze_heap)  # before ready: a full collection stalls requests
                self.state = state
                self._answer_cache = answers
                self._note_fallback(state)
                metrics()["reloads"].labels("ok").inc()
                log.info("ready: model %s, %d items", state.version, state.n_items)
                return
            except ModelNotFound as exc:
                self.load_error = str(exc)
            except Exception as exc:  # noqa: BLE001 - keep trying; the error is reported by /status
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("model load failed")
                metrics()["reloads"].labels("error").inc()
            if self.load_error != last_error:
                log.warning("not ready: %s (retrying every %.0f s)", self.load_error, self.settings.serving.load_retry_s)
                last_error = self.load_error
            if self._first_load is not None:
                self._first_load.set()  # the first attempt failed: go live (unready) and keep trying
            await asyncio.sleep(self.settings.serving.load_retry_s)

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
        return self.settings, None if isinstance(self._push, ProcessPoolExecutor) else self.store, self._push_epoch

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

        state = self.state
        if not self.ready or state is None:
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

    def champion_changed(self) -> ModelSource | None:
        """The champion pointer's model when it differs from the champion being served, else None.

        Only a service that serves the champion follows it (not ``model_path``, ``model_tag`` or a bento).
        """
        state = self.state
        if state is None or state.source.source != "champion":
            return None
        try:
            src = resolve_model(self.settings)
        except ModelNotFound:
            return None  # the pointer was removed: keep serving what is loaded
        failed = state.fallback
        if failed is not None and src.folder == failed.folder and files_signature(src.folder) == failed.signature:
            return None  # the champion that failed to load, unchanged: keep serving the previous one
        return src if src.source == "champion" and src.folder != state.source.folder else None

    def _note_fallback(self, state: ServingState) -> None:
        """Publish whether ``state`` is a previous champion serving for one that failed to load: the
        ``recflow_champion_fallback`` gauge (the alert), the reload counter and ``/status``'s load_error."""
        failed = state.fallback
        metrics()["champion_fallback"].set(1 if failed else 0)
        if failed is None:
            self.load_error = None
            return
        metrics()["reloads"].labels("fallback").inc()
        self.load_error = (f"champion {failed.tag} cannot be loaded ({failed.error}); serving the previous champion "
                           f"{state.version}: re-register and promote a good model, or `recflow rollback`")

    async def _champion_loop(self) -> None:
        """Follow the champion pointer, so a promotion or rollback reaches every worker and replica, not
        only the one process that got ``/reload``."""
        period = self.settings.serving.champion_poll_s
        if period <= 0:
            return
        while True:
            await asyncio.sleep(period)
            try:
                new = await self._run(self._loader, self.champion_changed)
                if new is not None:
                    log.info("champion pointer now names %s: loading it", new.version)
                    await self.reload()
            except Exception:  # noqa: BLE001 - the loop must survive; /status and the reload metric report it
                log.exception("following the champion pointer failed")

    def warm_up(self, state: ServingState, rounds: int = 3) -> float:
        """Run the /recommend path (online read, user tower, ranking with reasons, popularity) on a
        synthetic user a few times before ``state`` serves: the first calls of each code path and
        tensor shape are several times slower, and on a fresh worker they set the first second's
        latency. Returns the seconds it took."""
        started = time.perf_counter()
        # an unknown user: one read of every view, through the timeout and circuit breaker of requests
        # (a store that is down or hung makes this degraded, never a hung load)
        self._fetch(["__recflow_warm_up__"])
        ids = [state.index.item_ids[p] for p in state.catalogue.pop_order[:300]]
        now = int(time.time())
        feats = {"user_history__history_item_ids": ids,
                 "user_history__history_ts": [now - 86_400 * (i // 12) for i in range(len(ids))]}
        for _ in range(rounds):
            for size in (1, 2, 4):
                if state.two_stage is not None:
                    ranking.rank_two_stage(state, [ranking.HistoryAsk(ids, feats["user_history__history_ts"], now, 10,
                                                                      exclude_history=i % 2 == 1) for i in range(size)])
                    continue
                queries = tower.user_queries(state.model, state.index, state.lookup, [feats] * size)
                ranking.rank_users(state, [ranking.UserAsk(q, 10, exclude_history=i % 2 == 1)
                                           for i, q in enumerate(queries)])
            ranking.popular(state, 10)
        seconds = time.perf_counter() - started
        log.info("warm-up of model %s: %.2f s", state.version, seconds)
        return seconds

    def prefill_answers(self, state: ServingState) -> ranking.AnswerCache | None:
        """A new answer cache for ``state`` (a two-stage model; else None) that already holds the
        default answers of the ``serving.answer_prefill_users`` most recently active users (at most
        ``user_cache_size``), ranked within ``answer_prefill_s`` before ``state`` serves, so a fresh
        worker does not queue on its first requests. A failure only costs the prefill."""
        if state.two_stage is None:
            return None
        s = self.settings.serving
        cache = self._new_answer_cache(state)
        limit = min(s.answer_prefill_users, s.user_cache_size)
        if not cache.enabled or limit == 0 or s.answer_prefill_s <= 0:
            return cache
        try:
            users = prefill.recent_users(self.settings.paths.feature_table("user_history"), limit)
            if not users:
                log.info("answer prefill: no offline user_history table in this home, nothing to prefill")
                return cache

            def rank(asks: list[ranking.HistoryAsk]) -> list[Any]:
                served: list[dict[str, float | None]] = []
                return list(zip(ranking.rank_two_stage(state, asks, served), served, strict=True))

            done = prefill.prefill(cache, users, self._fetch, rank,
                                   min(s.default_k, state.n_items), s.answer_prefill_s, batch=s.max_batch_size)
        except Exception as exc:  # noqa: BLE001 - the model serves without a prefill
            log.warning("answer prefill failed, serving without it: %s: %s", type(exc).__name__,
                        redact(str(exc)[:200], self.settings))
            return cache
        log.info("answer prefill of model %s: %d of %d users ranked in %.1f s%s", state.version, done.answered,
                 done.users, done.seconds, f" (stopped: {done.stopped})" if done.stopped else "")
        return cache

    def require_state(self) -> ServingState:
        state = self.state
        if state is None or self.store is None:
            raise NotReady(f"the service is not ready yet: {self.load_error or 'loading the model'}")
        return state

    # --- online features --------------------------------------------------------------------
    def _fetch(self, user_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """Online features of ``user_ids`` (None when the store failed or timed out: degraded)."""
        assert self._features is not None and self._reader is not None
        if not user_ids:
            return {}
        if self._store_down_until and not self._store_back(user_ids[0]):  # circuit open: answer at once, degraded
            return None
        fut = self._features.submit(self._reader, user_ids)
        try:
            rows = fut.result(timeout=self.settings.serving.feature_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any store failure degrades to popularity
            fut.cancel()
            self._store_down_until = self._probe_started = time.monotonic()
            self._store_probe = self._features.submit(self._reader, user_ids[:1])  # is it back? (off the request path)
            metrics()["store_errors"].labels("read").inc()
            self._store_warn.warn("online store read failed, serving popularity (degraded) until a background read "
                                  "answers again (one every %.1f s): %s: %s", self.settings.serving.store_cooldown_s,
                                  type(exc).__name__, str(exc)[:200])
            return None
        return dict(zip(user_ids, rows, strict=True))

    def _store_back(self, user_id: str) -> bool:
        """Whether the store answers again, while the circuit is open. One probe read at a time runs in
        the background, and the circuit closes as soon as one answers; a request waits for a fresh
        probe at most ``PROBE_WAIT_S`` (a recovered store serves that request at once), never the
        whole ``feature_timeout_s``, and a failed probe is retried after ``store_cooldown_s``. So a
        hung store costs one ``feature_timeout_s`` stall in all, not one per cooldown."""
        assert self._features is not None and self._reader is not None
        s = self.settings.serving
        probe = self._store_probe
        if probe is not None and not probe.done() and time.monotonic() - self._probe_started > s.feature_timeout_s:
            # a probe as slow as a failed read: give up on it (its thread ends when the store answers)
            probe = self._store_probe = None
            self._store_down_until = self._probe_started + s.store_cooldown_s
        if probe is None:
            if time.monotonic() < self._store_down_until:
                return False
            self._probe_started = time.monotonic()
            probe = self._store_probe = self._features.submit(self._reader, [user_id])
            # still down or still hung: decided below, or by the next request
            with contextlib.suppress(Exception):
                probe.result(timeout=min(PROBE_WAIT_S, s.feature_timeout_s))
        if not probe.done():
            return False
        self._store_probe = None
        if probe.exception() is None:
            self._store_down_until = 0.0
            return True
        self._store_down_until = self._probe_started + s.store_cooldown_s  # a probe per cooldown
        return False

    # --- /recommend ---------------------------------------------------------------------------
    async def recommend(self, req: RecommendRequest) -> bytes:
        """Personalised top-k (popularity when the user is unknown or the store is down): the JSON
        of a :class:`RecommendResponse`, serialised in the batch (off the event loop)."""
        self.require_state()
        assert self._batcher is not None
        started = time.perf_counter()
        now = req.timestamp or datetime.now(UTC)
        request_id = self._request_ids.next()
        answer = await self._batcher.submit(_Job(req, request_id, now))
        if self.request_log is not None:
            self.request_log.log(request_log_row(
                request_id=request_id, ts=now, user_id=self.pseudonym(req.user_id), k=answer.k,
                model_version=answer.model_version, fallback=answer.fallback, degraded=answer.degraded,
                feature_age_s=answer.feature_age_s, latency_ms=(time.perf_counter() - started) * 1e3,
                features=answer.features_json, item_ids=answer.item_ids, scores=answer.scores,
            ))
        metrics()["latency"].labels("recommend").observe(time.perf_counter() - started)
        return answer.body

    def _user_queries(self, state: ServingState, user_ids: list[str], features: list[dict[str, Any]]) -> list[UserQuery]:
        """The user tower's queries, from the cache where the users' rows are unchanged (compute thread only)."""
        cache = self._query_cache
        if cache is None or cache.version != state.version:
            s = self.settings.serving
            stamps = self._reader.stamp_keys if self._reader is not None else []
            cache = self._query_cache = tower.UserQueryCache(state.version, stamps, s.user_cache_size, s.user_cache_ttl_s)
        hits, misses = cache.hits, cache.misses
        out = cache.queries(user_ids, features,
                            lambda missed: tower.user_queries(state.model, state.index, state.lookup, missed))
        m = metrics()["user_cache"]
        if cache.hits > hits:
            m.labels("hit").inc(cache.hits - hits)
        if cache.misses > misses:
            m.labels("miss").inc(cache.misses - misses)
        return out

    def _answer_cache_for(self, state: ServingState) -> ranking.AnswerCache:
        """The two-stage answer cache of the loaded model (a new model starts an empty one)."""
        cache = self._answer_cache
        if cache is None or cache.version != state.version:
            cache = self._answer_cache = self._new_answer_cache(state)
        return cache

    def _new_answer_cache(self, state: ServingState) -> ranking.AnswerCache:
        s = self.settings.serving
        return ranking.AnswerCache(state.version, s.user_cache_size, s.answer_cache_s)

    def _on_batch(self, size: int, seconds: float) -> None:
        metrics()["batch"].observe(size)

    def _recommend_batch(self, jobs: list[_Job]) -> list[_Answer | BaseException]:
        """Rank a batch; when that fails, rank each request on its own, so a bad online row (or any
        per-user failure) costs only its own request, which then gets popularity (``degraded``)."""
        try:
            return self._rank_batch(jobs)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the request that caused it
            if len(jobs) == 1:
                return [self._failed_answer(jobs[0], exc)]
        out: list[_Answer | BaseException] = []
        for job in jobs:
            try:
                out.extend(self._rank_batch([job]))
            except ServiceError:
                raise
            except Exception as exc:  # noqa: BLE001 - this request only
                out.append(self._failed_answer(job, exc))
        return out

    def _failed_answer(self, job: _Job, exc: BaseException) -> _Answer | BaseException:
        """Popularity for a request whose own ranking failed (flagged ``fallback`` and ``degraded``)."""
        state = self.require_state()
        metrics()["store_errors"].labels("row").inc()
        self._row_warn.warn("ranking failed for one request, answered with popularity (degraded): %s: %s",
                            type(exc).__name__, redact(str(exc)[:200], self.settings))
        k = min(job.req.k or self.settings.serving.default_k, state.n_items)
        rows = None
        if job.req.category is not None:
            rows = self._category_rows(state, job.req.category)
            if rows is None:
                return NotFound(f"category {job.req.category!r} matches no item's category or department",
                                field="category")
        items = self._item_dicts(state, ranking.popular(state, k, rows, None))
        body = dumps({"request_id": job.request_id, "user_id": job.req.user_id, "items": items,
                      "model_version": state.version, "feature_age_s": None, "fallback": True, "degraded": True})
        return _Answer(body, logged_features(None, 0), k, [it["item_id"] for it in items],
                       [it["score"] for it in items], state.version, True, True, None)

    def _category_rows(self, state: ServingState, category: str) -> np.ndarray | None:
        """``state.catalogue.category_rows`` behind a set of the catalogue's categories and departments
        (built once per model), so an unknown category costs a set lookup, not a catalogue scan."""
        known = self._categories
        if known is None or known[0] is not state:
            cat = state.catalogue
            names = np.concatenate([np.char.lower(np.asarray(cat.categories, dtype=str)),
                                    np.char.lower(np.asarray(cat.departments, dtype=str))])
            known = self._categories = (state, frozenset(names.tolist()))
        if category.strip().casefold() not in known[1]:
            return None
        return state.catalogue.category_rows(category)

    def _rank_batch(self, jobs: list[_Job]) -> list[_Answer | BaseException]:
        state = self.require_state()
        t0 = time.perf_counter()
        users = list(dict.fromkeys(j.req.user_id for j in jobs))
        feats = self._fetch(users)
        degraded = feats is None
        t1 = time.perf_counter()
        out: list[_Answer | BaseException] = []
        rows: list[np.ndarray | None] = []
        ks: list[int] = []
        for j in jobs:
            k = min(j.req.k or self.settings.serving.default_k, state.n_items)
            ks.append(k)
            r = None
            if j.req.category is not None:
                r = self._category_rows(state, j.req.category)
                if r is None:
                    rows.append(None)
                    out.append(NotFound(f"category {j.req.category!r} matches no item's category or department",
                                        field="category"))
                    continue
            rows.append(r)
            out.append(None)  # type: ignore[arg-type]
        with_feats = [i for i, j in enumerate(jobs) if out[i] is None and feats and feats[j.req.user_id] is not None]
        two_stage = state.two_stage is not None
        queries = (self._user_queries(state, [jobs[i].req.user_id for i in with_feats],
                                      [feats[jobs[i].req.user_id] for i in with_feats])
                   if feats and with_feats and not two_stage else [])
        t2 = time.perf_counter()
        asks: list[Any] = []
        ask_of: dict[int, int] = {}
        history_of: dict[int, int] = {}
        cached: dict[int, tuple[list[ranking.Pick], dict[str, float | None]]] = {}
        served: list[dict[str, float | None]] = []  # the two-stage asks' user-level ranker features
        if two_stage:
            cache = self._answer_cache_for(state)
            keys: dict[int, tuple[Any, int]] = {}
            for i in with_feats:
                j = jobs[i]
                hist = ranking.online_history(feats[j.req.user_id])  # type: ignore[index]
                if hist is not None:
                    ids, stamps = hist
                    history_of[i] = len(ids)
                    as_of = int(j.now.timestamp())
                    if j.req.timestamp is None:  # "now": a recent answer for the same history will do
                        key = ranking.answer_key(j.req.user_id, ks[i], j.req.exclude_purchased, j.req.category)
                        fp = cache.fingerprint(ids, stamps)
                        hit = cache.get(key, fp, as_of)
                        if hit is not None:
                            cached[i] = hit
                            continue
                        keys[len(asks)] = (key, fp)
                    ask_of[i] = len(asks)
                    asks.append(ranking.HistoryAsk(ids, stamps, as_of, ks[i], j.req.exclude_purchased, rows[i], j.req.user_id))
            ranked = ranking.rank_two_stage(state, asks, served)
            for n, (key, fp) in keys.items():
                cache.put(key, fp, asks[n].as_of, (ranked[n], served[n]))
            if cached or keys:
                m = metrics()["user_cache"]
                m.labels("hit").inc(len(cached))
                m.labels("miss").inc(len(keys))
        else:
            for i, q in zip(with_feats, queries, strict=True):
                if q.n_history > 0:
                    ask_of[i] = len(asks)
                    asks.append(ranking.UserAsk(q, ks[i], jobs[i].req.exclude_purchased, rows[i]))
            ranked = ranking.rank_users(state, asks)
        t3 = time.perf_counter()
        query_of = dict(zip(with_feats, queries, strict=True)) if queries else {}
        for i, j in enumerate(jobs):
            if out[i] is not None:
                continue
            f = feats.get(j.req.user_id) if feats else None
            q = query_of.get(i)
            model_feats: dict[str, float | None] | None = {} if two_stage else None  # no history: none ranked
            if i in ask_of:
                picks, fallback = ranked[ask_of[i]], False
                model_feats = served[ask_of[i]] if two_stage else None
            elif i in cached:
                (picks, model_feats), fallback = cached[i], False
            else:
                exclude = q.history_positions if (q is not None and j.req.exclude_purchased) else None
                picks, fallback = ranking.popular(state, ks[i], rows[i], exclude), True
            n_history = q.n_history if q is not None else history_of.get(i, 0)
            age = feature_age_s(f, j.now.timestamp()) if f else None
            items = self._item_dicts(state, picks)
            body = dumps({
                "request_id": j.request_id, "user_id": j.req.user_id, "items": items, "model_version": state.version,
                "feature_age_s": age, "fallback": fallback, "degraded": degraded,
            })
            logged = logged_features(f, n_history, profile=self.settings.privacy.log_profile, model_features=model_feats)
            out[i] = _Answer(body, logged, ks[i],
                             [it["item_id"] for it in items], [it["score"] for it in items], state.version,
                             fallback, degraded, age)
        t4 = time.perf_counter()
        times = StageTimes(len(jobs), t1 - t0, t2 - t1, (t3 - t2) + (t4 - t3))
        m = metrics()["stage"]
        m.labels("features").observe(times.features)
        m.labels("user_tower").observe(times.user_tower)
        m.labels("topk").observe(times.topk)
        kinds = Counter("degraded" if a.degraded else "fallback" if a.fallback else "model"
                        for a in out if isinstance(a, _Answer))
        for kind, n in kinds.items():
            metrics()["responses"].labels("recommend", kind).inc(n)
        return out

    @staticmethod
    def _item_dicts(state: ServingState, picks: list[ranking.Pick]) -> list[dict[str, Any]]:
        """:meth:`_items` as plain dicts (the JSON of ``Item``)."""
        ids, cat = state.index.item_ids, state.catalogue
        return [
            {"item_id": ids[p.position], "score": round(p.score, 6), "title": _text(cat.titles[p.position]),
             "category": _text(cat.categories[p.position]),
             "reason": {"kind": p.kind, "item_id": ids[p.reason] if p.reason is not None else None, "text": p.text}}
            for p in picks
        ]

    @staticmethod
    def _items(state: ServingState, picks: list[ranking.Pick]) -> list[Item]:
        ids, cat = state.index.item_ids, state.catalogue
        return [
            Item.model_construct(
                item_id=ids[p.position], score=round(p.score, 6), title=cat.titles[p.position],
                category=cat.categories[p.position],
                reason=Reason.model_construct(kind=p.kind, item_id=ids[p.reason] if p.reason is not None else None,
                                              text=p.text),
            )
            for p in picks
        ]

    def _log_request(
        self, endpoint: str, request_id: str, ts: datetime, user_id: str | None, item_id: str | None, k: int,
        version: str, fallback: bool, degraded: bool, age: float | None, started: float, features: str,
        items: list[Item],
    ) -> None:
        if self.request_log is None:
            return
        self.request_log.log(request_log_row(
            request_id=request_id, ts=ts, endpoint=endpoint,
            user_id=self.pseudonym(user_id) if user_id is not None else None, item_id=item_id, k=k,
            model_version=version, fallback=fallback, degraded=degraded, feature_age_s=age,
            latency_ms=(time.perf_counter() - started) * 1e3, features=features,
            item_ids=[i.item_id for i in items], scores=[i.score for i in items],
        ))

    # --- /similar, /search --------------------------------------------------------------------
    async def similar(self, req: SimilarRequest) -> SimilarResponse:
        """Items closest to ``item_id`` in the item tower's space."""
        state = self.require_state()
        started = time.perf_counter()
        pos = state.index.position.get(req.item_id)
        if pos is None:
            raise NotFound(f"item_id {req.item_id!r} is not in the catalogue", field="item_id")
        k = min(req.k or self.settings.serving.default_k, state.n_items - 1)
        picks = await self._run(self._compute, ranking.similar, state, pos, k)
        resp = SimilarResponse.model_construct(request_id=self._request_ids.next(), item_id=req.item_id,
                                               items=self._items(state, picks), model_version=state.version)
        metrics()["responses"].labels("similar", "model").inc()
        self._log_request("similar", resp.request_id, datetime.now(UTC), None, req.item_id, k, state.version,
                          False, False, None, started, "{}", resp.items)
        return resp

    async def search(self, req: SearchRequest) -> SearchResponse:
        """Semantic search over item texts; personalised by the user's model score when given."""
        state = self.require_state()
        started = time.perf_counter()
        k = min(req.k or self.settings.serving.default_k, state.n_items)
        query, degraded = None, False
        if req.user_id is not None:
            feats = await self._run(None, self._fetch, [req.user_id])
            degraded = feats is None
            if feats and feats.get(req.user_id):
                q = (await self._run(self._compute, self._user_queries, state, [req.user_id], [feats[req.user_id]]))[0]
                query = q if q.n_history > 0 else None
        picks = await self._run(self._compute, ranking.search, state, req.query, k, query,
                                self.settings.serving.search_personalisation)
        resp = SearchResponse.model_construct(request_id=self._request_ids.next(), items=self._items(state, picks),
                                              model_version=state.version, personalised=query is not None,
                                              degraded=degraded)
        metrics()["responses"].labels("search", "degraded" if degraded else "model").inc()
        words = len(req.query.split())
        self._log_request("search", resp.request_id, datetime.now(UTC), req.user_id, None, k, state.version,
                          False, degraded, None, started, f'{{"query_chars":{len(req.query)},"query_words":{words}}}',
                          resp.items)
        return resp

    # --- /feedback ----------------------------------------------------------------------------
    async def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        """Append the event durably (idempotent by event_id), then wait up to ``feedback.push_wait_s``
        for the online push (the push runs on its own thread; the answer never waits longer)."""
        from serving.feedback import event_records

        state = self.require_state()
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
        from serving.feedback import event_records

        started = time.perf_counter()
        state = self.require_state()
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

    # --- /reload, /status ---------------------------------------------------------------------
    def _tag_folder(self, tag: str) -> Path:
        """The registry folder of ``tag`` (404 naming the tag, never the folder, when unknown)."""
        from recflow import registry

        if ".." in tag:
            raise BadRequest(f"model_tag {tag!r} is not a registry tag (name:version, see `recflow models`)",
                             field="model_tag")
        try:
            return registry.model_path(self.settings, tag)
        except Exception as exc:  # noqa: BLE001 - bentoml raises NotFound or a bad-tag error
            metrics()["reloads"].labels("not_found").inc()
            raise NotFound(f"model_tag {tag!r} is not in the model registry (see `recflow models`)",
                           field="model_tag") from exc

    async def reload(self, model_tag: str | None = None) -> ReloadResponse:
        """Load the champion (or the registry's ``model_tag``), build its index, then swap it in atomically."""
        assert self._reload_lock is not None
        self.require_state()  # before the first load there is nothing to swap: the load loop is on it
        settings = self.settings
        if model_tag:
            await self._run(self._loader, self._tag_folder, model_tag)  # a clean 404 for an unknown tag
            serving = settings.serving.model_copy(update={"model_tag": model_tag, "model_path": None})
            settings = settings.model_copy(update={"serving": serving})
        async with self._reload_lock:
            previous = self.state.version if self.state else None
            started = time.perf_counter()
            try:
                if self.store is not None:
                    await self._run(self._loader, self.store.refresh_registry)
                    service = await self._run(self._loader, self._serving_service, self.store)
                    self._reader = await self._run(self._loader, OnlineUserReader, self.store, service)
                    self._push_epoch += 1  # the push executor refreshes its registry and feature views
                state = await self._run(self._loader, load_state, settings, self.store)
                await self._run(self._loader, self.warm_up, state)
                answers = await self._run(self._loader, self.prefill_answers, state)
            except ModelNotFound as exc:
                metrics()["reloads"].labels("not_found").inc()
                raise NotFound(f"{exc}; still serving {previous}", field="model_tag" if model_tag else None) from exc
            self.state = state
            self._note_fallback(state)
            self._query_cache = None  # queries of the old model, or of rows read with the old registry
            self._answer_cache = answers
            await self._run(self._loader, freeze_heap)
            metrics()["reloads"].labels("ok").inc()
            log.info("reloaded: %s -> %s", previous, state.version)
            return ReloadResponse(model_version=state.version, previous_version=previous, items=state.n_items,
                                  seconds=round(time.perf_counter() - started, 3))

    async def status(self) -> Status:
        """What is loaded, and how many feedback events wait to be pushed."""
        state = self.state
        pending = self.pending_feedback  # kept by the push loop: no journal query on a request
        return Status(
            ready=self.ready, model_version=state.version if state else None,
            model_source=f"{state.source.source}:{state.version}" if state else None,
            items=state.n_items if state else 0,
            index=(state.ann.name if state.ann else state.scorer.name) if state else self.settings.serving.index,
            loaded_at=state.loaded_at if state else None,
            load_error=redact(self.load_error, self.settings) if self.load_error else None, pending_feedback=pending,
            worker_pid=os.getpid(),
        )
