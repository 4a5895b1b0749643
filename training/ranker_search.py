"""Ray Tune search over the LightGBM ranker's settings (``training.ranker_trials`` > 0).

Each trial trains the main booster on the training weeks' examples with its own settings and
negative sample, and reports the validation week's NDCG@10 (LightGBM's, over the candidates) after
every boosting round through Ray's LightGBM callback; ASHA stops the trials that trail at its
milestones (rounds), the searcher (Optuna TPE when installed, else random) proposes the next, and
the search stops at ``max_minutes``. The best trial's settings then train the ranker as usual
(:func:`training.ranker.fit_ranker`, both boosters, early-stopped on the same validation week).
The test weeks are never seen. Ray runs locally on 127.0.0.1 (or joins ``RAY_ADDRESS``), as the
two-tower search does (:func:`training.tune.init_ray`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from recflow.ranker.model import RankerConfig
from training.ranker import Week, _subsample, _train

METRIC = "ndcg@10"
SEARCHED = ("num_leaves", "learning_rate", "min_data_in_leaf", "feature_fraction", "lambda_l2", "negative_share")


def ranker_space() -> dict[str, Any]:
    """The searched :class:`RankerConfig` fields and their ranges."""
    from ray import tune

    return {
        "num_leaves": tune.choice([15, 31, 63]),
        "learning_rate": tune.loguniform(0.02, 0.1),
        "min_data_in_leaf": tune.choice([30, 100, 300]),
        "feature_fraction": tune.uniform(0.5, 1.0),
        "lambda_l2": tune.loguniform(0.1, 10.0),
        "negative_share": tune.choice([0.1, 0.15, 0.3]),
    }


@dataclass
class RankerSearch:
    """The search's outcome: ``config`` is the base config with the best trial's settings."""

    config: RankerConfig
    best: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    searcher: str = "random"

    def summary(self) -> dict[str, Any]:
        """JSON-able record (ranker metrics, quality.json)."""
        return {"best": self.best, "trials": self.trials, "seconds": round(self.seconds, 1), "searcher": self.searcher}


def _rows(week: Week) -> SimpleNamespace:
    """What a trial needs of a week (its examples), without the week's log and item side."""
    return SimpleNamespace(x=week.x, y=week.y, cands=SimpleNamespace(user=week.cands.user))


def _trial(params: dict[str, Any], examples: list[SimpleNamespace], val: SimpleNamespace, base: dict[str, Any]) -> None:
    from ray.tune.integration.lightgbm import TuneReportCheckpointCallback

    cfg = replace(RankerConfig.from_dict(base), **params)
    rng = np.random.default_rng(cfg.seed)
    parts = [_subsample(w, cfg.negative_share, rng) for w in examples]  # type: ignore[arg-type]
    # LightGBM names the validation NDCG@10 "validation-ndcg@10" (valid_names, eval_at)
    report = TuneReportCheckpointCallback({METRIC: f"validation-{METRIC}"}, checkpoint_at_end=False)
    _train("trial", parts, _subsample(val, 1.0, rng), cfg, lambda _m: None, callbacks=(report,))  # type: ignore[arg-type]


def search_ranker(
    train: list[Week], val: Week, cfg: RankerConfig, *, trials: int, max_minutes: float, seed: int = 0,
    searcher: str = "auto", cpus_per_trial: int = 1, num_cpus: int | None = None,
    storage_path: str | Path = "ray_results", progress: Callable[[str], None] | None = None,
) -> RankerSearch:
    """Search the ranker's settings on ``train`` weeks, scored on ``val``; returns the best settings."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from training.tune import _searcher, init_ray

    say = progress or (lambda _m: None)
    if not cfg.ranking:
        raise ValueError(f"the ranker search scores NDCG@10 and needs a ranking objective, not {cfg.objective!r}")
    started = time.perf_counter()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    owns_ray = init_ray(num_cpus)
    try:
        search_alg, name = _searcher(searcher, seed)
        base = replace(cfg, threads=cpus_per_trial).to_dict()
        trainable = tune.with_resources(
            tune.with_parameters(_trial, examples=[_rows(w) for w in train], val=_rows(val), base=base),
            {"cpu": cpus_per_trial},
        )
        grace = min(50, cfg.max_rounds)
        tuner = tune.Tuner(
            trainable,
            param_space=ranker_space(),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=trials, search_alg=search_alg, time_budget_s=max_minutes * 60,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.max_rounds, grace_period=grace,
                                        reduction_factor=2),
            ),
            run_config=tune.RunConfig(name="recflow_ranker_tune", storage_path=str(Path(storage_path).resolve()),
                                      verbose=0),
        )
        say(f"ranker search: {trials} trial(s), {name} search, ASHA over boosting rounds (milestones from {grace}), "
            f"budget {max_minutes:g} min")
        grid = tuner.fit()
        rows = []
        for r in grid:
            df = r.metrics_dataframe
            if df is None or df.empty or METRIC not in df:
                continue
            best_row = df.loc[df[METRIC].idxmax()]
            rows.append({**{k: r.config[k] for k in SEARCHED}, METRIC: round(float(best_row[METRIC]), 6),
                         "best_round": int(best_row["training_iteration"]), "rounds": int(df["training_iteration"].max())})
        if not rows:
            errors = [str(r.error)[:200] for r in grid if r.error]
            raise RuntimeError(f"no ranker trial reported within {max_minutes:g} min (errors: {errors[:3]}); raise "
                               "training.ranker_max_minutes or set training.ranker_trials=0")
    finally:
        if owns_ray:
            ray.shutdown()
    best = max(rows, key=lambda r: r[METRIC])
    chosen = replace(cfg, **{k: type(getattr(cfg, k))(best[k]) for k in SEARCHED})
    say(f"ranker search: best validation NDCG@10 {best[METRIC]:.4f} of {len(rows)} trial(s): "
        + ", ".join(f"{k}={best[k]:.3g}" if isinstance(best[k], float) else f"{k}={best[k]}" for k in SEARCHED))
    return RankerSearch(chosen, best, rows, time.perf_counter() - started, name)
