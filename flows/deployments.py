"""Prefect deployments for every recflow flow, defined once in Python.

- ``deploy_all(work_pool)``: register them on a Prefect server; a process worker runs them
  (``prefect worker start --pool <work_pool>``).
- ``serve_all()``: run them in this process instead (one machine, no worker needed).

Entrypoints are module paths (``flows.features.build_features``), so a worker needs only the
installed package, not a copy of the source tree. Every deployment passes ``home`` as a flow parameter
(``recflow --home DIR schedule``); the other settings come from the worker's environment
(``RECFLOW_*``) and ``recflow.toml``, as for any flow (``recflow.settings.flow_settings``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from prefect.types.entrypoint import EntrypointType

from recflow.schemas import DRIFT_EVENT

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.deployments.runner import RunnerDeployment



def deployments(home: str | None = None) -> list[RunnerDeployment]:
    """Every recflow deployment with its schedule or trigger; runs get ``home`` (None: the worker's
    ``RECFLOW_HOME`` or the default).

    - ``build_features/hourly``: ingest, feedback, feature tables, materialisation, every hour;
    - ``monitor/daily``: drift and quality reports of the last week, every day at 06:00 UTC;
    - ``refresh_items/daily``: the champion's two-stage item side as of each day, at 00:15 UTC;
    - ``retrain/on-drift``: triggered by the ``recflow.drift.detected`` event the monitor emits;
    - ``train/weekly``: a full search and retrain, Sundays at 02:00 UTC, promoted only through the retrain
      flow's gate against the champion on the test week;
    - ``deploy/manual``: build a bento from the champion, on demand.
    """
    from prefect.events import DeploymentEventTrigger

    from flows.deploy import deploy
    from flows.features import build_features
    from flows.monitor import monitor
    from flows.refresh_items import refresh_items
    from flows.retrain import retrain
    from flows.train import train

    module = EntrypointType.MODULE_PATH
    params = {"home": home} if home else {}
    return [
        build_features.to_deployment(
            name="hourly",
            interval=timedelta(hours=1),
            entrypoint_type=module,
            parameters=params,
            tags=["recflow", "features"],
            description="Ingest, rebuild feature tables, apply the Feast repo and materialise the latest values.",
            concurrency_limit=1,
        ),
        monitor.to_deployment(
            name="daily",
            cron="0 6 * * *",
            entrypoint_type=module,
            parameters=params,
            tags=["recflow", "monitoring"],
            description="Evidently drift and quality reports for the last week; emits recflow.drift.detected on drift.",
            concurrency_limit=1,
        ),
        refresh_items.to_deployment(
            name="daily",
            cron="15 0 * * *",
            entrypoint_type=module,
            parameters=params,
            tags=["recflow", "serving"],
            description="Recompute the champion's two-stage item side (popularity, trend, launches, co-purchase) as of "
                        "today; the service loads it at its next champion poll.",
            concurrency_limit=1,
        ),
        retrain.to_deployment(
            name="on-drift",
            entrypoint_type=module,
            parameters=params,
            tags=["recflow", "training"],
            description="Incremental retrain from the champion, gated; runs when the monitor reports drift.",
            triggers=[
                DeploymentEventTrigger(
                    name="retrain on drift",
                    expect={DRIFT_EVENT},
                    match={"prefect.resource.id": "recflow.monitor.*"},
                    parameters={"reason": "{{ event.payload.window }}", **params},
                )
            ],
            concurrency_limit=1,
        ),
        train.to_deployment(
            name="weekly",
            cron="0 2 * * 0",
            entrypoint_type=module,
            parameters=params,
            tags=["recflow", "training"],
            description="Full training: Feast training set, Ray Tune search, test-week evaluation, registry; promoted only "
                        "when it beats the champion through the promotion gate.",
            concurrency_limit=1,
        ),
        deploy.to_deployment(
            name="manual",
            entrypoint_type=module,
            parameters=params,
            tags=["recflow", "serving"],
            description="Build a bento from the champion model.",
        ),
    ]


def deploy_all(work_pool: str, home: str | None = None) -> list[UUID]:
    """Create or update every deployment on the Prefect server in ``PREFECT_API_URL``.

    Uses ``RunnerDeployment.apply`` rather than ``prefect.deploy``: in Prefect 3.8.8 the latter's
    worker check sends ``limit: null``, which the 3.8.8 server rejects with 422.
    """
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.read_work_pool(work_pool)  # a clear ObjectNotFound if the pool does not exist
    return [d.apply(work_pool_name=work_pool) for d in deployments(home)]


def serve_all(home: str | None = None) -> None:  # pragma: no cover - blocks until interrupted
    """Run every deployment's schedule in this process (no server work pool or worker needed)."""
    from prefect import serve

    serve(*deployments(home))
