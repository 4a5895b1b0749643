"""Feast sources: the parquet feature tables written by recflow.features, and push sources.

Paths come from recflow's settings (RECFLOW_HOME). The push sources let the serving layer write
fresh user activity and history online the moment feedback arrives.
"""

from feast import FileSource, PushSource

from recflow.settings import active_settings

_paths = active_settings().paths


def _file_source(name: str) -> FileSource:
    return FileSource(
        name=f"{name}_source",
        path=str(_paths.feature_table(name)),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description=f"recflow feature table '{name}' (built by `recflow features`).",
    )


user_activity_source = _file_source("user_activity")
user_history_source = _file_source("user_history")
user_profile_source = _file_source("user_profile")
item_popularity_source = _file_source("item_popularity")
item_catalog_source = _file_source("item_catalog")

user_activity_push = PushSource(name="user_activity_push", batch_source=user_activity_source)
user_history_push = PushSource(name="user_history_push", batch_source=user_history_source)

