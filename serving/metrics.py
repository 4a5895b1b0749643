"""Prometheus metrics of the service (served on ``/metrics`` next to BentoML's own).

Created on first use, inside the worker: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` after the
service module is imported, and metrics created before that would never reach ``/metrics``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@cache
def metrics() -> dict[str, Any]:
    """The service's metric objects, created once per process."""
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "responses": Counter(
            "recflow_responses", "Served answers by endpoint and kind (model, fallback, degraded).", ["endpoint", "kind"]
        ),
        "stage": Histogram(
            "recflow_stage_seconds", "Time per /recommend batch stage (features, user_tower, topk).", ["stage"],
            buckets=STAGE_BUCKETS,
        ),
        "latency": Histogram(
            "recflow_request_seconds",
            "Request latency in the service (BentoML's per-request HTTP metrics skip /recommend: they cost more "
            "than the ranking itself).", ["endpoint"], buckets=LATENCY_BUCKETS,
        ),
        "batch": Histogram("recflow_batch_size", "Requests ranked per /recommend batch.", buckets=BATCH_BUCKETS),
        "user_cache": Counter("recflow_user_cache", "User cache lookups by result (hit, miss): the user tower's query, or the "
                              "two-stage answer.", ["result"]),
        "feedback": Counter("recflow_feedback", "Accepted feedback events by push outcome.", ["outcome"]),
        "store_errors": Counter("recflow_store_errors", "Failed online-store operations.", ["operation"]),
        "reloads": Counter("recflow_reloads", "Model loads by outcome.", ["outcome"]),
        "champion_fallback": Gauge(
            "recflow_champion_fallback", "1 while a worker serves a previous champion because the champion's model "
            "files cannot be loaded (alert on it: re-register and promote a good model, or roll back).",
            multiprocess_mode="livemax",
        ),
        "http": Counter("recflow_http_responses", "Answers of the API endpoints by status class (2xx, 4xx, 5xx).",
                        ["endpoint", "status"]),
        "pending": Gauge("recflow_feedback_pending", "Accepted feedback events not yet pushed to the online store "
                         "(the push loop's last count).", multiprocess_mode="livemax"),
        "canary": Gauge("recflow_canary_share", "Share of users a worker answers with the canary model (0 once it "
                        "ended; recflow.canary).", ["model"], multiprocess_mode="liveall"),
        "model": Gauge("recflow_model_info", "1 for the model version a worker serves (one series per worker: "
                       "alert when live workers serve different versions).", ["model"], multiprocess_mode="liveall"),
    }


def note_model(version: str, previous: str | None) -> None:
    """Mark ``version`` as this worker's model in ``recflow_model_info`` (and ``previous`` as no longer)."""
    m = metrics()["model"]
    if previous and previous != version:
        m.labels(previous).set(0)
    m.labels(version).set(1)


def status_class(status: int) -> str:
    """``2xx``, ``4xx`` or ``5xx`` (other codes by their first digit)."""
    return f"{status // 100}xx"
