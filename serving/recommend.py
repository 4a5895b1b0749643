"""``/recommend``: micro-batched personalised top-k, with popularity when the user is unknown, the
store is down (``degraded``) or one request's own ranking failed.

Requests are queued on a :class:`~serving.batching.MicroBatcher` and ranked a batch at a time on
the compute thread (torch and numpy release the GIL): one online read for the batch's users, then
the two-stage ranker (candidates + LightGBM, behind the answer cache) or the two-tower scorer, and
the JSON body is serialised in the batch, off the event loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from recflow.ranker.log import history_lines
from recflow.schemas import request_log_row
from recflow.security import redact
from recflow.settings import Settings
from serving import ranking, tower
from serving.api import Item, Reason, RecommendRequest
from serving.batching import MicroBatcher
from serving.errors import NotFound, RateLimitedLog, ServiceError
from serving.jsonfast import dumps
from serving.metrics import metrics
from serving.model_holder import ModelHolder
from serving.online_reader import feature_age_s, logged_features
from serving.request_log import RequestIds
from serving.serving_state import ServingState
from serving.store_client import StoreClient

if TYPE_CHECKING:
    from recflow.modeling import UserQuery


@dataclass
class Job:
    """One queued /recommend request."""

    req: RecommendRequest
    request_id: str
    now: datetime


@dataclass
class Answer:
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
    arm: str | None = None  # "champion" or "canary" while a canary runs (recflow.canary)


@dataclass
class StageTimes:
    """One /recommend batch: size and seconds per stage."""

    batch: int
    features: float
    user_tower: float
    topk: float


def _text(value: Any) -> str | None:
    """A catalogue text field as JSON wants it (None for missing or NaN)."""
    return value if isinstance(value, str) else None


def item_dicts(state: ServingState, picks: list[ranking.Pick]) -> list[dict[str, Any]]:
    """Picks as plain dicts (the JSON of ``Item``)."""
    ids, cat = state.index.item_ids, state.catalogue
    return [
        {"item_id": ids[p.position], "score": round(p.score, 6), "title": _text(cat.titles[p.position]),
         "category": _text(cat.categories[p.position]),
         "reason": {"kind": p.kind, "item_id": ids[p.reason] if p.reason is not None else None, "text": p.text}}
        for p in picks
    ]


def items(state: ServingState, picks: list[ranking.Pick]) -> list[Item]:
    """Picks as response ``Item`` models."""
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


@dataclass
class RecommendHandler:
    """The /recommend path of one worker (see the module docstring). ``record`` takes request-log
    rows; ``pseudonym`` turns a user id into what the log may hold."""

    settings: Settings
    models: ModelHolder
    online: StoreClient
    record: Callable[[dict[str, Any]], None]
    pseudonym: Callable[[str], str]
    request_ids: RequestIds
    _batcher: MicroBatcher[Job, Answer] | None = None
    _row_warn: RateLimitedLog = field(default_factory=RateLimitedLog)
    _categories: dict[int, tuple[ServingState, frozenset[str]]] = field(default_factory=dict)

    def start(self, compute: Executor) -> None:
        s = self.settings.serving
        self._batcher = MicroBatcher(self.recommend_batch, compute, max_batch=s.max_batch_size,
                                     wait_s=s.batch_wait_ms / 1000, on_batch=self._on_batch)
        self._batcher.start()

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()

    async def recommend(self, req: RecommendRequest) -> bytes:
        """Personalised top-k (popularity when the user is unknown or the store is down): the JSON
        of a :class:`RecommendResponse`, serialised in the batch (off the event loop)."""
        self.models.require_state()
        assert self._batcher is not None
        started = time.perf_counter()
        now = req.timestamp or datetime.now(UTC)
        request_id = self.request_ids.next()
        answer = await self._batcher.submit(Job(req, request_id, now))
        self.record(request_log_row(
            request_id=request_id, ts=now, user_id=self.pseudonym(req.user_id), k=answer.k,
            model_version=answer.model_version, fallback=answer.fallback, degraded=answer.degraded,
            feature_age_s=answer.feature_age_s, latency_ms=(time.perf_counter() - started) * 1e3,
            features=answer.features_json, item_ids=answer.item_ids, scores=answer.scores, arm=answer.arm,
        ))
        metrics()["latency"].labels("recommend").observe(time.perf_counter() - started)
        return answer.body

    def user_queries(self, state: ServingState, user_ids: list[str], features: list[dict[str, Any]]) -> list[UserQuery]:
        """The user tower's queries, from the cache where the users' rows are unchanged (compute thread only)."""
        canary = self.models.canary
        holder: Any = canary if canary is not None and state is canary.state else self.models
        cache = holder.query_cache
        if cache is None or cache.version != state.version:
            s = self.settings.serving
            cache = holder.query_cache = tower.UserQueryCache(state.version, self.online.stamp_keys,
                                                                   s.user_cache_size, s.user_cache_ttl_s)
        hits, misses = cache.hits, cache.misses
        out = cache.queries(user_ids, features,
                            lambda missed: tower.user_queries(state.model, state.index, state.lookup, missed))
        m = metrics()["user_cache"]
        if cache.hits > hits:
            m.labels("hit").inc(cache.hits - hits)
        if cache.misses > misses:
            m.labels("miss").inc(cache.misses - misses)
        return out

    def _on_batch(self, size: int, seconds: float) -> None:
        metrics()["batch"].observe(size)

    def recommend_batch(self, jobs: list[Job]) -> list[Answer | BaseException]:
        """Rank a batch; when that fails, rank each request on its own, so a bad online row (or any
        per-user failure) costs only its own request, which then gets popularity (``degraded``)."""
        try:
            return self._rank_batch(jobs)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the request that caused it
            if len(jobs) == 1:
                return [self._failed_answer(jobs[0], exc)]
        out: list[Answer | BaseException] = []
        for job in jobs:
            try:
                out.extend(self._rank_batch([job]))
            except ServiceError:
                raise
            except Exception as exc:  # noqa: BLE001 - this request only
                out.append(self._failed_answer(job, exc))
        return out

    def _failed_answer(self, job: Job, exc: BaseException) -> Answer | BaseException:
        """Popularity for a request whose own ranking failed (flagged ``fallback`` and ``degraded``)."""
        state, arm = self._state_for(job)
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
        picked = item_dicts(state, ranking.popular(state, k, rows, None))
        body = dumps({"request_id": job.request_id, "user_id": job.req.user_id, "items": picked,
                      "model_version": state.version, "feature_age_s": None, "fallback": True, "degraded": True})
        return Answer(body, logged_features(None, 0), k, [it["item_id"] for it in picked],
                      [it["score"] for it in picked], state.version, True, True, None, arm)

    def _state_for(self, job: Job) -> tuple[ServingState, str | None]:
        """The model that answers ``job``'s user and its arm: the canary for its share of users while one
        runs (``recflow.canary``), else the champion (arm None when no canary runs)."""
        state = self.models.require_state()
        canary = self.models.canary
        if canary is None:
            return state, None
        return (canary.state, "canary") if canary.serves(job.req.user_id) else (state, "champion")

    def _category_rows(self, state: ServingState, category: str) -> np.ndarray | None:
        """``state.catalogue.category_rows`` behind a set of the catalogue's categories and departments
        (built once per model: the champion's and a canary's), so an unknown category costs a set lookup,
        not a catalogue scan."""
        known = self._categories.get(id(state))
        if known is None or known[0] is not state:
            cat = state.catalogue
            names = np.concatenate([np.char.lower(np.asarray(cat.categories, dtype=str)),
                                    np.char.lower(np.asarray(cat.departments, dtype=str))])
            if len(self._categories) >= 2:
                self._categories.clear()
            known = self._categories[id(state)] = (state, frozenset(names.tolist()))
        if category.strip().casefold() not in known[1]:
            return None
        return state.catalogue.category_rows(category)

    def _rank_batch(self, jobs: list[Job]) -> list[Answer | BaseException]:
        """Rank a batch with the champion, or, while a canary runs, each arm's users with its model."""
        state = self.models.require_state()
        if self.models.canary is None:
            return self._rank_with(state, None, jobs)
        arms = [self._state_for(j) for j in jobs]
        out: list[Answer | BaseException | None] = [None] * len(jobs)
        for arm in ("champion", "canary"):
            picked = [i for i, (_, a) in enumerate(arms) if a == arm]
            if picked:
                ranked = self._rank_with(arms[picked[0]][0], arm, [jobs[i] for i in picked])
                for i, answer in zip(picked, ranked, strict=True):
                    out[i] = answer
        return out  # type: ignore[return-value]

    def _rank_with(self, state: ServingState, arm: str | None, jobs: list[Job]) -> list[Answer | BaseException]:
        """Rank ``jobs`` with ``state`` (the champion's or the canary's model), their answers marked ``arm``."""
        t0 = time.perf_counter()
        users = list(dict.fromkeys(j.req.user_id for j in jobs))
        feats = self.online.fetch(users)
        degraded = feats is None
        t1 = time.perf_counter()
        out: list[Answer | BaseException] = []
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
        queries = (self.user_queries(state, [jobs[i].req.user_id for i in with_feats],
                                      [feats[jobs[i].req.user_id] for i in with_feats])
                   if feats and with_feats and not two_stage else [])
        t2 = time.perf_counter()
        asks: list[Any] = []
        ask_of: dict[int, int] = {}
        history_of: dict[int, int] = {}
        cached: dict[int, tuple[list[ranking.Pick], dict[str, float | None]]] = {}
        served: list[dict[str, float | None]] = []  # the two-stage asks' user-level ranker features
        if two_stage:
            cache = self.models.answer_cache_for(state)
            keys: dict[int, tuple[Any, int]] = {}
            engaged = state.two_stage.reads_engagement  # type: ignore[union-attr]
            for i in with_feats:
                j = jobs[i]
                hist = history_lines(feats[j.req.user_id], engaged)  # type: ignore[index]
                if hist is not None:
                    ids, stamps, kinds = hist
                    types = kinds if engaged else None
                    history_of[i] = len(ids)
                    as_of = int(j.now.timestamp())
                    if j.req.timestamp is None:  # "now": a recent answer for the same history will do
                        key = ranking.answer_key(j.req.user_id, ks[i], j.req.exclude_purchased, j.req.category)
                        fp = cache.fingerprint(ids, stamps, kinds)
                        hit = cache.get(key, fp, as_of)
                        if hit is not None:
                            cached[i] = hit
                            continue
                        keys[len(asks)] = (key, fp)
                    ask_of[i] = len(asks)
                    asks.append(ranking.HistoryAsk(ids, stamps, as_of, ks[i], j.req.exclude_purchased, rows[i], j.req.user_id,
                                                   types))
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
            picked = item_dicts(state, picks)
            body = dumps({
                "request_id": j.request_id, "user_id": j.req.user_id, "items": picked, "model_version": state.version,
                "feature_age_s": age, "fallback": fallback, "degraded": degraded,
            })
            logged = logged_features(f, n_history, profile=self.settings.privacy.log_profile, model_features=model_feats)
            out[i] = Answer(body, logged, ks[i],
                             [it["item_id"] for it in picked], [it["score"] for it in picked], state.version,
                             fallback, degraded, age, arm)
        t4 = time.perf_counter()
        times = StageTimes(len(jobs), t1 - t0, t2 - t1, (t3 - t2) + (t4 - t3))
        m = metrics()["stage"]
        m.labels("features").observe(times.features)
        m.labels("user_tower").observe(times.user_tower)
        m.labels("topk").observe(times.topk)
        kinds = Counter("degraded" if a.degraded else "fallback" if a.fallback else "model"
                        for a in out if isinstance(a, Answer))
        for kind, n in kinds.items():
            metrics()["responses"].labels("recommend", kind).inc(n)
        return out

