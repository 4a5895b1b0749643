"""The recflow BentoML service: ``bentoml serve serving.service:Recommender``.

Endpoints (JSON over POST; contracts in :mod:`serving.api`):

- ``/recommend {user_id, k?, exclude_purchased?, category?, timestamp?}`` -> items with score,
  title, category and reason (the history item behind the pick), ``model_version``,
  ``feature_age_s``, ``fallback``, ``degraded``;
- ``/similar {item_id, k?}``, ``/search {query, k?, user_id?}``;
- ``/feedback {user_id, item_id, event_type, quantity?, price?, timestamp?, event_id?, basket_id?}``
- ``/feedback/batch {events: [feedback, ...]}`` (up to 200, e.g. a basket at checkout; all or none)
  (bearer write token, always): durable in the event log, then pushed online;
- ``/reload {model_tag?}`` (write token): load the champion (or a registry tag, never a path) and
  swap it in without downtime;
- ``/status``; ``GET /livez`` (process up), ``GET /readyz`` (model and store loaded),
  ``GET /metrics`` (Prometheus).

Auth: the write token is ``serving.token`` or the home's generated ``secrets/serving_token``;
``serving.read_token``, when set, protects ``/recommend``, ``/similar`` and ``/search`` (the write
token works there too); ``serving.auth_disabled`` opens everything, on a loopback host only.

Errors: 400 validation (naming the field), 401 token, 404 unknown item/category/model,
409 an event_id reused with another payload (naming it), 413/415 body size/type, 422 a feedback
timestamp outside the ``feedback`` window or neither event_id nor timestamp (naming the field),
503 not ready; error texts never carry a server path. Settings come from ``recflow.settings.load_settings()``
(``RECFLOW_*`` environment, ``recflow.toml``). Nothing is loaded at import time: the model loads
at start-up, and a worker accepts connections only once its first load attempt ended; when that
failed (no champion yet) it is live and ``/readyz`` answers 503 until a later attempt succeeds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from recflow.security import redact
from serving.api import (
    FeedbackBatchRequest,
    FeedbackBatchResponse,
    FeedbackRequest,
    FeedbackResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
    SimilarRequest,
    SimilarResponse,
    Status,
)
from serving.middleware import RequestGuard
from serving.runtime import Runtime, ServiceError, Unauthorized

log = logging.getLogger("recflow.serving")
HOT_PATHS = ("/recommend", "/feedback/batch")


def _error(exc: ServiceError, ctx: bentoml.Context) -> JSONResponse:
    """The JSON error answer (BentoML applies ``ctx.response``'s status to whatever is returned)."""
    body: dict[str, Any] = {"error": redact(exc.message)}  # never a server path
    if exc.field:
        body["fields"] = [exc.field]
    ctx.response.status_code = exc.status
    if exc.status == 401:
        ctx.response.metadata["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=exc.status)


class _QuietValidationErrors(logging.Filter):
    """BentoML logs a traceback for every 400 validation error; keep those out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ != "ValidationError"


def _log_setup() -> None:
    """recflow's INFO lines go where BentoML's go; validation tracebacks are dropped."""
    quiet = _QuietValidationErrors()
    for name in ("bentoml._internal.server.http_app", "_bentoml_impl.server.app"):
        logging.getLogger(name).addFilter(quiet)
    ours = logging.getLogger("recflow")
    if not ours.handlers:
        for handler in logging.getLogger("bentoml").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


class ServiceArgs(BaseModel):
    """The service's BentoML arguments (``bentoml serve ... --arg settings_file=PATH``)."""

    settings_file: str | None = None


@bentoml.service(
    name="recflow",
    workers=1,
    traffic={"timeout": 30, "max_concurrency": 1024},
    metrics={"enabled": True},
    # The hot paths skip BentoML's per-request OpenTelemetry span and HTTP metrics (together about
    # 1 ms of CPU per request, more than ranking it in a batch); /recommend and /feedback/batch have
    # their own latency histogram and response counters. Every other endpoint keeps both.
    logging={"access": {"enabled": False, "skip_paths": list(HOT_PATHS)}},
    tracing={"excluded_urls": list(HOT_PATHS)},
    endpoints={"livez": "/livez", "readyz": "/readyz"},
)
class Recommender:
    """Personalised recommendations from online Feast features and the champion two-tower model."""

    def __init__(self) -> None:
        from recflow.settings import load_settings, load_snapshot

        # `recflow serve` names the settings it resolved (`--arg settings_file=...`, a 0600 file); a bento
        # served on its own reads the environment and the TOML file
        args = bentoml.use_arguments(ServiceArgs)
        self.runtime = Runtime(load_snapshot(Path(args.settings_file)) if args.settings_file else load_settings())

    @bentoml.on_startup
    async def _start(self) -> None:
        """Start the runtime and wait for its first model load (``serving.startup_wait_s``): uvicorn
        opens the worker's listening socket only after start-up, so the worker takes no traffic
        before it is ready (a worker with no model to load goes live unready: 503 and /status say why).
        A SIGTERM or SIGINT meanwhile ends the wait (``serving.aio.stop_signals``): uvicorn acts on
        it only after start-up, which would otherwise hold a loading worker's stop until it is ready."""
        from serving.aio import stop_signals

        _log_setup()
        await self.runtime.start()
        with stop_signals() as stop:
            await self.runtime.wait_first_load(self.runtime.settings.serving.startup_wait_s, stop)

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        await self.runtime.stop()

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    def _authorise(self, ctx: bentoml.Context, *, write: bool = True) -> None:
        """401 unless the bearer token may call this endpoint (write: the write token; read: the read
        token or the write token, when a read token is set)."""
        if not self.runtime.authorised(ctx.request.headers.get("authorization", ""), write=write):
            which = "serving.token (or <home>/secrets/serving_token)" if write else "serving.read_token"
            raise Unauthorized(f"missing or wrong bearer token: send 'Authorization: Bearer <{which}>'",
                               field="Authorization")

    @bentoml.api(route="/recommend", input_spec=RecommendRequest)
    async def recommend(self, ctx: bentoml.Context, **request: Any) -> RecommendResponse:
        """Top-k items for a user (popularity with ``fallback: true`` for unknown users)."""
        try:
            self._authorise(ctx, write=False)
            body = await self.runtime.recommend(RecommendRequest.model_construct(**request))
        except ServiceError as exc:
            return _error(exc, ctx)  # type: ignore[return-value]
        # already JSON (built in the ranking batch): skip a second pydantic serialisation
        return Response(body, media_type="application/json")  # type: ignore[return-value]

    @bentoml.api(route="/similar", input_spec=SimilarRequest)
    async def similar(self, ctx: bentoml.Context, **request: Any) -> SimilarResponse:
        """Items most similar to ``item_id`` (404 when the item is unknown)."""
        try:
            self._authorise(ctx, write=False)
            return await self.runtime.similar(SimilarRequest.model_construct(**request))
        except ServiceError as exc:
            return _error(exc, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/search", input_spec=SearchRequest)
    async def search(self, ctx: bentoml.Context, **request: Any) -> SearchResponse:
        """Semantic search over item texts, personalised when ``user_id`` is given."""
        try:
            self._authorise(ctx, write=False)
            return await self.runtime.search(SearchRequest.model_construct(**request))
        except ServiceError as exc:
            return _error(exc, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest)
    async def feedback(self, ctx: bentoml.Context, **request: Any) -> FeedbackResponse:
        """Record a user action (durable before the answer) and update the user's online features."""
        try:
            self._authorise(ctx)
            return await self.runtime.feedback(FeedbackRequest.model_construct(**request))
        except ServiceError as exc:
            return _error(exc, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/feedback/batch", input_spec=FeedbackBatchRequest)
    async def feedback_batch(self, ctx: bentoml.Context, **request: Any) -> FeedbackBatchResponse:
        """Record up to 200 actions at once (a basket at checkout): durable together, then pushed online."""
        try:
            self._authorise(ctx)
            events = [e if isinstance(e, FeedbackRequest) else FeedbackRequest.model_validate(e)
                      for e in request["events"]]
            return await self.runtime.feedback_batch(events)
        except ServiceError as exc:
            return _error(exc, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/reload", input_spec=ReloadRequest)
    async def reload(self, ctx: bentoml.Context, **request: Any) -> ReloadResponse:
        """Load the current champion (or the registry's ``model_tag``), then swap it in without downtime."""
        try:
            self._authorise(ctx)
            return await self.runtime.reload(request.get("model_tag"))
        except ServiceError as exc:
            return _error(exc, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/status")
    async def status(self) -> Status:
        """Loaded model, index, readiness and pending feedback."""
        return await self.runtime.status()


Recommender.add_asgi_middleware(RequestGuard)
