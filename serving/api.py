"""Request and response models of the recommendation service (the HTTP contract).

Unknown fields are rejected (``extra="forbid"``), so a misspelt field is a 400 that names it
rather than a silently ignored option. Ids are strings of 1..128 characters.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from recflow.timeutil import as_utc

MAX_K = 100
MAX_FUTURE_S = 3600.0


def _aware(value: datetime | None) -> datetime | None:
    """Naive timestamps are UTC; more than an hour in the future is refused."""
    if value is None:
        return None
    value = as_utc(value)
    if (value - datetime.now(UTC)).total_seconds() > MAX_FUTURE_S:
        raise ValueError("must not be more than one hour in the future")
    if value.year < 1970:
        raise ValueError("must be after 1970-01-01")
    return value


def _utc(value: datetime | None) -> datetime | None:
    """Naive timestamps are UTC (the service checks feedback timestamps against its window: 422)."""
    return None if value is None else as_utc(value)


Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
K = Annotated[int, Field(ge=1, le=MAX_K, description="How many items (1..100; capped at the catalogue size).")]
Timestamp = Annotated[datetime | None, AfterValidator(_aware)]
EventTimestamp = Annotated[datetime | None, AfterValidator(_utc)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    """``POST /recommend``."""

    user_id: Id
    k: K | None = Field(default=None, description="Default: serving.default_k.")
    exclude_purchased: bool = Field(default=False, description=(
        "Leave out items the user bought (with a two-tower model, which has no ranker, every item of the user's "
        "interaction history: views and carts too)."))
    category: str | None = Field(
        default=None, min_length=1, max_length=200, description="Only items of this category or department."
    )
    timestamp: Timestamp = Field(
        default=None, description="Time of the request (replays); default now. Logged as the request time."
    )


class SimilarRequest(_Strict):
    """``POST /similar``."""

    item_id: Id
    k: K | None = None


class SearchRequest(_Strict):
    """``POST /search``: semantic search over item texts, personalised when ``user_id`` is given."""

    query: str = Field(min_length=1, max_length=500)
    k: K | None = None
    user_id: Id | None = None


class FeedbackRequest(_Strict):
    """``POST /feedback``: one user action, appended durably to the event log and pushed online."""

    user_id: Id
    item_id: Id
    event_type: Literal["view", "cart", "purchase"]
    quantity: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    price: float | None = Field(default=None, ge=0, le=1e9, allow_inf_nan=False)
    timestamp: EventTimestamp = Field(
        default=None, description="When it happened; default now. Outside feedback.max_age_days / max_future_s: 422."
    )
    event_id: Id | None = Field(
        default=None,
        description="Idempotency key: the same event_id with the same payload is recorded once, with another payload "
        "it is a 409. Unset: derived from user_id, item_id, timestamp, event_type, basket_id (the timestamp is then "
        "required, 422 without it).",
    )
    basket_id: Id | None = None


MAX_FEEDBACK_BATCH = 200  # about 50 KB of JSON, inside the 64 KB body limit


class FeedbackBatchRequest(_Strict):
    """``POST /feedback/batch``: several actions at once (a basket at checkout); all are recorded or none."""

    events: list[FeedbackRequest] = Field(min_length=1, max_length=MAX_FEEDBACK_BATCH)


ModelTag = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_.-]+)?$")]


class ReloadRequest(_Strict):
    """``POST /reload``: load the current champion (or a registry tag) and swap it in when ready.

    Only registry tags (``name:version``, as ``recflow models`` lists them) are accepted, never a
    file-system path: a ``model_path`` field is a 400."""

    model_tag: ModelTag | None = Field(default=None, description="Serve this registered model (e.g. 'recflow_two_tower:abc123') instead of the champion.")


class Reason(BaseModel):
    """Why an item was picked."""

    kind: Literal["repeat", "similar", "popular", "text", "viewed"]
    item_id: str | None = Field(description="The history item that most supports the pick (None for popular/text).")
    text: str | None = Field(default=None, description="Why, as a sentence (e.g. 'you buy this about every 8 days').")


class Item(BaseModel):
    item_id: str
    score: float
    title: str | None
    category: str | None
    reason: Reason


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    items: list[Item]
    model_version: str
    feature_age_s: float | None = Field(description="Age of the user's online features (None: none found).")
    fallback: bool = Field(description="Popularity instead of the model (unknown user, empty history, store down).")
    degraded: bool = Field(description="The online store failed; the answer does not use the user's features.")


class SimilarResponse(BaseModel):
    request_id: str
    item_id: str
    items: list[Item]
    model_version: str


class SearchResponse(BaseModel):
    request_id: str
    items: list[Item]
    model_version: str
    personalised: bool
    degraded: bool


class FeedbackResponse(BaseModel):
    event_id: str
    accepted: bool = Field(description="Durably in the event log (also true for a repeated event_id).")
    duplicate: bool
    pushed: bool = Field(description="Already visible online; when false it is retried from the event log.")


class FeedbackBatchResponse(BaseModel):
    event_ids: list[str]
    accepted: int = Field(description="Events durably in the event log (repeated event_ids included).")
    duplicates: int = Field(description="Events whose event_id was already logged (not counted twice).")
    pushed: bool = Field(description="All visible online; when false they are retried from the event log.")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    items: int
    seconds: float


class Status(BaseModel):
    """``GET``-like ``POST /status``: what is loaded and how the service is doing."""

    ready: bool
    model_version: str | None
    model_source: str | None
    items: int
    index: str
    loaded_at: str | None
    load_error: str | None
    pending_feedback: int | None
    item_side_as_of: str | None = None  # the two-stage item side's as-of time (a daily refresh moves it on)
    worker_pid: int  # which worker process answered (with serving.workers > 1, each has its own model)
    canary_version: str | None = None  # the canary model answering a share of /recommend users (recflow.canary)
    canary_share: float | None = None
