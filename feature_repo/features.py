"""Feast feature views, one per recflow feature table. Field types come from recflow.schemas."""

from datetime import timedelta

import pyarrow as pa
from data_sources import (
    item_catalog_source,
    item_popularity_source,
    user_activity_push,
    user_history_push,
    user_profile_source,
)
from entities import item, user
from feast import FeatureView, Field
from feast.types import Array, FeastType, Float64, Int64, String

from recflow.schemas import FEATURE_TABLES
from recflow.settings import active_settings

_feast = active_settings().feast
_TYPES: dict[pa.DataType, FeastType] = {
    pa.int64(): Int64,
    pa.float64(): Float64,
    pa.string(): String,
    pa.list_(pa.string()): Array(String),
    pa.list_(pa.int64()): Array(Int64),
}
NO_EXPIRY = timedelta(0)  # Feast: a ttl of 0 means the value never expires


def _fields(table: str) -> list[Field]:
    return [Field(name=name, dtype=_TYPES[dtype]) for name, dtype in FEATURE_TABLES[table][1].items()]


user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=timedelta(days=_feast.user_ttl_days),
    schema=_fields("user_activity"),
    source=user_activity_push,
    online=True,
    description="Purchases, spend, distinct items/categories over 7/30/90 days; recency; basket size.",
)

user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(days=_feast.user_ttl_days),
    schema=_fields("user_history"),
    source=user_history_push,
    online=True,
    description="The user's most recent item ids (most recent first) and their epoch-second timestamps.",
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=NO_EXPIRY,
    schema=_fields("user_profile"),
    source=user_profile_source,
    online=True,
    description="Profile bands (Complete Journey: household demographics); null when unknown.",
)

item_popularity = FeatureView(
    name="item_popularity",
    entities=[item],
    ttl=timedelta(days=_feast.item_ttl_days),
    schema=_fields("item_popularity"),
    source=item_popularity_source,
    online=True,
    description="Purchases over 7/30 days, distinct buyers over 30 days, interactions, 7-vs-30-day trend.",
)

item_catalog = FeatureView(
    name="item_catalog",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=_fields("item_catalog"),
    source=item_catalog_source,
    online=True,
    description="Catalogue attributes and the text the item tower encodes.",
)
