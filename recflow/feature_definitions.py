"""recflow's Feast definitions, built from settings: entities, sources, feature views and services.

:func:`build_definitions` is the one place they are defined. recflow applies them with
``recflow.feature_store.apply``; ``feature_repo/definitions.py`` exposes the same objects to the
plain Feast CLI (``feast -c feature_repo plan``). Field types come from ``recflow.schemas``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from recflow.schemas import FEATURE_TABLES
from recflow.settings import Settings

if TYPE_CHECKING:
    from feast import Entity, FeatureService, FeatureView, FileSource, PushSource

NO_EXPIRY = timedelta(0)  # Feast: a ttl of 0 means the value never expires
ITEM_INDEX_SERVICE = "item_index_v1"


@dataclass(frozen=True)
class FeatureDefinitions:
    """Every Feast object of recflow's feature repo, by name."""

    user: Entity
    item: Entity
    user_activity_source: FileSource
    user_history_source: FileSource
    user_profile_source: FileSource
    item_popularity_source: FileSource
    item_catalog_source: FileSource
    user_activity_push: PushSource
    user_history_push: PushSource
    user_activity: FeatureView
    user_history: FeatureView
    user_profile: FeatureView
    item_popularity: FeatureView
    item_catalog: FeatureView
    training: FeatureService
    serving: FeatureService
    item_index: FeatureService

    def objects(self) -> list[Any]:
        """All of them, entities first (the order ``FeatureStore.apply`` takes)."""
        return [getattr(self, f.name) for f in fields(self)]


def build_definitions(settings: Settings) -> FeatureDefinitions:
    """The Feast objects for ``settings``: sources under ``settings.paths``, ttls and service names
    from ``settings.feast``."""
    import pyarrow as pa
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
    from feast.types import Array, FeastType, Float64, Int64, String

    types: dict[pa.DataType, FeastType] = {
        pa.int64(): Int64, pa.float64(): Float64, pa.string(): String,
        pa.list_(pa.string()): Array(String), pa.list_(pa.int64()): Array(Int64),
    }
    feast = settings.feast

    def schema(table: str) -> list[Field]:
        return [Field(name=name, dtype=types[dtype]) for name, dtype in FEATURE_TABLES[table][1].items()]

    def file_source(name: str) -> FileSource:
        return FileSource(
            name=f"{name}_source", path=str(settings.paths.feature_table(name)), timestamp_field="event_timestamp",
            created_timestamp_column="created_timestamp",
            description=f"recflow feature table '{name}' (built by `recflow features`).",
        )

    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
                  description="A shopper (Complete Journey: a household).")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
                  description="A catalogue item (Complete Journey: a product).")
    sources = {name: file_source(name) for name in
               ("user_activity", "user_history", "user_profile", "item_popularity", "item_catalog")}
    # the push sources let the serving layer write fresh user rows online the moment feedback arrives
    activity_push = PushSource(name="user_activity_push", batch_source=sources["user_activity"])
    history_push = PushSource(name="user_history_push", batch_source=sources["user_history"])
    user_ttl, item_ttl = timedelta(days=feast.user_ttl_days), timedelta(days=feast.item_ttl_days)

    def view(name: str, entity: Entity, ttl: timedelta, source: Any, description: str) -> FeatureView:
        return FeatureView(name=name, entities=[entity], ttl=ttl, schema=schema(name), source=source, online=True,
                           description=description)

    activity = view("user_activity", user, user_ttl, activity_push,
                    "Purchases, spend, distinct items/categories over 7/30/90 days; recency; basket size.")
    history = view("user_history", user, user_ttl, history_push,
                   "The user's most recent interactions (most recent first): item ids, epoch-second timestamps, event types.")
    profile = view("user_profile", user, NO_EXPIRY, sources["user_profile"],
                   "Profile bands (Complete Journey: household demographics); null when unknown.")
    popularity = view("item_popularity", item, item_ttl, sources["item_popularity"],
                      "Purchases over 7/30 days, distinct buyers over 30 days, interactions, 7-vs-30-day trend.")
    catalog = view("item_catalog", item, NO_EXPIRY, sources["item_catalog"],
                   "Catalogue attributes and the text the item tower encodes.")
    return FeatureDefinitions(
        user=user, item=item,
        user_activity_source=sources["user_activity"], user_history_source=sources["user_history"],
        user_profile_source=sources["user_profile"], item_popularity_source=sources["item_popularity"],
        item_catalog_source=sources["item_catalog"], user_activity_push=activity_push, user_history_push=history_push,
        user_activity=activity, user_history=history, user_profile=profile, item_popularity=popularity,
        item_catalog=catalog,
        training=FeatureService(name=feast.training_service, features=[activity, history, profile, popularity],
                                description="Point-in-time features for (user_id, item_id, event_timestamp) training rows."),
        serving=FeatureService(name=feast.serving_service, features=[activity, history, profile],
                               description="Online user features read by the /recommend endpoint for one user_id."),
        item_index=FeatureService(name=ITEM_INDEX_SERVICE, features=[catalog, popularity],
                                  description="Item attributes and popularity used to build the serving item index."),
    )
