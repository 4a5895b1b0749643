"""Feast feature services: what training reads offline and what serving reads online."""

from feast import FeatureService
from features import item_catalog, item_popularity, user_activity, user_history, user_profile

from recflow.settings import active_settings

_feast = active_settings().feast

training = FeatureService(
    name=_feast.training_service,
    features=[user_activity, user_history, user_profile, item_popularity],
    description="Point-in-time features for (user_id, item_id, event_timestamp) training rows.",
)

serving = FeatureService(
    name=_feast.serving_service,
    features=[user_activity, user_history, user_profile],
    description="Online user features read by the /recommend endpoint for one user_id.",
)

item_index = FeatureService(
    name="item_index_v1",
    features=[item_catalog, item_popularity],
    description="Item attributes and popularity used to build the serving item index.",
)
