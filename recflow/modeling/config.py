"""Model configuration: a plain, JSON-serialisable dataclass saved next to the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# user_activity features the user tower reads (Feast names without the view prefix).
ACTIVITY_FEATURES: tuple[str, ...] = (
    "purchases_7d",
    "purchases_30d",
    "purchases_90d",
    "spend_7d",
    "spend_30d",
    "spend_90d",
    "interactions_30d",
    "distinct_items_90d",
    "distinct_categories_90d",
    "avg_basket_size_90d",
    "days_since_last_purchase",
)
PROFILE_FEATURES: tuple[str, ...] = (
    "age",
    "income",
    "home_ownership",
    "marital_status",
    "household_size",
    "household_comp",
    "kids_count",
)
# item_popularity features behind the per-item bias.
POPULARITY_FEATURES: tuple[str, ...] = ("purchases_7d", "purchases_30d", "buyers_30d", "interactions_30d", "trend")


@dataclass
class ModelConfig:
    """Architecture of the two-tower + repeat model. Everything serving needs to rebuild it.

    ``history_length`` caps the history lines read (most recent first) and ``max_history_items`` the
    distinct history items (most recent first) that get a repeat bonus and enter the pooling.
    ``encoder`` is a ``BertConfig.to_dict()``; ``n_ids`` counts id rows including row 0, the
    out-of-vocabulary row that items unseen in training (cold start) use.
    """

    encoder: dict[str, Any]
    n_ids: int
    text_dim: int = 384
    dim: int = 64
    hidden: int = 128
    use_id_embedding: bool = True
    temperature: float = 0.1
    history_length: int = 500
    max_history_items: int = 256
    max_length: int = 32
    half_lives_days: tuple[float, ...] = (7.0, 30.0, 90.0, 365.0)
    activity_features: tuple[str, ...] = ACTIVITY_FEATURES
    profile_features: tuple[str, ...] = PROFILE_FEATURES
    popularity_features: tuple[str, ...] = POPULARITY_FEATURES
    profile_vocab: dict[str, list[str]] = field(default_factory=dict)
    profile_dim: int = 4
    dropout: float = 0.1

    @property
    def n_history_features(self) -> int:
        """Width of the per-(user, history item) feature vector (see ``recflow.modeling.features``)."""
        return 11 + len(self.half_lives_days)

    @property
    def n_user_features(self) -> int:
        """Width of the dense user feature vector: activity + missing flag + 3 history summaries."""
        return len(self.activity_features) + 1 + 3

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}; saved by a newer recflow?")
        kw = dict(d)
        for k in ("half_lives_days", "activity_features", "profile_features", "popularity_features"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)
