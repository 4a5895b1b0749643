"""The train flow promotes only through the retrain flow's gate: the first model of an empty
registry is promoted; a second train whose challenger is worse is registered, not promoted, and
says why with the gate's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def test_train_promotes_first_model_then_only_through_the_gate(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    import training.pipeline as pipeline
    from flows.features import build_features
    from flows.train import train
    from recflow import registry
    from training.synthetic import synthetic_shop

    events, items = synthetic_shop(n_users=40, n_items=60, days=56, seed=0, start="2024-01-01")
    shop = tmp_path / "shop"
    shop.mkdir()
    events.rename(columns={"event_timestamp": "timestamp"}).to_csv(shop / "interactions.csv", index=False)
    items[["item_id", "title"]].assign(category=[f"c{i % 4}" for i in range(len(items))]).to_csv(
        shop / "items.csv", index=False)
    for key, value in {"RECFLOW_DATA__SOURCE": "generic", "RECFLOW_DATA__INTERACTIONS_PATH": str(shop / "interactions.csv"),
                       "RECFLOW_DATA__ITEMS_PATH": str(shop / "items.csv"), "RECFLOW_DATA__NOW": "2024-04-01T00:00:00Z",
                       "RECFLOW_TRAINING__TRAIN_WEEKS": "3", "RECFLOW_TRAINING__EPOCHS": "1",
                       "RECFLOW_TRAINING__RANKER_TRAIN_WEEKS": "3"}.items():
        monkeypatch.setenv(key, value)
    settings = make_settings()
    build_features(home=str(settings.home))
    assert registry.get_champion(settings) is None

    first = train(trials=1, max_minutes=2, home=str(settings.home))
    assert first["promoted"] is True and first["champion_before"] is None
    assert first["promotion"]["gate"] is None and "empty registry" in first["promotion"]["reason"]
    assert registry.get_champion(settings)["tag"] == first["tag"] == first["champion"]

    real = pipeline.evaluate_all

    def worse(*args: Any, **kwargs: Any) -> dict[str, dict[str, float]]:  # the challenger's figures halved
        out = real(*args, **kwargs)
        out["recflow"] = {k: v * 0.5 for k, v in out["recflow"].items()}
        return out

    monkeypatch.setattr(pipeline, "evaluate_all", worse)
    monkeypatch.setenv("RECFLOW_TRAINING__RANKER", "false")  # the halved two-tower figures are the headline
    second = train(trials=1, max_minutes=2, home=str(settings.home))
    assert second["promoted"] is False and second["tag"] != first["tag"]
    assert second["champion_before"] == first["tag"] == second["champion"]
    assert registry.get_champion(settings)["tag"] == first["tag"], "a losing challenger never replaces the champion"
    assert any(m["tag"] == second["tag"] for m in registry.list_models(settings)), "the loser is still registered"
    gate = second["promotion"]["gate"]
    assert gate["promote"] is False and gate["metric"] == settings.training.promotion_metric
    assert gate["challenger"] < gate["champion"] and "misses" in gate["reason"]
    assert "not promoted" in second["promotion"]["reason"] and first["tag"] in second["promotion"]["reason"]
