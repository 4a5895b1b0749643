"""The serving runtime: everything the HTTP layer calls, independent of BentoML.

:class:`Runtime` is the lifecycle of one worker: it starts and stops the parts below, holds the
tokens and the request-log writer, answers ``/status``, and routes each endpoint to its part:

- :class:`~serving.store_client.StoreClient`: online-store reads (timeouts, circuit breaker);
- :class:`~serving.model_holder.ModelHolder`: the loaded model (load, ``/reload``, champion
  polling, warm-up, answer-cache prefill);
- :class:`~serving.recommend.RecommendHandler`: ``/recommend`` (micro-batched on the compute thread);
- :class:`~serving.lookups.Lookups`: ``/similar`` and ``/search``;
- :class:`~serving.feedback_intake.FeedbackHandler`: ``/feedback`` and ``/feedback/batch``
  (durable appends, online pushes).

Threads: one compute thread (ranking, one batch at a time: torch and numpy release the GIL), the
store client's read pool, the feedback journal thread and push executor, and one loader thread.
Errors are :class:`~serving.errors.ServiceError` subclasses carrying an HTTP status and the
offending field.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from recflow.security import redact
from recflow.settings import Settings
from serving.api import (
    FeedbackBatchResponse,
    FeedbackRequest,
    FeedbackResponse,
    RecommendRequest,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
    SimilarRequest,
    SimilarResponse,
    Status,
)
from serving.errors import ServiceError, Unauthorized
from serving.feedback_intake import FeedbackHandler
from serving.lookups import Lookups
from serving.model_holder import ModelHolder
from serving.recommend import RecommendHandler
from serving.request_log import RequestIds, RequestLogWriter
from serving.store_client import StoreClient

__all__ = ["Runtime", "ServiceError", "Unauthorized"]
log = logging.getLogger("recflow.serving")


@dataclass
class Runtime:
    """Serving runtime of one worker (see the module docstring). Call :meth:`start` inside the event loop."""

    settings: Settings
    online: StoreClient = field(init=False)
    models: ModelHolder = field(init=False)
    recommender: RecommendHandler = field(init=False)
    lookups: Lookups = field(init=False)
    feedback_path: FeedbackHandler = field(init=False)
    request_log: RequestLogWriter | None = None
    write_token: str | None = None
    read_token: str | None = None
    _pseudonym_key: bytes | None = None
    _compute: Executor | None = None

    def __post_init__(self) -> None:
        ids = RequestIds()
        self.online = StoreClient(self.settings)
        self.models = ModelHolder(self.settings, self.online)
        self.recommender = RecommendHandler(self.settings, self.models, self.online, self._record, self.pseudonym, ids)
        self.lookups = Lookups(self.settings, self.models, self.online, self.recommender, self._record,
                               self.pseudonym, ids)
        self.feedback_path = FeedbackHandler(self.settings, self.models)

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Model and feature store loaded."""
        return self.models.ready

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
        self.online.start()
        self.feedback_path.start()
        self.request_log = RequestLogWriter(
            self.settings.paths.request_log, flush_s=s.request_log_flush_s, rotate_s=s.request_log_rotate_s,
            max_rows=s.request_log_max_rows, max_bytes=s.request_log_max_bytes,
        )
        self.request_log.start()
        self.recommender.start(self._compute)
        self.lookups.start(self._compute)
        self.models.start()

    async def wait_first_load(self, timeout_s: float, stop: asyncio.Event | None = None) -> bool:
        """See :meth:`ModelHolder.wait_first_load`."""
        return await self.models.wait_first_load(timeout_s, stop)

    async def stop(self) -> None:
        """Stop loops and threads; write the request log out."""
        await self.models.stop()
        await self.feedback_path.stop()
        await self.recommender.stop()
        if self._compute is not None:
            self._compute.shutdown(wait=False, cancel_futures=True)
        self.online.stop()
        if self.request_log is not None:
            self.request_log.close()

    def _record(self, row: dict[str, Any]) -> None:
        if self.request_log is not None:
            self.request_log.log(row)

    # --- auth and privacy --------------------------------------------------------------------
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

    # --- endpoints ---------------------------------------------------------------------------
    async def recommend(self, req: RecommendRequest) -> bytes:
        """See :meth:`RecommendHandler.recommend`."""
        return await self.recommender.recommend(req)

    async def similar(self, req: SimilarRequest) -> SimilarResponse:
        """See :meth:`Lookups.similar`."""
        return await self.lookups.similar(req)

    async def search(self, req: SearchRequest) -> SearchResponse:
        """See :meth:`Lookups.search`."""
        return await self.lookups.search(req)

    async def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        """See :meth:`FeedbackHandler.feedback`."""
        return await self.feedback_path.feedback(req)

    async def feedback_batch(self, reqs: list[FeedbackRequest]) -> FeedbackBatchResponse:
        """See :meth:`FeedbackHandler.feedback_batch`."""
        return await self.feedback_path.feedback_batch(reqs)

    async def reload(self, model_tag: str | None = None) -> ReloadResponse:
        """See :meth:`ModelHolder.reload`."""
        answer = await self.models.reload(model_tag)
        assert answer is not None  # only the champion poll's reload may skip
        return answer

    async def status(self) -> Status:
        """What is loaded, and how many feedback events wait to be pushed."""
        state, canary = self.models.state, self.models.canary
        pending = self.feedback_path.pending_feedback  # kept by the push loop: no journal query on a request
        load_error = self.models.load_error
        return Status(
            ready=self.ready, model_version=state.version if state else None,
            model_source=f"{state.source.source}:{state.version}" if state else None,
            items=state.n_items if state else 0,
            index=(state.ann.name if state.ann else state.scorer.name) if state else self.settings.serving.index,
            loaded_at=state.loaded_at if state else None,
            load_error=redact(load_error, self.settings) if load_error else None, pending_feedback=pending,
            item_side_as_of=_as_of(state), worker_pid=os.getpid(),
            canary_version=canary.state.version if canary else None, canary_share=canary.share if canary else None,
        )


def _as_of(state: Any) -> str | None:
    """ISO time of the served two-stage model's item side (None without one)."""
    ts = getattr(state, "two_stage", None) if state is not None else None
    if ts is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(int(ts.side.stats.as_of), UTC).isoformat()
