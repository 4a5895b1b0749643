"""A champion whose model files cannot be read: serving loads the newest previous champion that can."""

from __future__ import annotations

import pytest


def _truncate(path) -> None:  # noqa: ANN001
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_truncated_champion_falls_back_to_the_previous_one(tiny_champion, shop_model) -> None:  # noqa: ANN001
    from recflow import registry
    from serving.model_source import files_signature, read_champion, resolve_model

    settings, first = tiny_champion
    second = registry.register(settings, shop_model(settings, seed=1), {"note": "second"})
    registry.set_champion(settings, second, "test")
    src = resolve_model(settings)
    assert read_champion(settings, src)[3] is None, "a readable champion is no fallback"

    third = registry.register(settings, shop_model(settings, seed=2), {"note": "third"})
    weights = registry.model_path(settings, third) / "model.safetensors"
    _truncate(weights)
    registry.set_champion(settings, third, "a partial copy")
    src = resolve_model(settings)
    used, model, _, fallback = read_champion(settings, src)
    assert used.version == second and used.source == "champion" and len(model.item_ids) == 4
    assert fallback is not None and fallback.tag == third and "SafetensorError" in fallback.error
    assert fallback.signature == files_signature(src.folder)

    _truncate(registry.model_path(settings, second) / "model.safetensors")  # the previous one is damaged too
    used, _, _, fallback = read_champion(settings, src)
    assert used.version == first and fallback.tag == third, "older champions are tried, newest first"

    _truncate(registry.model_path(settings, first) / "model.safetensors")
    with pytest.raises(RuntimeError, match=f"champion {third} cannot be loaded.*re-register and promote"):
        read_champion(settings, src)
