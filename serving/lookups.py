"""``/similar`` and ``/search``: item-to-item neighbours in the item tower's space, and semantic
search over item texts (personalised by the user's model score when a user is given)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from recflow.schemas import request_log_row
from recflow.settings import Settings
from serving import ranking
from serving.api import Item, SearchRequest, SearchResponse, SimilarRequest, SimilarResponse
from serving.errors import NotFound
from serving.metrics import metrics
from serving.model_holder import ModelHolder
from serving.recommend import RecommendHandler, items
from serving.request_log import RequestIds
from serving.store_client import StoreClient


@dataclass
class Lookups:
    """The /similar and /search paths of one worker; ranking runs on the compute thread."""

    settings: Settings
    models: ModelHolder
    online: StoreClient
    recommend: RecommendHandler  # its user-tower query cache personalises /search
    record: Callable[[dict[str, Any]], None]
    pseudonym: Callable[[str], str]
    request_ids: RequestIds
    compute: Executor | None = None

    def start(self, compute: Executor) -> None:
        """Rank on ``compute``, the thread /recommend's batches run on."""
        self.compute = compute

    async def _run(self, executor: Executor | None, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def similar(self, req: SimilarRequest) -> SimilarResponse:
        """Items closest to ``item_id`` in the item tower's space."""
        state = self.models.require_state()
        started = time.perf_counter()
        pos = state.index.position.get(req.item_id)
        if pos is None:
            raise NotFound(f"item_id {req.item_id!r} is not in the catalogue", field="item_id")
        k = min(req.k or self.settings.serving.default_k, state.n_items - 1)
        picks = await self._run(self.compute, ranking.similar, state, pos, k)
        resp = SimilarResponse.model_construct(request_id=self.request_ids.next(), item_id=req.item_id,
                                               items=items(state, picks), model_version=state.version)
        metrics()["responses"].labels("similar", "model").inc()
        self._log("similar", resp.request_id, None, req.item_id, k, state.version, False, started, "{}", resp.items)
        return resp

    async def search(self, req: SearchRequest) -> SearchResponse:
        """Semantic search over item texts; personalised by the user's model score when given."""
        state = self.models.require_state()
        started = time.perf_counter()
        k = min(req.k or self.settings.serving.default_k, state.n_items)
        query, degraded = None, False
        if req.user_id is not None:
            feats = await self._run(None, self.online.fetch, [req.user_id])
            degraded = feats is None
            if feats and feats.get(req.user_id):
                q = (await self._run(self.compute, self.recommend.user_queries, state, [req.user_id],
                                     [feats[req.user_id]]))[0]
                query = q if q.n_history > 0 else None
        picks = await self._run(self.compute, ranking.search, state, req.query, k, query,
                                self.settings.serving.search_personalisation)
        resp = SearchResponse.model_construct(request_id=self.request_ids.next(), items=items(state, picks),
                                              model_version=state.version, personalised=query is not None,
                                              degraded=degraded)
        metrics()["responses"].labels("search", "degraded" if degraded else "model").inc()
        words = len(req.query.split())
        self._log("search", resp.request_id, req.user_id, None, k, state.version, degraded, started,
                  f'{{"query_chars":{len(req.query)},"query_words":{words}}}', resp.items)
        return resp

    def _log(self, endpoint: str, request_id: str, user_id: str | None, item_id: str | None, k: int, version: str,
             degraded: bool, started: float, features: str, picked: list[Item]) -> None:
        self.record(request_log_row(
            request_id=request_id, ts=datetime.now(UTC), endpoint=endpoint,
            user_id=self.pseudonym(user_id) if user_id is not None else None, item_id=item_id, k=k,
            model_version=version, fallback=False, degraded=degraded, feature_age_s=None,
            latency_ms=(time.perf_counter() - started) * 1e3, features=features,
            item_ids=[i.item_id for i in picked], scores=[i.score for i in picked],
        ))
