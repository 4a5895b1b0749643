"""Registry round trip in a temporary BentoML home: save, load, identical scores; champion and rollback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recflow import registry
from recflow.modeling import build_index, build_tiny_model, user_query

FEATURES = {"user_history__history_item_ids": ["i1", "i4", "i1"], "user_history__history_ts": [300, 300, 100]}


def test_register_load_identical_scores(make_settings) -> None:  # noqa: ANN001
    settings = make_settings()
    model = build_tiny_model(n_items=25, seed=3)
    tag = registry.register(settings, model, {"metrics": {"ndcg@10": 0.31}, "data_window": {"cutoff": "2017-09-17"}})
    path = registry.model_path(settings, tag)
    assert str(path).startswith(str(settings.paths.bentoml_home))
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not list(path.rglob("*.pkl"))
    loaded = registry.load(settings, tag)
    a = build_index(model).scores(user_query(model, FEATURES))
    b = build_index(loaded).scores(user_query(loaded, FEATURES))
    assert np.array_equal(a, b)
    listed = registry.list_models(settings)
    assert listed[0]["tag"] == tag
    meta = listed[0]["metadata"]
    assert meta["metrics"] == {"ndcg@10": 0.31} and meta["feature_service"] == settings.feast.serving_service
    assert "git_commit" in meta


def test_champion_pointer_and_rollback(make_settings) -> None:  # noqa: ANN001
    settings = make_settings()
    with pytest.raises(LookupError):
        registry.load_champion(settings)
    t1 = registry.register(settings, build_tiny_model(n_items=10, seed=1), {})
    t2 = registry.register(settings, build_tiny_model(n_items=10, seed=2), {})
    registry.set_champion(settings, t1, reason="first")
    p = registry.set_champion(settings, t2, reason="second")
    assert p["tag"] == t2 and [h["tag"] for h in p["history"]] == [t1]
    on_disk = json.loads(registry.champion_path(settings).read_text())
    assert on_disk["tag"] == t2 and not list(registry.champion_path(settings).parent.glob("*.tmp"))
    model, pointer = registry.load_champion(settings)
    assert pointer["tag"] == t2 and len(model.item_ids) == 10
    back = registry.rollback(settings)
    assert back["tag"] == t1 and back["history"] == [] and t2 in back["reason"]
    with pytest.raises(LookupError):
        registry.rollback(settings)
    with pytest.raises(Exception, match="not found|NotFound|does not exist"):
        registry.set_champion(settings, "recflow_two_tower:doesnotexist")


def test_interrupted_promotion_leaves_the_old_champion(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A crash between writing the new pointer and swapping it in changes nothing a reader sees."""
    import os

    settings = make_settings()
    t1 = registry.register(settings, build_tiny_model(n_items=10, seed=1), {})
    t2 = registry.register(settings, build_tiny_model(n_items=10, seed=2), {})
    registry.set_champion(settings, t1, reason="first")

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut during promotion")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        registry.set_champion(settings, t2, reason="challenger")
    monkeypatch.undo()
    model, pointer = registry.load_champion(settings)
    assert pointer["tag"] == t1 and json.loads(registry.champion_path(settings).read_text())["tag"] == t1
    assert registry.set_champion(settings, t2, reason="retry")["tag"] == t2  # a later promotion still works


def test_champion_pointer_is_fsynced_before_the_rename(make_settings, monkeypatch) -> None:  # noqa: ANN001
    """The pointer's bytes are on disk before its name changes; a failed fsync leaves the old pointer."""
    import os

    from recflow import durable

    settings = make_settings()
    registry._write_pointer(settings, {"tag": "old:1", "history": []})
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", recording)
    registry._write_pointer(settings, {"tag": "new:2", "history": []})
    path = registry.champion_path(settings)
    assert synced[0].endswith(".tmp") and synced[0] != str(path), synced  # the data, before the rename
    assert synced[-1] == str(path.parent), synced  # then the folder, so the rename is durable
    assert registry.get_champion(settings)["tag"] == "new:2"

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable.os, "fsync", failing)
    with pytest.raises(OSError):
        registry._write_pointer(settings, {"tag": "lost:3", "history": []})
    assert registry.get_champion(settings)["tag"] == "new:2", "a pointer that is not on disk is never swapped in"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
