"""Prefect deployments for every recflow flow, defined once in Python.

- ``deploy_all(work_pool)``: register them on a Prefect server; a process worker runs them
  (``prefect worker start --pool <work_pool>``).
- ``serve_all()``: run them in this process instead (one machine, no worker needed).

Entrypoints are module paths (``flows.features.build_features``), so a worker needs only the
installed package, not a copy of the source tree. Settings reach flow runs through the worker's
environment (``RECFLOW_HOME``, ``RECFLOW_*``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from prefect.types.entrypoint import EntrypointType

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.deployments.runner import RunnerDeployment

DRIFT_EVENT = "recflow.drift.detected"


def deployments() -> list[RunnerDeployment]:
    """Every recflow deployment with its schedule or trigger."""
    from flows.features import build_features

    module = EntrypointType.MODULE_PATH
    return [
        build_features.to_deployment(
            name="hourly",
            interval=timedelta(hours=1),
            entrypoint_type=module,
            tags=["recflow", "features"],
            description="Ingest, rebuild feature tables, apply the Feast repo and materialise the latest values.",
            concurrency_limit=1,
        ),
    ]


def deploy_all(work_pool: str) -> list[UUID]:
    """Create or update every deployment on the Prefect server in ``PREFECT_API_URL``.

    Uses ``RunnerDeployment.apply`` rather than ``prefect.deploy``: in Prefect 3.8.8 the latter's
    worker check sends ``limit: null``, which the 3.8.8 server rejects with 422.
    """
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.read_work_pool(work_pool)  # a clear ObjectNotFound if the pool does not exist
    return [d.apply(work_pool_name=work_pool) for d in deployments()]


def serve_all() -> None:  # pragma: no cover - blocks until interrupted
    """Run every deployment's schedule in this process (no server work pool or worker needed)."""
    from prefect import serve

    serve(*deployments())
