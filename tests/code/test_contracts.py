"""The model's feature names are a lean copy (``recflow.modeling`` imports without pyarrow); they
must stay the names the feature tables and Feast views carry, or the towers silently read nothing."""

from __future__ import annotations

from recflow import schemas
from recflow.modeling import config


def test_model_profile_features_are_the_profile_columns() -> None:
    assert config.PROFILE_FEATURES == schemas.USER_PROFILE_COLUMNS


def test_model_activity_features_exist_in_user_activity() -> None:
    missing = set(config.ACTIVITY_FEATURES) - set(schemas.USER_ACTIVITY_FEATURES)
    assert not missing, f"user tower reads features the user_activity table lacks: {sorted(missing)}"
    # Every numeric activity feature except the raw timestamp feeds the user tower.
    assert set(schemas.USER_ACTIVITY_FEATURES) - set(config.ACTIVITY_FEATURES) == {"last_purchase_ts"}


def test_model_popularity_features_are_item_popularity() -> None:
    assert tuple(schemas.ITEM_POPULARITY_FEATURES) == config.POPULARITY_FEATURES
