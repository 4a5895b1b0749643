"""Run the service locally and build a bento: what ``recflow serve`` / ``recflow deploy`` call.

- :func:`serve` runs ``bentoml serve serving.service:Recommender`` in the foreground.
- :func:`start_local` starts it in a child process on 127.0.0.1 (tests, benchmarks), waits until
  it listens (and, by default, until ``/readyz`` is 200) and stops it on exit.
- :func:`build_bento` packages the service with a model from the BentoML model store (the
  champion by default) into a bento, offline.

The service process gets the settings it was started with as a file, not through the environment:
:func:`settings_file` writes them (secrets included, mode 0600) to ``<home>/secrets/service-<port>.json``
and ``bentoml serve --arg settings_file=...`` names it; the service loads it once
(:func:`recflow.settings.load_snapshot`). The environment carries only the libraries' own variables
(``BENTOML_HOME`` under the recflow home, never ``~/bentoml``; thread counts; offline switches). A built
bento, which runs without this launcher, reads the environment and TOML file instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recflow.settings import Settings

SERVICE = "serving.service:Recommender"
ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = Path(__file__).resolve().parent / "bentofile.yaml"


def service_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a service process: the caller's, plus the libraries' own variables (BentoML's
    home and worker count, thread counts, offline switches). The recflow settings travel in the
    :func:`settings_file` instead; the caller's ``RECFLOW_*`` variables are left out so that nothing
    but that file decides them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFLOW_")}
    env["BENTOML_HOME"] = str(settings.paths.bentoml_home)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", str(settings.serving.torch_threads))
    env.setdefault("OPENBLAS_NUM_THREADS", str(settings.serving.torch_threads))
    env.setdefault("MKL_NUM_THREADS", str(settings.serving.torch_threads))
    workers = settings.serving.worker_count()
    if workers > 1:  # the service's decorator says 1; BentoML merges this override into it
        override = f"services.recflow.workers={workers}"
        env["BENTOML_CONFIG_OPTIONS"] = " ".join(filter(None, [env.get("BENTOML_CONFIG_OPTIONS"), override]))
    env.update(extra or {})
    return env


def bento_env(settings: Settings) -> dict[str, str]:
    """Environment for a built bento served on its own (``bentoml serve <bento>``, a container): the
    :func:`service_env` variables plus the home, Feast, serving and feature settings as ``RECFLOW_*``
    variables, secrets in plain text. A container's settings arrive this way (or in its TOML file);
    ``recflow serve`` uses the :func:`settings_file` instead."""
    from recflow.settings import snapshot

    env = service_env(settings)
    env["RECFLOW_HOME"] = str(settings.home)
    values = snapshot(settings)
    for section in ("feast", "serving", "features"):
        for name, value in values[section].items():
            if value is not None:
                key = f"RECFLOW_{section.upper()}__{name.upper()}"
                env[key] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


def settings_file(settings: Settings, port: int) -> Path:
    """Write the settings a service on ``port`` runs with to ``<home>/secrets/service-<port>.json``
    (folder 0700, file 0600; secrets in plain text, which is why it lives there)."""
    from recflow.security import secrets_dir
    from recflow.settings import write_snapshot

    return write_snapshot(settings, secrets_dir(settings) / f"service-{port}.json")


def _command(host: str, port: int, settings_path: Path) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--arg", f"settings_file={settings_path}"]


def prepare_auth(settings: Settings, host: str) -> str:
    """Check the auth settings for ``host`` and make sure a write token exists; returns a line for the
    operator saying where the token is (never the token). Raises ``ValueError`` for auth_disabled on a
    host other than loopback."""
    from recflow.security import check_auth_setting, reveal, secret_file, token_path

    check_auth_setting(settings, host)
    if settings.serving.auth_disabled:
        return f"WARNING: serving.auth_disabled=true: every endpoint is open (allowed on loopback {host} only)"
    if reveal(settings.serving.token):
        return "write token: serving.token (from your settings)"
    _, path, created = secret_file(settings, token_path(settings).name)
    return (f"write token {'created' if created else 'reused'}: {path} (mode 0600); clients send "
            "'Authorization: Bearer <its contents>' to /feedback, /feedback/batch and /reload")


def serve(settings: Settings, port: int | None = None, host: str | None = None,
          say: Callable[[str], None] = print) -> int:
    """Run the service in the foreground until interrupted (``recflow serve``); returns its exit code."""
    host = host or settings.serving.host
    port = settings.serving.port if port is None else port
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"host": host})})
    say(prepare_auth(settings, host))
    settings.paths.bentoml_home.mkdir(parents=True, exist_ok=True)
    path = settings_file(settings, port)
    try:
        return run_forwarding_signals(_command(host, port, path), env=service_env(settings), cwd=ROOT)
    finally:
        path.unlink(missing_ok=True)


def run_forwarding_signals(cmd: list[str], *, env: dict[str, str], cwd: Path, grace_s: float = 20.0) -> int:
    """Run ``cmd`` until it exits; SIGTERM, SIGINT and SIGHUP sent to this process are forwarded to it
    (the BentoML arbiter, which stops its workers), and no process it started outlives this call:
    the workers run in sessions of their own, so their ids are recorded while it runs, and any left
    after it exits get ``grace_s`` seconds, then SIGKILL. A server still running ``grace_s`` seconds
    after a forwarded SIGTERM or SIGINT is killed with everything it started. Returns the exit code
    (128 + the signal number when a signal ended it)."""
    import signal

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    seen: dict[int, str] = {}
    asked: dict[str, float] = {}  # the last forwarded stop signal and when it was sent

    def forward(signum: int, _frame: object) -> None:
        seen.update(descendants(proc.pid))
        if signum != signal.SIGHUP:
            asked.update(signum=float(signum), at=time.monotonic())
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    forced = False
    try:
        while proc.poll() is None:
            seen.update(descendants(proc.pid))
            if asked and time.monotonic() - asked["at"] > grace_s:
                # a stop was asked for and the server has not stopped within the grace period:
                # a stuck worker must not keep the command (and its port) alive
                print(f"recflow serve: the service did not stop within {grace_s:.0f} s of the signal; killing it",
                      file=sys.stderr, flush=True)
                seen.update(descendants(proc.pid))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                forced = True
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(proc)  # only acts when this call is being unwound by an exception
        _reap(seen, 0.0 if forced else grace_s)
    code = proc.returncode
    if forced:
        return 128 + int(asked["signum"])  # ended because of the signal the caller sent
    return 128 - code if code < 0 else code


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (None when gone or a zombie): tells a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid``, with its start time (Linux ``/proc``; {} elsewhere)."""
    root = Path("/proc")
    if not root.is_dir():
        return {}
    children: dict[int, list[int]] = {}
    for entry in root.iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        started = _start_time(child)
        if started is not None:
            out[child] = started
        todo.extend(children.get(child, []))
    return out


def _reap(pids: dict[int, str], grace_s: float) -> None:
    """Wait up to ``grace_s`` for the recorded processes to exit, then SIGKILL what is left."""
    import signal

    def alive() -> list[int]:
        return [p for p, started in pids.items() if _start_time(p) == started]

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # a SIGKILLed process is gone once the kernel has torn it down
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class LocalService:
    """A service started by :func:`start_local`."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_ready(url: str, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None,
               workers: int = 1) -> None:
    """Block until the service is ready (raise TimeoutError / RuntimeError): ``GET url/readyz`` answers
    200, or, with several worker processes, ``/status`` says ready from ``workers`` distinct ones."""
    import httpx

    deadline = time.monotonic() + timeout
    ready_pids: set[int] = set()
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"service exited with code {process.returncode} before it was ready")
        try:
            if workers <= 1:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            else:  # a new connection per call, so the kernel can hand it to any worker
                body = httpx.post(f"{url}/status", json={}, timeout=2).json()
                if body.get("ready"):
                    ready_pids.add(int(body["worker_pid"]))
                if len(ready_pids) >= workers:
                    return
                time.sleep(0.05)
                continue
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    what = f"{len(ready_pids)} of {workers} workers ready" if workers > 1 else "/readyz not 200"
    raise TimeoutError(f"{url}: {what} after {timeout:.0f} s")


@contextmanager
def start_local(
    settings: Settings,
    port: int | None = None,
    *,
    ready: bool = True,
    timeout: float = 180.0,
    log_path: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LocalService]:
    """Run the service on 127.0.0.1 in a child process for the duration of the block."""
    from recflow.local_services import free_port, wait_for_port

    port = port or free_port()
    prepare_auth(settings, "127.0.0.1")
    settings.paths.bentoml_home.mkdir(parents=True, exist_ok=True)
    log_path = log_path or settings.home / f"serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        path = settings_file(settings, port)
        proc = subprocess.Popen(_command("127.0.0.1", port, path), env=service_env(settings, extra_env), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        service = LocalService(f"http://127.0.0.1:{port}", port, proc, log_path)
        try:
            wait_for_port(port, timeout=timeout, proc=proc)
            if ready:
                wait_ready(service.url, timeout=timeout, process=proc, workers=settings.serving.worker_count())
            yield service
        except BaseException:
            sys.stderr.write(f"--- service log ({log_path}) ---\n{service.log_text()[-4000:]}\n")
            raise
        finally:
            _stop(proc)
            path.unlink(missing_ok=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is not None:
        return
    children = descendants(proc.pid)  # workers run in sessions of their own: not in the group
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the arbiter, which stops its workers
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    _reap(children, 10.0)


def import_model_folder(settings: Settings, folder: Path, name: str | None = None,
                        metadata: dict[str, Any] | None = None) -> str:
    """Copy a saved model folder into the BentoML model store (under the recflow home); returns its tag."""
    import shutil

    import bentoml

    from recflow.registry import model_store

    store = model_store(settings)  # by path: whatever BENTOML_HOME bentoml saw
    name = name or settings.training.model_name
    with bentoml.models.create(name, metadata=metadata or {"source": str(folder)}, _model_store=store) as entry:
        shutil.copytree(folder, entry.path, dirs_exist_ok=True)
    return str(entry.tag)


def build_bento(settings: Settings, model_tag: str | None = None, version: str | None = None) -> str:
    """Build a bento from ``serving/bentofile.yaml`` with ``model_tag`` packed in; returns the bento tag.

    ``model_tag`` defaults to the registry's champion, or, when ``serving.model_path`` is set, that
    folder imported into the model store. Offline: the bento carries the code, the Feast
    definitions and the model (whose folder holds the text encoder and tokenizer); the pinned
    packages of ``serving/requirements.txt`` are installed when it is containerised. The bento
    serves ``model_tag`` (``RECFLOW_SERVING__MODEL_TAG``).
    """
    settings.paths.bentoml_home.mkdir(parents=True, exist_ok=True)
    if model_tag is None:
        if settings.serving.model_path is not None:
            model_tag = import_model_folder(settings, settings.serving.model_path)
        else:
            from recflow import registry

            pointer = registry.get_champion(settings)
            if not pointer:
                raise FileNotFoundError("no champion model: run `recflow train` first, or pass a model tag")
            model_tag = str(pointer["tag"])
    # A child process, so that bentoml reads BENTOML_HOME (under the recflow home) when it is first imported.
    cmd = [sys.executable, "-m", "serving.launcher", "build", model_tag, *([version] if version else [])]
    done = subprocess.run(cmd, env=service_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bento build failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def _build(model_tag: str, version: str | None = None) -> str:
    """Build the bento in this process (BENTOML_HOME must already be set); returns its tag."""
    import tempfile

    import bentoml
    import yaml

    config = yaml.safe_load(BENTOFILE.read_text())
    config["models"] = [model_tag]
    config["envs"] = [*config.get("envs", []), {"name": "RECFLOW_SERVING__MODEL_TAG", "value": model_tag}]
    config["labels"] = {**config.get("labels", {}), "model": model_tag.replace(":", "_")}
    with tempfile.TemporaryDirectory() as tmp:
        bentofile = Path(tmp) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(config, sort_keys=False))
        bento = bentoml.bentos.build_bentofile(str(bentofile), version=version, build_ctx=str(ROOT))
    return str(bento.tag)


if __name__ == "__main__":  # the child process of build_bento
    if len(sys.argv) < 3 or sys.argv[1] != "build":
        sys.exit("usage: python -m serving.launcher build MODEL_TAG [VERSION]")
    print(_build(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
