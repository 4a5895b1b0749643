"""`recflow serve` forwards SIGTERM and SIGINT to the `bentoml serve` child and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recflow.local_services import free_port, wait_for_port
from serving.launcher import ROOT, _start_time, descendants

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_forwards_the_signal_and_leaves_no_child(tmp_path, sig) -> None:  # noqa: ANN001
    if not Path("/proc").is_dir():
        pytest.skip("needs Linux /proc to find the child processes")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFLOW_")}
    # No model: the service starts live (not ready), which is all this test needs.
    env |= {"RECFLOW_SERVING__MODEL_PATH": str(tmp_path / "no-model"), "RECFLOW_SERVING__LOAD_RETRY_S": "60"}
    cmd = [sys.executable, "-m", "recflow.cli", "--home", str(tmp_path / "home"), "serve", "--port", str(port)]
    log = (tmp_path / "serve.log").open("wb")
    cli = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    tree: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while len(tree := descendants(cli.pid)) < 2 and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the `bentoml serve` arbiter and its worker (in a session of its own)
        assert len(tree) >= 2, tree
        wait_for_port(port, timeout=120, proc=cli)
        tree = descendants(cli.pid)
        cli.send_signal(sig)
        code = cli.wait(timeout=60)
        out = (tmp_path / "serve.log").read_text(errors="replace")
        assert code in (0, 128 + sig), (code, out[-3000:])  # a graceful stop, or ended by the signal
        assert "write token created" in out and "serving_token" in out, out[-3000:]
        left = [p for p, started in tree.items() if _start_time(p) == started]
        assert not left, f"left behind: {left}"
    finally:
        if cli.poll() is None:
            cli.kill()
        log.close()
        for pid, started in tree.items():  # never leave a server behind, even when the test fails
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
