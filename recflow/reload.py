"""The client of a running service's ``POST /reload`` (used by the deploy and retrain flows and the CLI)."""

from __future__ import annotations

from typing import Any

from recflow.security import auth_headers
from recflow.settings import Settings


def reload_service(settings: Settings, url: str, model_tag: str | None = None) -> dict[str, Any]:
    """Ask the service at ``url`` to load the current champion (or the registry tag ``model_tag``) and swap it
    in; returns its answer. Sends the write token; waits at most ``serving.reload_timeout_s``. Raises
    ``httpx.HTTPStatusError`` on a non-2xx answer and ``httpx.TransportError`` when the service is unreachable."""
    import httpx

    body = {"model_tag": model_tag} if model_tag else {}
    response = httpx.post(f"{url.rstrip('/')}/reload", json=body, headers=auth_headers(settings),
                          timeout=settings.serving.reload_timeout_s)
    response.raise_for_status()
    return response.json()
