"""A real Ray head node (``ray start --head``) and a 2-trial search that joins it through ``RAY_ADDRESS``.

The search runs in a child process with ``RAY_ADDRESS`` in its environment, as ``recflow train``
would on an operator's machine, so nothing Ray set up earlier in the pytest process (a local
instance, cached auth settings) can stand in for the cluster. The head uses token authentication
with a token in its own temp folder, as a shared cluster should. It is stopped by signalling the
``ray start --block`` process that owns it (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recflow.local_services import free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The driver: the user's code path (training.tune.run_search), with a spy on ray.init that records
# which cluster it joined. Prints one JSON line.
DRIVER = """
import json, os, sys
import ray
from ray import tune
from training.synthetic import synthetic_data
from training.trainer import TrainConfig
from training.tune import TuneConfig, run_search

seen = {}
real_init = ray.init

def spy(*args, **kwargs):
    ctx = real_init(*args, **kwargs)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    seen.update(address=kwargs.get("address"), gcs=ray.get_runtime_context().gcs_address,
                cpus=ray.cluster_resources().get("CPU"), node_ips=[n["NodeManagerAddress"] for n in nodes],
                sockets=[n["ObjectStoreSocketName"] for n in nodes])
    return ctx

ray.init = spy
data, _ = synthetic_data(n_users=30, n_items=60, train_weeks=4)
tc = TuneConfig(
    trials=2, max_minutes=3, epochs=1, cpus_per_trial=1, num_cpus=1, storage_path=sys.argv[1],
    searcher="random", base=TrainConfig(batch_size=16, n_uniform=16, hidden=16),
    search_space={"dim": tune.choice([8, 16]), "history_length": 100},
)
out = run_search(data, tc)
print(json.dumps({"seen": seen, "trials": out.trials, "metrics": out.metrics, "checkpoint": out.checkpoint,
                  "driver_pid": os.getpid(), "initialized_after": ray.is_initialized()}, default=str))
"""


@dataclass
class RayHead:
    """A head node started by :func:`ray_head`."""

    address: str
    temp_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]


def _stop_head(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the ``ray start --block`` process (it shuts down its node), then kill its group's leftovers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=10)


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """``ray start --head`` on a free port, 2 CPUs, no dashboard; stopped afterwards.

    Ray's own servers bind every interface and advertise the host's IP even for 127.0.0.1 (it maps
    loopback to a reachable address), so the node is protected by token authentication instead.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = free_port()
    log = temp_dir / "head.log"
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
        "--num-gpus=0", "--include-dashboard=false", f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, timeout=90, proc=proc)
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield RayHead(f"127.0.0.1:{port}", temp_dir, env, proc)
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_two_trial_search_runs_on_the_given_cluster(ray_head: RayHead, tmp_path: Path) -> None:
    storage = tmp_path / "ray_results"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = ray_head.env | {"RAY_ADDRESS": ray_head.address, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(driver), str(storage)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    # ray.init joined the head node given in RAY_ADDRESS, not a new local instance: the cluster has the
    # head's 2 CPUs (a local Ray would have num_cpus=1) and its object store lives in the head's temp dir.
    seen = out["seen"]
    assert seen["address"] == ray_head.address
    assert seen["gcs"].rsplit(":", 1)[1] == ray_head.address.rsplit(":", 1)[1]
    assert seen["cpus"] == 2.0 and len(seen["node_ips"]) == 1
    assert all(s.startswith(str(ray_head.temp_dir)) for s in seen["sockets"]), seen["sockets"]
    assert out["initialized_after"] is False, "run_search disconnects the driver it connected"

    # Both trials finished an epoch, on the head node, in worker processes of the cluster.
    assert len(out["trials"]) == 2 and all(t["error"] is None for t in out["trials"]), out["trials"]
    assert 0.0 <= out["metrics"]["ndcg@10"] <= 1.0 and Path(out["checkpoint"]).is_dir()
    results = [json.loads(p.read_text().strip().splitlines()[-1]) for p in storage.rglob("result.json")]
    assert len(results) == 2
    assert {r["node_ip"] for r in results} == set(seen["node_ips"])
    assert out["driver_pid"] not in {r["pid"] for r in results}
    # Ray names a worker's log worker-<worker id>-<job id>-<pid>.out in its node's session folder.
    worker_pids = {int(p.stem.rsplit("-", 1)[1]) for p in ray_head.temp_dir.glob("session_*/logs/worker-*.out")}
    assert {r["pid"] for r in results} <= worker_pids, "the trials ran in worker processes of the head node"
