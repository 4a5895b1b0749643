"""Hyper-parameter search with Ray Tune: ASHA early stopping on validation NDCG@10.

- Search algorithm: Optuna (TPE) when ``optuna`` is installed, else Tune's random search.
- Resources per trial from :class:`TuneConfig` (CPU by default; a GPU fraction when the Ray cluster
  has GPUs, whether or not the driver has one).
- ``RAY_ADDRESS`` set: ``ray.init(address=...)`` joins that cluster; else a local Ray on
  127.0.0.1 with ``num_cpus`` CPUs and no dashboard. The training data goes to the trials once,
  through the object store (``tune.with_parameters``); trials start no Ray tasks of their own.
- Trials stop training ``trial_share`` of the budget after the search starts (``TrainConfig.deadline``),
  then evaluate and report, so the first trials report before the budget ends on a slow machine.
- Every epoch reports the validation metrics and a ``tune.Checkpoint`` (the trainable weights as
  safetensors: the frozen encoder layers, and the text table of a frozen encoder, are rebuilt from
  the data, not copied).
- MiniLM: with ``encoder_mode="top_k"`` the search picks how many top layers train from
  ``TuneConfig.unfrozen_layers`` (CPU) or ``gpu_unfrozen_layers`` (a Ray cluster with GPUs); the
  trials read the lower layers' cached token states from ``data.token_states``.
  CSV, JSON and TensorBoard logs go to ``storage_path/name``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recflow.modeling.model import RecModel
from training.train_data import TrainData
from training.trainer import TrainConfig, build_model, compute_history, fit, train_config, user_dense

if TYPE_CHECKING:
    from recflow.settings import Settings

log = logging.getLogger("training.tune")
METRIC = "ndcg@10"
REPORTED = ("ndcg@10", "recall@20", "hitrate@10", "coverage", "ndcg@10_new", "ndcg@10_repeat", "train_loss", "samples_per_s")
CHECKPOINT_FILE = "trainable.safetensors"


@dataclass
class TuneConfig:
    """How the search runs. ``search_space`` overrides :func:`default_search_space` per key."""

    trials: int = 4
    max_minutes: float = 10.0
    epochs: int = 3
    grace_period: int = 1
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.25
    num_cpus: int | None = None  # local Ray only (default: os.cpu_count())
    storage_path: str = "ray_results"
    name: str = "recflow_tune"
    seed: int = 42
    searcher: str = "auto"  # auto | optuna | random
    search_space: dict[str, Any] = field(default_factory=dict)
    base: TrainConfig = field(default_factory=TrainConfig)
    unfrozen_layers: tuple[int, ...] = (1,)  # top_k on CPU: choices of trained top layers
    trial_share: float = 0.5  # trials stop training this share of the budget after the search starts, then report
    gpu_unfrozen_layers: tuple[int, ...] = (1, 2, 3)  # top_k on a cluster with GPUs


def tune_config(settings: Settings, trials: int | None = None, max_minutes: float | None = None) -> TuneConfig:
    """The two-tower search's :class:`TuneConfig` from ``settings.training`` (``trials`` and
    ``max_minutes`` default to the settings' own)."""
    t = settings.training
    space: dict[str, Any] = {}
    if settings.features.history_length < TrainConfig.history_length:
        space["history_length"] = settings.features.history_length
    return TuneConfig(
        trials=trials or t.trials, max_minutes=max_minutes or t.max_minutes, epochs=t.epochs,
        cpus_per_trial=t.cpus_per_trial, gpus_per_trial=t.gpus_per_trial, storage_path=str(settings.paths.ray_results),
        seed=t.seed, searcher=t.searcher, base=train_config(settings), search_space=space,
        unfrozen_layers=(t.unfrozen_layers,), gpu_unfrozen_layers=tuple(t.gpu_unfrozen_layers),
    )


@dataclass
class TuneOutcome:
    """The winner: its training config, validation metrics, checkpoint and rebuilt model."""

    config: TrainConfig
    metrics: dict[str, float]
    checkpoint: str
    model: RecModel
    trials: list[dict[str, Any]]
    seconds: float
    searcher: str
    search_space: dict[str, str]


def default_search_space(gpu: bool, unfrozen: tuple[int, ...] = (1,), gpu_unfrozen: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    """lr, temperature, batch size, unfrozen layers, history length, projection size, weight decay.

    Unfrozen MiniLM layers (``top_k`` mode) come from ``unfrozen`` on CPU (default: the top layer,
    trained on cached lower-layer states) and ``gpu_unfrozen`` on a GPU cluster; 0 = frozen."""
    from ray import tune

    return {
        "lr": tune.loguniform(1e-3, 1e-2),
        "temperature": tune.loguniform(0.05, 0.3),
        "batch_size": tune.choice([64, 128, 256]),
        "unfrozen_layers": tune.choice(list(gpu_unfrozen if gpu else unfrozen)),
        "history_length": tune.choice([250, 500]),
        "dim": tune.choice([32, 64, 128]),
        "weight_decay": tune.loguniform(1e-7, 1e-4),
    }


def describe_space(space: dict[str, Any]) -> dict[str, str]:
    """A JSON-friendly description of a search space (for model metadata)."""
    out = {}
    for k, v in space.items():
        if hasattr(v, "categories"):
            out[k] = f"choice{list(v.categories)}"
        elif hasattr(v, "lower"):
            sampler = type(getattr(v, "sampler", None)).__name__
            out[k] = f"{'log' if 'Log' in sampler else ''}uniform({v.lower}, {v.upper})"
        else:
            out[k] = repr(v)
    return out


def trainable_state(model: RecModel, frozen: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint needs: everything except the frozen encoder weights and, when the encoder
    is frozen, the text table (both rebuilt from the data)."""
    trained = {f"encoder.{n}" for n, p in model.encoder.named_parameters() if p.requires_grad and not frozen}
    return {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
        if (not k.startswith("encoder.") or k in trained) and not (frozen and k.startswith("text_emb"))
    }


def train_config_from(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    merged = {**asdict(base), **{k: v for k, v in params.items() if k in known}}
    if merged.get("unfrozen_layers", 0) > 0 and merged.get("encoder_mode") == "frozen":
        merged["encoder_mode"] = "top_k"
    for k in ("batch_size", "history_length", "dim", "unfrozen_layers", "epochs"):
        merged[k] = int(merged[k])
    return TrainConfig(**merged)


def _trainable(params: dict[str, Any], data: TrainData, base: dict[str, Any], threads: int) -> None:
    from ray import tune

    # one "Checkpoint successfully created" line per trial epoch would bury the user's progress
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = train_config_from(TrainConfig(**base), params)
    cfg.threads = threads
    frozen = cfg.effective_mode() == "frozen"

    def report(epoch: int, metrics: dict[str, float], model: RecModel) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_file(trainable_state(model, frozen), os.path.join(d, CHECKPOINT_FILE))
            Path(d, "train_config.json").write_text(json.dumps(asdict(cfg)))
            tune.report({k: float(metrics[k]) for k in REPORTED if k in metrics} | {"epoch": epoch},
                        checkpoint=tune.Checkpoint.from_directory(d))

    fit(data, cfg, report=report)


def cluster_has_gpu() -> bool:
    """Whether the Ray cluster (not this driver) has GPUs: a CPU-only driver may use a GPU cluster."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) > 0


def init_ray(num_cpus: int | None = None) -> bool:
    """Start or join Ray. Returns True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1",
            log_to_driver=True, configure_logging=False,
        )
    return True


def _searcher(kind: str, seed: int) -> tuple[Any, str]:
    if kind in ("auto", "optuna"):
        try:
            quiet = logging.getLogger("optuna").getEffectiveLevel() > logging.INFO  # e.g. the CLI without --verbose
            import optuna
            import optuna.samplers as samplers
            from ray.tune.search.optuna import OptunaSearch

            if quiet:  # optuna sets its own logger to INFO when first used
                optuna.logging.set_verbosity(optuna.logging.WARNING)

            return OptunaSearch(sampler=samplers.TPESampler(seed=seed)), "optuna-tpe"
        except ImportError:
            if kind == "optuna":
                raise
    return None, "random"


def restore_model(data: TrainData, checkpoint_dir: str | Path) -> tuple[RecModel, TrainConfig]:
    """Rebuild a trial's model from its checkpoint folder (and the shared data)."""
    cfg = TrainConfig(**json.loads(Path(checkpoint_dir, "train_config.json").read_text()))
    hist = compute_history(data.train, cfg, (7.0, 30.0, 90.0, 365.0))
    model = build_model(data, cfg, hist, user_dense(data.train.activity, hist))
    state = load_file(str(Path(checkpoint_dir, CHECKPOINT_FILE)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(("encoder.", "text_emb"))]
    if bad or unexpected:
        raise ValueError(f"checkpoint {checkpoint_dir} does not fit the model: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def run_search(data: TrainData, tc: TuneConfig, progress: Callable[[str], None] | None = None) -> TuneOutcome:
    """Run the search and return the best trial (by validation NDCG@10 at any epoch)."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    say = progress or log.info
    started = time.perf_counter()
    # every epoch's checkpoint forces an experiment snapshot (num_to_keep=1); a few trials on a small
    # machine snapshot often by design, so Tune's "snapshotting may become a bottleneck" advice is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    owns_ray = init_ray(tc.num_cpus)
    try:
        gpu = cluster_has_gpu()
        mode = tc.base.encoder_mode
        unfrozen = (0,) if mode == "frozen" else tuple(tc.unfrozen_layers)
        gpu_unfrozen = (0,) if mode == "frozen" else tuple(tc.gpu_unfrozen_layers)
        space = {**default_search_space(gpu, unfrozen, gpu_unfrozen), **tc.search_space}
        searcher, searcher_name = _searcher(tc.searcher, tc.seed)
        threads = max(1, int(math.floor(tc.cpus_per_trial)))
        resources = {"cpu": tc.cpus_per_trial} | ({"gpu": tc.gpus_per_trial} if gpu and tc.gpus_per_trial > 0 else {})
        # trials stop training in time to evaluate (and re-encode a fine-tuned text table) before the budget ends
        deadline = time.time() + tc.trial_share * tc.max_minutes * 60
        base = asdict(tc.base) | {"epochs": tc.epochs, "log_every": 0,
                                  "deadline": min(tc.base.deadline or math.inf, deadline)}
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, data=data, base=base, threads=threads), resources
        )
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=tc.epochs, grace_period=min(tc.grace_period, tc.epochs),
            reduction_factor=tc.reduction_factor,
        )
        storage = str(Path(tc.storage_path).resolve())
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=tc.trials, scheduler=scheduler, search_alg=searcher,
                time_budget_s=tc.max_minutes * 60,
            ),
            run_config=tune.RunConfig(
                name=tc.name, storage_path=storage, verbose=int(os.environ.get("RECFLOW_TUNE_VERBOSE", "0")),
                callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TBXLoggerCallback()],
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"
                ),
            ),
        )
        say(f"Ray Tune: {tc.trials} trial(s), {searcher_name} search, ASHA over {tc.epochs} epoch(s), "
            f"{resources} per trial, budget {tc.max_minutes:g} min")
        with warnings.catch_warnings():  # Ray's checkpoint sync uses pathspec's deprecated gitwildmatch patterns
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pathspec(\..*)?")
            grid = tuner.fit()
        trials = []
        for r in grid:
            if r.metrics_dataframe is None or r.metrics_dataframe.empty:
                continue
            df = r.metrics_dataframe
            row = df.loc[df[METRIC].idxmax()] if METRIC in df else df.iloc[-1]
            trials.append({"config": r.config, "epochs": int(len(df)), "best": {k: float(row[k]) for k in REPORTED if k in row},
                           "error": str(r.error) if r.error else None})
        errors = [r.error for r in grid if r.error]
        try:
            best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
        except RuntimeError:  # Ray: "No best trial found for the given metric"
            best = None
        if best is None or best.metrics is None:
            raise RuntimeError(
                f"no trial reported within the {tc.max_minutes:g}-minute budget (errors: {errors[:3]}); raise "
                "max_minutes (recflow train --max-minutes), lower train_weeks, or set training.encoder_mode=frozen"
            )
        try:
            ckpt = best.get_best_checkpoint(METRIC, "max") or best.checkpoint
        except RuntimeError:  # Ray: "No checkpoint exists in the trial directory!"
            ckpt = None
        if ckpt is None:
            raise RuntimeError(
                f"no trial finished an epoch within the {tc.max_minutes:g}-minute budget (errors: {errors[:3]}); "
                "raise max_minutes (recflow train --max-minutes) or lower train_weeks"
            )
    finally:
        if owns_ray:
            ray.shutdown()
    with ckpt.as_directory() as d:
        model, cfg = restore_model(data, d)
    df = best.metrics_dataframe
    best_row = df.loc[df[METRIC].idxmax()]
    metrics = {k: float(best_row[k]) for k in REPORTED if k in best_row} | {"epoch": int(best_row.get("epoch", len(df)))}
    say(f"best trial: val ndcg@10 {metrics[METRIC]:.4f} with "
        + ", ".join(f"{k}={best.config[k]:.3g}" if isinstance(best.config[k], float) else f"{k}={best.config[k]}" for k in sorted(space)))
    return TuneOutcome(cfg, metrics, ckpt.path, model, trials, time.perf_counter() - started, searcher_name, describe_space(space))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
