"""Shared fixtures: one session-scoped Prefect harness, settings in a temp home, a tiny shop.

Test layout: ``tests/code`` (unit tests of code), ``tests/data`` (expectations on data and
features), ``tests/model`` (model behaviour), ``tests/integration`` (real stores, servers, the
real Complete Journey data and MiniLM weights).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server and database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server on 127.0.0.1 and a free port, for the session; yields 'host:port'.

    CI installs Debian's redis-server (see .ci/run); there a missing binary is a failure, elsewhere a skip.
    """
    from recflow.local_services import redis_server as run_redis

    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it with apt-get")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with run_redis() as address:
        yield address


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Build Settings rooted in a temp folder; RECFLOW_* variables of the caller's shell are ignored."""
    for name in list(os.environ):
        if name.startswith("RECFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RECFLOW_HOME", str(tmp_path / "home"))
    # services in tests run one worker (the default is one per core), unless a test asks for more:
    # per-worker state (caches, counters) stays predictable and start-up stays short on 2 cores
    monkeypatch.setenv("RECFLOW_SERVING__WORKERS", "1")
    monkeypatch.chdir(tmp_path)

    def _make(**overrides: object):  # noqa: ANN202
        from recflow.settings import load_settings

        overrides.setdefault("home", tmp_path / "home")
        return load_settings(**overrides)

    return _make


# A tiny shop whose features can be checked by hand. User "a":
#   2024-01-01 10:00 buys x, 10:01 buys y (basket b1); 2024-01-05 09:00 buys x (b2); 2024-02-20 08:00 buys z (b3)
# Other users give the data a horizon until 2024-04-30 and some views and carts.
TINY_EVENTS = [
    # event_id, user_id, item_id, timestamp, event_type, basket_id, quantity, price
    ("e01", "a", "x", "2024-01-01T10:00:00Z", "purchase", "b1", "1", "2.50"),
    ("e02", "a", "y", "2024-01-01T10:01:00Z", "purchase", "b1", "2", "1.00"),
    ("e03", "a", "x", "2024-01-05T09:00:00Z", "purchase", "b2", "1", "2.50"),
    ("e04", "a", "z", "2024-02-20T08:00:00Z", "purchase", "b3", "1", "4.00"),
    ("e05", "b", "x", "2024-01-03T12:00:00Z", "view", "", "", ""),
    ("e06", "b", "x", "2024-01-03T12:05:00Z", "cart", "", "1", "2.50"),
    ("e07", "b", "x", "2024-01-03T12:10:00Z", "purchase", "b4", "1", "2.50"),
    ("e08", "b", "w", "2024-03-15T18:00:00Z", "purchase", "b5", "3", "0.50"),
    ("e09", "c", "y", "2024-02-01T11:00:00Z", "purchase", "b6", "1", "1.00"),
    ("e10", "c", "z", "2024-04-30T20:00:00Z", "purchase", "b7", "1", "4.00"),
]
TINY_ITEMS = [
    # item_id, title, category, brand, price
    ("x", "Oat milk 1l", "dairy", "Oatly", "2.50"),
    ("y", "Rye bread", "bakery", "Local", "1.00"),
    ("z", "Olive oil 500ml", "pantry", "Bertolli", "4.00"),
    ("w", "Lemons", "produce", "", "0.50"),
    ("v", "Sparkling water", "drinks", "Acme", "0.80"),  # never sold: cold-start item
]


@pytest.fixture
def tiny_shop(tmp_path: Path) -> dict[str, Path]:
    """Interactions, items and users CSV files of the tiny shop."""
    folder = tmp_path / "shop"
    folder.mkdir()
    events = pd.DataFrame(
        TINY_EVENTS,
        columns=["event_id", "user_id", "item_id", "timestamp", "event_type", "basket_id", "quantity", "price"],
    )
    items = pd.DataFrame(TINY_ITEMS, columns=["item_id", "title", "category", "brand", "price"])
    users = pd.DataFrame({"user_id": ["a", "b", "c"], "age": ["25-34", "45-54", None], "loyalty_tier": ["g", "s", "g"]})
    paths = {"interactions": folder / "interactions.csv", "items": folder / "items.csv", "users": folder / "users.csv"}
    events.to_csv(paths["interactions"], index=False)
    items.to_csv(paths["items"], index=False)
    users.to_csv(paths["users"], index=False)
    return paths


@pytest.fixture
def tiny_settings(make_settings, tiny_shop: dict[str, Path]):  # noqa: ANN001, ANN201
    """Settings for the tiny shop (generic source, a fixed 'now' after the data)."""
    from recflow.settings import DataSettings

    return make_settings(
        data=DataSettings(
            source="generic",
            interactions_path=tiny_shop["interactions"],
            items_path=tiny_shop["items"],
            users_path=tiny_shop["users"],
            now="2024-06-01T00:00:00Z",
        )
    )


@pytest.fixture
def tiny_features(tiny_settings):  # noqa: ANN001, ANN201
    """The tiny shop ingested and its feature tables built; returns the settings."""
    from recflow.datasets import ingest
    from recflow.features.build import build_feature_tables

    ingest(tiny_settings)
    build_feature_tables(tiny_settings)
    return tiny_settings


@pytest.fixture
def shop_model():  # noqa: ANN201
    """Factory: a tiny random model over the tiny shop's catalogue, without item "v" (a cold-start item)."""

    def _make(settings, seed: int = 0):  # noqa: ANN001, ANN202
        import numpy as np
        import torch

        from recflow.modeling import ModelConfig, new_model, tiny_tokenizer
        from recflow.modeling.build import TINY_BERT

        items = pd.read_parquet(settings.paths.items).sort_values("item_id")
        ids = [i for i in items["item_id"] if i != "v"]
        texts = items.set_index("item_id").loc[ids, "text"].fillna("").tolist()
        torch.manual_seed(seed)
        cfg = ModelConfig(encoder=dict(TINY_BERT), n_ids=len(ids) + 1, text_dim=TINY_BERT["hidden_size"], dim=8,
                          hidden=16, max_length=16, dropout=0.0)
        model = new_model(cfg, ids, texts, id_rows=np.arange(1, len(ids) + 1), tokenizer=tiny_tokenizer())
        with torch.no_grad():
            model.text_emb.copy_(model.encode_texts(model.texts))
        return model.eval()

    return _make


@pytest.fixture
def tiny_champion(tiny_features, shop_model):  # noqa: ANN001, ANN201
    """The tiny shop with features built and a tiny model registered as champion; returns (settings, tag)."""
    from recflow import registry

    tag = registry.register(tiny_features, shop_model(tiny_features), {"note": "tiny champion"})
    registry.set_champion(tiny_features, tag, "test")
    return tiny_features, tag
