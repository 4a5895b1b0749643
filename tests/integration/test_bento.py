"""The bento of the tiny champion: its manifest, a self-contained export, and ``bentoml serve <tag>``.

``tests/integration/test_serving.py`` covers the endpoints of the service run from source; this
file covers what ``recflow deploy`` ships. The bento is exported (the archive ``bentoml
containerize`` and ``bentoml push`` work from), imported into an empty BentoML home, and served
from there with the Hugging Face offline switches unset and every HTTP(S) proxy pointing at a dead
port, so a start-up that needed the model's text encoder from anywhere but the bento would fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from safetensors import safe_open

from recflow import feature_store as fs
from recflow.local_services import free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
DEAD_PROXY = "http://127.0.0.1:9"  # discard port: nothing answers


def _bentoml(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "bentoml", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"bentoml {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@contextlib.contextmanager
def _serve(tag: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """``bentoml serve <tag>`` on 127.0.0.1 and a free port; yields its URL; stops its process group."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_port(port, timeout=180, proc=proc)
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        sys.stderr.write(f"--- bentoml serve log ---\n{log.read_text(errors='replace')[-4000:]}\n")
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _wait_ready(client: httpx.Client, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if client.get("/readyz").status_code == 200:
                return
        time.sleep(0.3)
    status = client.post("/status", json={}).text
    raise TimeoutError(f"/readyz not 200 after {timeout:.0f} s; /status: {status}")


@pytest.mark.timeout(420)
def test_bento_manifest_export_and_serve(tiny_champion, tmp_path: Path) -> None:  # noqa: ANN001
    from serving.launcher import bento_env, build_bento

    settings, model_tag = tiny_champion
    store = fs.get_store(settings)
    fs.apply(settings, store)
    fs.materialize(settings, *fs.default_window(settings), store=store)

    bento_tag = build_bento(settings)
    name, version = bento_tag.split(":")
    folder = settings.paths.bentoml_home / "bentos" / name / version
    manifest = yaml.safe_load((folder / "bento.yaml").read_text())

    # The manifest: the service, the champion packed in and served by tag, offline switches, pinned requirements.
    assert manifest["service"] == "serving.service:Recommender" and manifest["name"] == "recflow"
    assert [m["tag"] for m in manifest["models"]] == [model_tag]
    envs = {e["name"]: e["value"] for e in manifest["envs"]}
    assert envs["RECFLOW_SERVING__MODEL_TAG"] == model_tag
    assert envs["HF_HUB_OFFLINE"] == "1" and envs["TRANSFORMERS_OFFLINE"] == "1"
    routes = {r["route"] for r in manifest["schema"]["routes"]}
    assert {"/recommend", "/similar", "/search", "/feedback", "/reload", "/status"} <= routes
    requirements = (folder / "env" / "python" / "requirements.txt").read_text().splitlines()
    for pin in ("bentoml==1.4.39", "torch==2.13.0", "transformers==5.23.0", "feast[duckdb,redis]==0.67.0",
                "lightgbm==4.7.0", "scipy==1.17.1", "lleaves==1.3.0", "llvmlite==0.44.0"):  # the two-stage ranker
        assert pin in requirements, pin
    constraints = set((ROOT / "constraints.txt").read_text().splitlines())
    assert all(r in constraints for r in requirements if "==" in r and not r.startswith(("feast[", "#"))), \
        "serving/requirements.txt pins a version constraints.txt does not"
    assert not any(r.split("==")[0] in ("ray", "ray[tune]", "prefect", "evidently") for r in requirements)
    assert manifest["image"]["python_version"] == "3.11"
    src = folder / "src"
    for needed in ("serving/service.py", "serving/serving_state.py", "recflow/settings.py", "recflow/modeling/io.py",
                   "feature_repo/feature_store.yaml", "recflow/feature_definitions.py"):
        assert (src / needed).is_file(), needed
    assert not (src / "tests").exists() and not (src / "training").exists() and not list(src.rglob("*.pyc"))

    # The exported archive carries the model: weights with the text encoder, and the tokenizer.
    env = bento_env(settings)  # a bento on its own (a container) is configured by its environment
    archive = tmp_path / "recflow.bento"
    _bentoml(env, "export", bento_tag, str(archive))
    model_name, model_version = model_tag.split(":")
    prefix = f"models/{model_name}/{model_version}/"
    with tarfile.open(archive) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        assert {"bento.yaml", f"{prefix}model.yaml", f"{prefix}config.json", f"{prefix}catalogue.json"} <= set(members)
        assert any(m.startswith(f"{prefix}tokenizer/") for m in members), sorted(members)
        reader = tar.extractfile(members[f"{prefix}model.safetensors"])
        assert reader is not None
        (tmp_path / "model.safetensors").write_bytes(reader.read())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert any(k.startswith("encoder.") for k in keys) and "text_emb" in keys

    # Imported into an empty BentoML home, served from there without network: 200 on /recommend.
    fresh = tmp_path / "fresh_bentoml"
    serve_env = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | {
        "BENTOML_HOME": str(fresh), "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY,
        "https_proxy": DEAD_PROXY, "ALL_PROXY": DEAD_PROXY, "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    _bentoml(serve_env, "import", str(archive))
    assert (fresh / "models" / model_name / model_version / "model.safetensors").is_file()
    (tmp_path / "run").mkdir()
    with _serve(bento_tag, serve_env, tmp_path / "run" / "serve.log") as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        _wait_ready(client)
        status = client.post("/status", json={}).json()
        assert status["ready"] and status["model_version"] == model_tag, status
        # Loaded from the model packed into the bento; /status names the source and tag, never a server path.
        assert status["model_source"] == f"bento:{model_tag}", status
        assert str(fresh) not in json.dumps(status)
        r = client.post("/recommend", json={"user_id": "a", "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == model_tag and len(body["items"]) == 3
        assert body["fallback"] is False and body["degraded"] is False, body
