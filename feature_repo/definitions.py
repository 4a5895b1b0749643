"""recflow's Feast objects for the plain Feast CLI (``feast -c feature_repo plan``).

recflow itself never imports this file: it builds the same objects with
``recflow.feature_definitions.build_definitions(settings)``. The Feast CLI imports every file of
the repo and collects the objects it finds, so here they are built once from the settings of the
environment (``RECFLOW_HOME``, ``RECFLOW_*``, ``recflow.toml``).
"""

from recflow.feature_definitions import build_definitions
from recflow.settings import load_settings

_defs = build_definitions(load_settings())

user = _defs.user
item = _defs.item
user_activity_source = _defs.user_activity_source
user_history_source = _defs.user_history_source
user_profile_source = _defs.user_profile_source
item_popularity_source = _defs.item_popularity_source
item_catalog_source = _defs.item_catalog_source
user_activity_push = _defs.user_activity_push
user_history_push = _defs.user_history_push
user_activity = _defs.user_activity
user_history = _defs.user_history
user_profile = _defs.user_profile
item_popularity = _defs.item_popularity
item_catalog = _defs.item_catalog
training = _defs.training
serving = _defs.serving
item_index = _defs.item_index
