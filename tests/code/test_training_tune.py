"""A 2-trial, 1-epoch Ray Tune search on CPU (local Ray on 127.0.0.1, shut down afterwards)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.synthetic import synthetic_data
from training.trainer import TrainConfig
from training.tune import TuneConfig, run_search


@pytest.mark.timeout(300)
def test_two_trial_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray import tune

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data, _ = synthetic_data(n_users=30, n_items=60, train_weeks=4)
    tc = TuneConfig(
        trials=2, max_minutes=3, epochs=1, cpus_per_trial=1, num_cpus=2, storage_path=str(tmp_path / "ray"),
        searcher="random", base=TrainConfig(batch_size=16, n_uniform=16, hidden=16),
        search_space={"dim": tune.choice([8, 16]), "history_length": 100},
    )
    out = run_search(data, tc)
    assert not ray.is_initialized()
    assert len(out.trials) == 2 and all(t["error"] is None for t in out.trials)
    assert 0.0 <= out.metrics["ndcg@10"] <= 1.0
    assert out.metrics["ndcg@10"] == max(t["best"]["ndcg@10"] for t in out.trials)
    assert out.config.dim in (8, 16) and Path(out.checkpoint).is_dir()
    assert out.model.config.dim == out.config.dim
    logs = {p.name for p in (tmp_path / "ray").rglob("*")}
    assert "progress.csv" in logs and any(n.startswith("events.out.tfevents") for n in logs)


def test_training_configs_derive_from_the_settings(make_settings) -> None:  # noqa: ANN001
    from training.trainer import train_config
    from training.tune import tune_config

    settings = make_settings(training={"epochs": 5, "encoder_mode": "top_k", "unfrozen_layers": 2, "encoder_lr": 2e-4,
                                       "finetune_texts": 8, "trials": 3, "max_minutes": 1.5, "seed": 7},
                             features={"history_length": 120})
    cfg = train_config(settings)
    assert (cfg.epochs, cfg.encoder_mode, cfg.unfrozen_layers, cfg.encoder_lr, cfg.max_fresh_texts, cfg.seed,
            cfg.history_length) == (5, "top_k", 2, 2e-4, 8, 7, 120)
    assert train_config(settings, epochs=1, lr=1e-3).epochs == 1, "changes replace fields"
    tc = tune_config(settings)
    assert (tc.trials, tc.max_minutes, tc.epochs, tc.seed, tc.base) == (3, 1.5, 5, 7, cfg)
    assert tc.search_space == {"history_length": 120} and tc.unfrozen_layers == (2,)
    assert tune_config(settings, trials=9).trials == 9
