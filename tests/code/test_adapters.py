"""The two library internals recflow relies on live in one adapter each, and behave as relied upon.

Feast has no public accessor for its provider or online store (``recflow.feature_store.provider`` /
``online_store``); BentoML none for a model store at a path (``recflow.registry.model_store``). An
upgrade that moves either fails here, and nothing else may reach the internals directly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("recflow", "training", "serving", "monitoring", "flows", "benchmarks", "feature_repo")
ADAPTERS = {
    "_get_provider(": {"recflow/feature_store.py"},
    "bentoml._internal.models": {"recflow/registry.py"},
}


@pytest.mark.parametrize("needle", sorted(ADAPTERS))
def test_library_internals_are_reached_only_through_their_adapter(needle: str) -> None:
    users = {
        str(path.relative_to(ROOT))
        for pkg in PACKAGES
        for path in (ROOT / pkg).rglob("*.py")
        if needle in path.read_text(encoding="utf-8")
    }
    assert users == ADAPTERS[needle], f"{needle!r} used outside its adapter: {sorted(users - ADAPTERS[needle])}"


def test_feast_adapter_gives_the_provider_and_online_store_recflow_uses(make_settings) -> None:  # noqa: ANN001
    from recflow import feature_store as fs

    settings = make_settings()
    store = fs.get_store(settings)
    provider = fs.provider(store)
    online = fs.online_store(store)
    assert callable(provider.ingest_df), "serving.online_push writes pushes with provider.ingest_df"
    assert online is provider.online_store
    assert callable(online.online_read), "serving.online_reader reads rows with online_store.online_read"
    conn = online._get_conn(store.config)  # SQLite: bound_sqlite and forget_user rely on it
    assert re.fullmatch(r"\d+", str(conn.execute("PRAGMA busy_timeout").fetchone()[0]))
    # bound_sqlite puts the file in WAL mode (readers never wait for a push's commit), and it stays so
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    import sqlite3

    other = sqlite3.connect(settings.paths.feast_online)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_bentoml_adapter_stores_and_lists_models_under_the_home(make_settings) -> None:  # noqa: ANN001
    import bentoml

    from recflow.registry import model_store

    settings = make_settings()
    store = model_store(settings)
    with bentoml.models.create("adapter-probe", metadata={"k": 1}, _model_store=store) as entry:
        (Path(entry.path) / "weights.txt").write_text("w")
    got = bentoml.models.get("adapter-probe:latest", _model_store=store)
    assert got.info.metadata == {"k": 1}
    assert (Path(got.path) / "weights.txt").read_text() == "w"
    assert Path(got.path).resolve().is_relative_to((settings.paths.bentoml_home / "models").resolve())
    assert [str(m.tag) for m in bentoml.models.list("adapter-probe", _model_store=store)] == [str(got.tag)]
