"""The recflow command line: help on every command, ingest output and failures."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from recflow.cli import app

runner = CliRunner()


def _commands() -> list[str]:
    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


def test_every_command_has_help() -> None:
    commands = _commands()
    assert {"ingest", "features", "training-set", "config", "schedule", "reports"} <= set(commands)
    for name in commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


def test_ingest_generic_files(make_settings, tiny_shop, tmp_path) -> None:
    import os

    make_settings()
    env = dict(os.environ)
    result = runner.invoke(
        app,
        ["--home", str(tmp_path / "cli"), "ingest", "--interactions", str(tiny_shop["interactions"]),
         "--items", str(tiny_shop["items"])],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "canonical" / "events.parquet").exists()
    assert dict(os.environ) == env, "--home and the data options travel as settings, not through the environment"


def test_config_shows_the_home_and_data_options_given(make_settings, tiny_shop, tmp_path) -> None:
    make_settings()
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "config"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["home"] == str((tmp_path / "h").resolve())


def test_deployments_pass_the_home_to_every_flow_run(tmp_path) -> None:
    pytest.importorskip("prefect")
    from flows.deployments import deployments

    home = str(tmp_path / "shop-home")
    built = deployments(home)
    assert len(built) == 6 and all(d.parameters.get("home") == home for d in built)
    assert all("home" not in d.parameters for d in deployments())


def test_ingest_failure_exits_nonzero_with_reason(make_settings, tmp_path) -> None:
    make_settings()
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\n,x,2024-01-01\n,y,2024-01-02\nu,z,2024-01-03\n")
    result = runner.invoke(app, ["--home", str(tmp_path / "cli"), "ingest", "--interactions", str(bad)])
    assert result.exit_code == 1
    assert "missing_user_id" in result.output and "max_bad_share" in result.output


def test_config_prints_effective_settings(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    make_settings()
    monkeypatch.setenv("RECFLOW_FEAST__ONLINE_STORE", "redis")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["feast"]["online_store"] == "redis"


def test_reports_writes_the_index(make_settings, tmp_path) -> None:
    make_settings()
    result = runner.invoke(app, ["--home", str(tmp_path / "r"), "reports"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "reports" / "index.html").exists()


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    from typer.testing import CliRunner

    from recflow.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"recflow {version('recflow')}"


def test_quiet_console_sets_library_switches_unless_the_user_did(monkeypatch) -> None:  # noqa: ANN001
    import logging
    import warnings

    from recflow.console import LIBRARY_SWITCHES, quiet_libraries

    for name in LIBRARY_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DEBUG")  # the user's own choice
    feast = logging.getLogger("feast")
    monkeypatch.setattr(feast, "level", logging.NOTSET)
    with warnings.catch_warnings():
        quiet_libraries()
        import os

        assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "DEBUG", "a user's setting wins"
        assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        assert feast.level == logging.WARNING
        # Ray's "token auth is enabled" notice is dropped, its "disabled" warning (asks for action) is not
        ray_auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        seen: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record.getMessage())

        keep = Keep()
        ray_auth.addHandler(keep)
        try:
            ray_auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
            ray_auth.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        finally:
            ray_auth.removeHandler(keep)
        assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with network access ..."]
    assert "--verbose" in runner.invoke(app, ["--help"]).output


def test_progress_without_a_terminal_prints_rate_limited_plain_lines() -> None:
    """In a log file (no terminal) rich shows its bars only when done; the plain sink prints a line
    per new stage or step, repeats an unchanged step at most every 30 s, and says when one is done."""
    from recflow.cli import PLAIN_PROGRESS_EVERY_S, plain_progress_sink

    now = [100.0]
    lines: list[str] = []
    sink = plain_progress_sink(lines.append, clock=lambda: now[0])
    sink("train", 0, 5, "ranker: fitting")
    now[0] += 1
    sink("train", 1, 5, "ranker: fitting")  # same step within the interval: quiet
    assert len(lines) == 1 and "train" in lines[0] and "ranker: fitting (0/5)" in lines[0]
    now[0] += PLAIN_PROGRESS_EVERY_S
    sink("train", 3, 5, "ranker: fitting")  # the interval passed: the count again
    assert len(lines) == 2 and lines[1].endswith("(3/5)") and lines[1].startswith("[    31s]")
    sink("features", None, None, "")  # a new stage, no counts: its name
    sink("train", 5, 5, "ranker: fitting")  # done: always shown
    assert lines[2].split()[-1] == "features" and lines[3].endswith("(5/5)")
