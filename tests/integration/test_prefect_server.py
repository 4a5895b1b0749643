"""A real Prefect server, a process work pool and worker, and a deployment run end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from recflow.local_services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


TRIGGER_CHECK = """
import asyncio, time
from prefect import get_client
from prefect.events import emit_event
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.sorting import FlowRunSort

emit_event(event="recflow.drift.detected", resource={"prefect.resource.id": "recflow.monitor.test-window"},
           payload={"window": "test-window", "reasons": ["test"]})

async def main() -> None:
    async with get_client() as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["on-drift"])),
                sort=FlowRunSort.ID_DESC, limit=10)  # explicit: the 3.8.8 server rejects nulls
            if runs:
                print("retrain run created:", runs[0].name, runs[0].parameters)
                return
            await asyncio.sleep(2)
        raise SystemExit("no retrain run within 120 s of the drift event")

asyncio.run(main())
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout} s: {log.read_text()[-3000:]}")


def test_build_features_deployment_runs_on_server_and_worker(tmp_path: Path, tiny_shop) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "recflow"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RECFLOW_"))
    } | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "RECFLOW_HOME": str(home),
        "RECFLOW_DATA__SOURCE": "generic",
        "RECFLOW_DATA__INTERACTIONS_PATH": str(tiny_shop["interactions"]),
        "RECFLOW_DATA__ITEMS_PATH": str(tiny_shop["items"]),
        "RECFLOW_DATA__NOW": "2024-06-01T00:00:00Z",
    }
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    worker = None
    try:
        _wait_healthy(api, server, server_log)

        def run(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess:
            return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)

        made = run(BIN / "prefect", "work-pool", "create", "recflow-test", "--type", "process")
        assert made.returncode == 0, made.stdout + made.stderr
        deployed = run(sys.executable, "-m", "recflow.cli", "schedule", "--pool", "recflow-test")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        for name in ("build_features/hourly", "monitor/daily", "refresh_items/daily", "retrain/on-drift", "train/weekly",
                     "deploy/manual"):
            assert name in deployed.stderr + deployed.stdout

        worker = subprocess.Popen(
            [BIN / "prefect", "worker", "start", "--pool", "recflow-test", "--limit", "1"],
            env=env, stdout=worker_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        result = run(
            BIN / "prefect", "deployment", "run", "build_features/hourly", "--watch", "--watch-timeout", "300",
            timeout=330,
        )
        assert result.returncode == 0, result.stdout + result.stderr + worker_log.read_text()[-4000:]
        assert "Completed" in result.stdout + result.stderr

        # The worker's flow run really built the store in RECFLOW_HOME.
        events = pd.read_parquet(home / "canonical" / "events.parquet")
        assert len(events) == 10
        assert (home / "feast" / "online.db").exists()

        # The monitor's drift event makes the server's automation schedule a retrain flow run.
        fired = run(sys.executable, "-c", TRIGGER_CHECK, timeout=150)
        assert fired.returncode == 0, fired.stdout + fired.stderr + server_log.read_text()[-3000:]
        assert "retrain run created" in fired.stdout
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
