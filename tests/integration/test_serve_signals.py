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


def _kill_all(cli: subprocess.Popen, tree: dict[int, str]) -> None:
    """Never leave a server behind, even when a test fails: the CLI and every recorded descendant."""
    if cli.poll() is None:
        cli.kill()
    for pid, started in tree.items():
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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
        _kill_all(cli, tree)
        log.close()


def _slow_two_stage(settings, model):  # noqa: ANN001, ANN202
    """A two-stage model whose ranker has 600 trees: compiling them (serving.compile_ranker, empty
    cache) keeps a worker loading for tens of seconds, which is the start-up a signal must cut short."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from recflow.ranker import Ranker, RankerConfig, TwoStage
    from recflow.ranker.log import PurchaseLog
    from recflow.ranker.model import FEATURES, TEXT_FEATURES
    from training.ranker import ItemInputs, item_side_at

    features = tuple(f for f in FEATURES if f not in TEXT_FEATURES)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, len(features))).astype(np.float32)
    y = (x[:, 0] + x[:, 1] + rng.normal(size=3000) > 0).astype(float)
    cfg = RankerConfig(features=features, objective="binary", max_rounds=600, min_data_in_leaf=5, threads=1)
    booster = lgb.train(cfg.lgb_params(), lgb.Dataset(x, y, feature_name=list(features)), num_boost_round=600)
    ids = pd.Index(list(model.item_ids))
    log = PurchaseLog.from_events(pd.read_parquet(settings.paths.events), ids)
    now = int(pd.Timestamp("2024-05-20T12:00:00Z").value // 10**9)
    return TwoStage(Ranker(cfg, booster), item_side_at(log, now, ItemInputs(), neighbors=10), ids.to_numpy())


def test_a_worker_still_loading_its_model_stops_at_once_on_sigterm(tiny_features, shop_model, tmp_path) -> None:  # noqa: ANN001
    """uvicorn acts on SIGTERM only once start-up ends, and start-up waits for the first model load
    (load, compile, prefill): the service's stop signals end that wait, so `recflow serve` asked to stop
    while its worker compiles 600 trees (tens of seconds here) exits in seconds and leaves nothing."""
    if not Path("/proc").is_dir():
        pytest.skip("needs Linux /proc to find the child processes")
    from recflow import registry
    from tests.integration.test_serving import _online

    settings = tiny_features
    _online(settings)
    model = shop_model(settings)
    tag = registry.register(settings, model, {"note": "slow to compile"}, two_stage=_slow_two_stage(settings, model))
    registry.set_champion(settings, tag, "test")
    port = free_port()
    env = dict(os.environ) | {"RECFLOW_SERVING__WORKERS": "1"}
    cmd = [sys.executable, "-m", "recflow.cli", "--home", str(settings.home), "serve", "--port", str(port)]
    log = (tmp_path / "serve.log").open("wb")
    cli = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    tree: dict[int, str] = {}
    try:
        cache = settings.paths.cache / "lleaves"  # the compile writes the model text first, the object last
        deadline = time.monotonic() + 120
        while not list(cache.glob("*.txt")) and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(cache.glob("*.txt")), "the worker never started compiling"
        time.sleep(2.0)  # well inside the compile
        assert not list(cache.glob("*.o")), "the compile already ended: the test proves nothing"
        tree = descendants(cli.pid)
        t0 = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        code = cli.wait(timeout=60)
        took = time.monotonic() - t0
        out = (tmp_path / "serve.log").read_text(errors="replace")
        assert code in (0, 128 + signal.SIGTERM), (code, out[-3000:])
        assert took < 10.0, f"stopping took {took:.1f} s: the start-up wait did not end on the signal\n{out[-3000:]}"
        left = [p for p, started in tree.items() if _start_time(p) == started]
        assert not left, f"left behind: {left}"
    finally:
        _kill_all(cli, tree)
        log.close()
