"""Secure defaults: generated secrets, token checks, auth settings, masking, no server paths in answers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recflow import security
from recflow.cli import app


def test_secret_file_is_created_private_and_reused(make_settings) -> None:
    settings = make_settings()
    value, path, created = security.secret_file(settings, "k")
    assert created and value and len(value) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, _, created_again = security.secret_file(settings, "k")
    assert again == value and not created_again
    assert [p.name for p in path.parent.iterdir()] == ["k"], "no temporary file left behind"
    assert security.secret_file(settings, "missing", create=False)[0] is None


def test_secret_file_readable_by_others_is_refused(make_settings) -> None:
    settings = make_settings()
    _, path, _ = security.secret_file(settings, "k")
    path.chmod(0o644)
    with pytest.raises(security.InsecureSecret, match="chmod 600"):
        security.secret_file(settings, "k")
    path.chmod(0o600)
    path.parent.chmod(0o755)
    with pytest.raises(security.InsecureSecret, match="chmod 700"):
        security.secret_file(settings, "k")


def test_serving_token_prefers_the_setting_then_the_file(make_settings) -> None:
    settings = make_settings()
    assert security.serving_token(settings) is None and security.auth_headers(settings) == {}
    generated = security.serving_token(settings, create=True)
    assert generated and security.token_path(settings).read_text().strip() == generated
    assert security.auth_headers(settings) == {"Authorization": f"Bearer {generated}"}
    configured = make_settings(serving={"token": "from-settings"})
    assert security.serving_token(configured) == "from-settings"


def test_auth_disabled_only_on_loopback(make_settings) -> None:
    from serving.launcher import prepare_auth

    open_settings = make_settings(serving={"auth_disabled": True})
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        security.check_auth_setting(open_settings, host)
    for host in ("0.0.0.0", "10.1.2.3", "example.org"):
        with pytest.raises(ValueError, match="auth_disabled=true is refused on host"):
            security.check_auth_setting(open_settings, host)
    assert "every endpoint is open" in prepare_auth(open_settings, "127.0.0.1")
    assert not security.token_path(open_settings).exists()
    line = prepare_auth(make_settings(), "0.0.0.0")  # with auth, any host
    token = security.serving_token(make_settings())
    assert "created" in line and str(security.token_path(make_settings())) in line and token not in line
    assert "reused" in prepare_auth(make_settings(), "127.0.0.1")


def test_runtime_checks_write_and_read_tokens(make_settings) -> None:
    from serving.runtime import Runtime

    rt = Runtime(make_settings(serving={"token": "w"}))
    rt._resolve_auth()  # noqa: SLF001
    assert rt.write_token == "w" and rt.read_token is None
    assert rt.authorised("Bearer w", write=True) and rt.authorised("bearer w ", write=True)
    assert not rt.authorised("", write=True) and not rt.authorised("Bearer x", write=True)
    assert not rt.authorised("Basic w", write=True)
    assert rt.authorised("", write=False), "reads are open without a read token"
    rt = Runtime(make_settings(serving={"token": "w", "read_token": "r"}))
    rt._resolve_auth()  # noqa: SLF001
    assert rt.authorised("Bearer r", write=False) and rt.authorised("Bearer w", write=False)
    assert not rt.authorised("", write=False) and not rt.authorised("Bearer r", write=True)
    rt = Runtime(make_settings())  # nothing configured: the home's generated token
    rt._resolve_auth()  # noqa: SLF001
    assert rt.write_token == security.serving_token(rt.settings) and rt.authorised(f"Bearer {rt.write_token}", write=True)
    with pytest.raises(ValueError, match="refused on host"):
        Runtime(make_settings(serving={"auth_disabled": True, "host": "0.0.0.0"}))._resolve_auth()  # noqa: SLF001


def test_config_masks_secrets(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    make_settings()
    monkeypatch.setenv("RECFLOW_SERVING__TOKEN", "s3cret-token")
    monkeypatch.setenv("RECFLOW_SERVING__READ_TOKEN", "s3cret-read")
    monkeypatch.setenv("RECFLOW_FEAST__REDIS_CONNECTION_STRING", "redis:6379,password=s3cret-pw")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    shown = json.loads(result.output)
    assert shown["serving"]["token"] == "**********" and shown["feast"]["redis_connection_string"] == "**********"


def test_the_service_gets_its_settings_in_a_private_file_not_the_environment(make_settings, monkeypatch) -> None:  # noqa: ANN001
    """`recflow serve` writes the resolved settings, real secrets included, to <home>/secrets (0600) and
    names the file on the command line; the child's environment carries no RECFLOW_* variable, and the
    file loads back to the same settings even when the environment says otherwise."""
    import stat

    from recflow.feature_store import redis_connection
    from recflow.settings import load_snapshot
    from serving.launcher import _command, bento_env, service_env, settings_file

    settings = make_settings(serving={"token": "w", "read_token": "r", "default_k": 7},
                             feast={"online_store": "redis", "redis_connection_string": "h:1,password=p"})
    monkeypatch.setenv("RECFLOW_SERVING__DEFAULT_K", "99")
    path = settings_file(settings, 4321)
    assert path.parent == settings.paths.secrets and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = load_snapshot(path)
    assert loaded == settings and loaded.serving.default_k == 7
    assert loaded.serving.token.get_secret_value() == "w" and loaded.serving.read_token.get_secret_value() == "r"
    assert loaded.feast.redis_connection_string.get_secret_value() == "h:1,password=p"
    env = service_env(settings)
    assert not [k for k in env if k.startswith("RECFLOW_")] and env["BENTOML_HOME"] == str(settings.paths.bentoml_home)
    cmd = _command("127.0.0.1", 4321, path)
    assert cmd[-2:] == ["--arg", f"settings_file={path}"] and not any("=w" in c or "password" in c for c in cmd)
    # a bento on its own (a container) is configured by its environment: real values there
    benv = bento_env(settings)
    assert benv["RECFLOW_SERVING__TOKEN"] == "w" and benv["RECFLOW_FEAST__REDIS_CONNECTION_STRING"] == "h:1,password=p"
    assert "RECFLOW_SERVING__TOKEN" not in bento_env(make_settings()), "a generated token stays in its file"
    assert redis_connection(settings) == "h:1,password=p,socket_timeout=2.0,socket_connect_timeout=2.0"
    own = make_settings(feast={"redis_connection_string": "h:1,socket_timeout=9"})
    assert redis_connection(own) == "h:1,socket_timeout=9,socket_connect_timeout=2.0"


def test_redact_removes_server_paths(tmp_path: Path) -> None:
    from recflow.settings import load_settings

    settings = load_settings(home=tmp_path / "home")
    text = (f"serving.model_path={settings.home}/models/x is not a model; see /usr/lib/python3/x.py "
            "and /etc/passwd, POST /feedback/batch or /reload")
    out = security.redact(text, settings)
    assert str(tmp_path) not in out and "/usr/lib" not in out and "/etc/passwd" not in out
    assert "<home>/models/x" in out and "/feedback/batch" in out and "/reload" in out
    assert os.sep + "etc" not in security.redact("open /etc/x/y failed")
