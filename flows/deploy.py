"""Prefect flow ``deploy``: package the champion (or a given model) as a bento and report its tag.

Thin: the work is in ``serving.launcher.build_bento`` (``serving/bentofile.yaml`` + the model from the
BentoML model store under the recflow home). Optionally asks a running service to ``/reload``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from recflow.settings import Settings, flow_settings


@task(name="build-bento", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def build_bento_task(settings: Settings, model_tag: str | None) -> str:
    """Build the bento (offline, about 10 s) and return its tag."""
    from serving.launcher import build_bento

    return build_bento(settings, model_tag=model_tag)


@task(name="reload-service", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def reload_task(settings: Settings, url: str) -> dict[str, Any]:
    """Ask the running service at ``url`` to load the current champion (zero-downtime swap)."""
    from recflow.reload import reload_service

    return reload_service(settings, url)


@flow(name="deploy", log_prints=True)
def deploy(
    model_tag: str | None = None,
    model_path: Path | None = None,
    reload_url: str | None = None,
    home: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build a bento from the champion (or ``model_tag``, or the model folder ``model_path``) and print
    its tag; with ``reload_url``, also make the running service there load the champion. Settings:
    ``home`` and ``overrides`` over the environment (``recflow.settings.flow_settings``)."""
    settings = flow_settings(home, overrides)
    if model_path is not None:
        settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"model_path": model_path})})
    tag = build_bento_task(settings, model_tag)
    print(f"bento: {tag}")
    result: dict[str, Any] = {"bento": tag}
    if reload_url:
        result["reload"] = reload_task(settings, reload_url)
        get_run_logger().info("service at %s now serves %s", reload_url, result["reload"].get("model_version"))
    create_markdown_artifact(
        key="recflow-bento",
        markdown=f"# Bento\n\n`{tag}`\n\nContainerise: `BENTOML_HOME={settings.paths.bentoml_home} bentoml containerize {tag}`\n",
        description="Bento built by the deploy flow",
    )
    return result
