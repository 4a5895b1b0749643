"""The canary a worker serves beside the champion (``recflow.canary`` holds the pointer and the user split).

A worker that serves the registry's champion follows ``<models>/canary.json`` at every champion poll, at
its first load and after ``/reload``: it loads the named model next to the champion (warmed up, no answer
prefill), answers the users that :func:`recflow.canary.serves_canary` assigns to it with that model, and
drops it when the pointer goes (promoted or rolled back). ``/recommend`` is the only endpoint split:
``/similar`` and ``/search`` stay with the champion. A canary that cannot be loaded is logged once per
tag and the champion answers every user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recflow import canary as pointer_io
from recflow.settings import Settings

if TYPE_CHECKING:
    from serving import ranking, tower
    from serving.serving_state import ServingState


@dataclass
class CanaryModel:
    """The loaded canary of one worker, with its own caches (``answer_cache``, ``query_cache``, like
    :class:`serving.model_holder.ModelHolder`'s for the champion)."""

    state: ServingState
    share: float
    salt: str
    answer_cache: ranking.AnswerCache | None = None
    query_cache: tower.UserQueryCache | None = None

    def serves(self, user_id: str) -> bool:
        """Whether this canary answers ``user_id``."""
        return pointer_io.serves_canary(user_id, self.salt, self.share)


def wanted(settings: Settings, champion: ServingState) -> dict[str, Any] | None:
    """The canary pointer that applies to a worker serving ``champion``: None when the worker does not
    serve the registry's champion (a pinned ``model_path``, ``model_tag`` or bento), when no canary runs,
    or when the pointer names the model already served as champion (a promotion half done)."""
    if champion.source.source != "champion":
        return None
    found = pointer_io.get(settings)
    if found is None or found.get("tag") == champion.version or not found.get("share"):
        return None
    return found


def settings_for(settings: Settings, tag: str) -> Settings:
    """``settings`` that load the registry model ``tag`` (what ``/reload`` with a tag does)."""
    serving = settings.serving.model_copy(update={"model_tag": tag, "model_path": None})
    return settings.model_copy(update={"serving": serving})
