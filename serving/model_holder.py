"""The model a worker serves: the first load (retried until it works), ``/reload``, following the
champion pointer, warm-up and the answer-cache prefill, and the atomic swap of the loaded
:class:`~serving.serving_state.ServingState`.

Loading runs on one loader thread. A worker is ready once a model and the feature store are in;
before that, :meth:`ModelHolder.require_state` answers 503 saying what is missing. A reload builds
the new state next to the old one (warmed up, its answer cache prefilled) and then swaps one
reference, so requests never see a half-loaded model. A running canary (``serving.canary``) is
loaded and swapped the same way, next to the champion.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recflow.security import redact
from recflow.settings import Settings
from serving import prefill, ranking, tower
from serving.aio import cancel_tasks
from serving.api import ReloadResponse
from serving.canary import CanaryModel, settings_for, wanted
from serving.errors import BadRequest, NotFound, NotReady
from serving.metrics import metrics, note_model
from serving.model_source import ModelNotFound, files_signature, resolve_model
from serving.serving_state import ServingState, load_state
from serving.store_client import StoreClient

if TYPE_CHECKING:
    from serving.model_source import ModelSource

log = logging.getLogger("recflow.serving")


def freeze_heap() -> None:
    """Put every object alive now (the model, catalogue and index: about half a million) out of the
    cyclic garbage collector's reach. A full collection over them takes about 0.3 s, and it holds the
    GIL, so every request in flight waits: on CPU it set the p99. Called after each (re)load; the
    collection here, once, frees the replaced model."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclass
class ModelHolder:
    """The loaded model of one worker and everything that replaces it (see the module docstring).

    ``answer_cache`` and ``query_cache`` belong to the loaded model: a new model starts new ones."""

    settings: Settings
    online: StoreClient
    state: ServingState | None = None
    load_error: str | None = None
    answer_cache: ranking.AnswerCache | None = None
    query_cache: tower.UserQueryCache | None = None
    canary: CanaryModel | None = None  # the canary model serving its share of users (recflow.canary)
    _canary_failed: str | None = None  # the canary tag whose load failed: not retried at every poll
    registry_epoch: int = 0  # bumped when a reload refreshed the Feast registry (the push executor follows)
    _loader: Executor | None = None
    _first_load: asyncio.Event | None = None
    _stopping: bool = False  # the worker is stopping: a prefill under way ends at its next batch
    _reload_lock: asyncio.Lock | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Model and feature store loaded."""
        return self.state is not None and self.online.store is not None

    def require_state(self) -> ServingState:
        """The loaded model, or 503 saying why there is none yet."""
        state = self.state
        if state is None or self.online.store is None:
            raise NotReady(f"the service is not ready yet: {self.load_error or 'loading the model'}")
        return state

    def start(self) -> None:
        """Start loading in the background, and following the champion pointer (inside the event loop)."""
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="recflow-loader")
        self._reload_lock = asyncio.Lock()
        self._first_load = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._load_loop(), name="recflow-load"),
                       loop.create_task(self._champion_loop(), name="recflow-champion-watch")]

    async def stop(self) -> None:
        self._stopping = True  # a prefill under way ends at its next batch
        await cancel_tasks(self._tasks)
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    async def wait_first_load(self, timeout_s: float, stop: asyncio.Event | None = None) -> bool:
        """Wait until the first load attempt ended (the model is in, or it failed), ``timeout_s``
        passed or ``stop`` is set (the worker is asked to stop: the prefill ends at its next batch);
        returns :attr:`ready`. The service's start-up hook awaits this: uvicorn accepts connections
        only after start-up, so a (re)started worker takes no traffic while it loads."""
        if self._first_load is None:
            return self.ready
        waits = [asyncio.ensure_future(self._first_load.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if stop is not None and stop.is_set():
            self._stopping = True
        return self.ready

    async def _load_loop(self) -> None:
        try:
            await self._load_until_ready()
        finally:
            if self._first_load is not None:
                self._first_load.set()
        await self.follow_canary()  # after ready: a canary never delays the champion's first answer

    async def follow_canary(self) -> None:
        """Load, replace or drop the canary so that it matches the canary pointer (see ``serving.canary``).
        A failed load is logged once per tag, and the champion answers every user."""
        if self._reload_lock is None:
            return
        async with self._reload_lock:
            await self._follow_canary()

    async def _follow_canary(self) -> None:
        state = self.state
        if state is None:
            return
        try:
            found = await self._run(wanted, self.settings, state)
        except Exception as exc:  # noqa: BLE001 - an unreadable pointer: the champion serves everyone
            log.warning("canary pointer unreadable (%s: %s): the champion serves every user", type(exc).__name__, exc)
            found = None
        current = self.canary
        if found is None:
            if current is not None:
                self.canary = None
                metrics()["canary"].labels(current.state.version).set(0)
                log.info("canary %s ended: the champion %s serves every user", current.state.version, state.version)
            return
        tag, share = str(found["tag"]), float(found["share"])
        if (current is not None and current.state.version == tag
                and not await self._run(self.item_side_changed, current.state)):
            current.share, current.salt = share, str(found.get("salt") or tag)
            metrics()["canary"].labels(tag).set(share)
            return
        if tag == self._canary_failed and current is None:
            return
        try:
            new = await self._run(load_state, settings_for(self.settings, tag), self.online.store)
            await self._run(self.warm_up, new)
        except Exception as exc:  # noqa: BLE001 - the champion keeps serving every user
            self._canary_failed = tag
            metrics()["reloads"].labels("canary_error").inc()
            log.error("canary %s cannot be loaded (%s: %s): the champion serves every user", tag, type(exc).__name__,
                      redact(str(exc)[:300], self.settings))
            return
        self._canary_failed = None
        self.canary = CanaryModel(new, share, str(found.get("salt") or tag))
        if current is not None and current.state.version != tag:
            metrics()["canary"].labels(current.state.version).set(0)
        metrics()["canary"].labels(tag).set(share)
        await self._run(freeze_heap)
        log.info("canary %s serves %.0f%% of users (champion %s)", tag, 100 * share, state.version)

    async def _load_until_ready(self) -> None:
        last_error = None
        while self.state is None:
            try:
                if self.online.store is None:
                    await self._run(self.online.open)
                state = await self._run(load_state, self.settings, self.online.store)
                await self._run(self.warm_up, state)
                answers = await self._run(self.prefill_answers, state)
                await self._run(freeze_heap)  # before ready: a full collection stalls requests
                self.state = state
                self.answer_cache = answers
                self._note_fallback(state)
                note_model(state.version, None)
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
        if src.source == "champion" and src.folder != state.source.folder:
            return src
        return src if src.source == "champion" and self.item_side_changed(state) else None

    def item_side_changed(self, state: ServingState) -> bool:
        """Whether a daily item refresh (``recflow.item_refresh``) of the served model is newer than the
        item side it serves (the champion poll then reloads the same model with it)."""
        from recflow import item_refresh

        if state.two_stage is None or state.fallback is not None:
            return False
        found = item_refresh.current(self.settings, state.version)
        if found is None:
            return False
        from recflow.timeutil import to_utc

        as_of = int(to_utc(found[1]["as_of"]).timestamp())
        return as_of > int(state.two_stage.side.stats.as_of)

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
                new = await self._run(self.champion_changed)
                if new is not None:
                    same = self.state is not None and new.version == self.state.version
                    log.info("%s: loading it", f"a newer item side of {new.version}" if same
                             else f"champion pointer now names {new.version}")
                    await self.reload(only_if_changed=True)
                else:
                    await self.follow_canary()
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
        self.online.fetch(["__recflow_warm_up__"])
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

    def new_answer_cache(self, state: ServingState) -> ranking.AnswerCache:
        s = self.settings.serving
        return ranking.AnswerCache(state.version, s.user_cache_size, s.answer_cache_s)

    def answer_cache_for(self, state: ServingState) -> ranking.AnswerCache:
        """The two-stage answer cache of the loaded model, or of the canary for its state (a new model
        starts an empty one)."""
        canary = self.canary
        if canary is not None and state is canary.state:
            if canary.answer_cache is None:
                canary.answer_cache = self.new_answer_cache(state)
            return canary.answer_cache
        cache = self.answer_cache
        if cache is None or cache.version != state.version:
            cache = self.answer_cache = self.new_answer_cache(state)
        return cache

    def prefill_answers(self, state: ServingState) -> ranking.AnswerCache | None:
        """A new answer cache for ``state`` (a two-stage model; else None) that already holds the
        default answers of the ``serving.answer_prefill_users`` most recently active users (at most
        ``user_cache_size``), ranked within ``answer_prefill_s`` before ``state`` serves, so a fresh
        worker does not queue on its first requests. A failure only costs the prefill."""
        if state.two_stage is None:
            return None
        s = self.settings.serving
        cache = self.new_answer_cache(state)
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

            done = prefill.prefill(cache, users, self.online.fetch, rank,
                                   min(s.default_k, state.n_items), s.answer_prefill_s, batch=s.max_batch_size,
                                   stop=lambda: self._stopping, engagement=state.two_stage.reads_engagement)
        except Exception as exc:  # noqa: BLE001 - the model serves without a prefill
            log.warning("answer prefill failed, serving without it: %s: %s", type(exc).__name__,
                        redact(str(exc)[:200], self.settings))
            return cache
        log.info("answer prefill of model %s: %d of %d users ranked in %.1f s%s", state.version, done.answered,
                 done.users, done.seconds, f" (stopped: {done.stopped})" if done.stopped else "")
        return cache

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

    async def reload(self, model_tag: str | None = None, only_if_changed: bool = False) -> ReloadResponse | None:
        """Load the champion (or the registry's ``model_tag``), build its index, then swap it in atomically.

        ``only_if_changed`` (the champion poll): once the reload lock is held, load only if the champion
        pointer or the item side still differ from what is served, and return None otherwise. A ``/reload``
        that ran while the poll waited for the lock has already loaded it; without the check, the daily
        refresh's ``/reload`` cost a worker two loads."""
        assert self._reload_lock is not None
        self.require_state()  # before the first load there is nothing to swap: the load loop is on it
        settings = self.settings
        if model_tag:
            await self._run(self._tag_folder, model_tag)  # a clean 404 for an unknown tag
            settings = settings_for(settings, model_tag)
        async with self._reload_lock:
            if only_if_changed and await self._run(self.champion_changed) is None:
                return None
            previous = self.state.version if self.state else None
            started = time.perf_counter()
            try:
                if self.online.store is not None:
                    await self._run(self.online.refresh)
                    self.registry_epoch += 1  # the push executor refreshes its registry and feature views
                state = await self._run(load_state, settings, self.online.store)
                await self._run(self.warm_up, state)
                answers = await self._run(self.prefill_answers, state)
            except ModelNotFound as exc:
                metrics()["reloads"].labels("not_found").inc()
                raise NotFound(f"{exc}; still serving {previous}", field="model_tag" if model_tag else None) from exc
            self.state = state
            self._note_fallback(state)
            note_model(state.version, previous)
            self.query_cache = None  # queries of the old model, or of rows read with the old registry
            self.answer_cache = answers
            await self._run(freeze_heap)
            metrics()["reloads"].labels("ok").inc()
            log.info("reloaded: %s -> %s", previous, state.version)
            seconds = round(time.perf_counter() - started, 3)
        # the canary follows in the background: /reload answers once the champion is swapped in (loading a
        # canary too took a reload past the service's 30 s request timeout in the demo)
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(self.follow_canary(), name="recflow-canary"))
        return ReloadResponse(model_version=state.version, previous_version=previous, items=state.n_items,
                              seconds=seconds)
