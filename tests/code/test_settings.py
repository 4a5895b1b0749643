"""Settings: defaults, environment, TOML file, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from recflow.settings import Settings, load_settings


def test_defaults_and_derived_paths(make_settings, tmp_path: Path) -> None:
    s = make_settings()
    assert s.home == (tmp_path / "home").resolve()
    assert s.paths.events == s.home / "canonical" / "events.parquet"
    assert s.paths.feature_table("user_activity") == s.home / "features" / "user_activity.parquet"
    assert s.feast.online_store == "sqlite"
    assert not s.home.exists(), "building settings must not create folders"


def test_environment_overrides_nested_values(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFLOW_FEAST__ONLINE_STORE", "redis")
    monkeypatch.setenv("RECFLOW_DATA__MAX_BAD_SHARE", "0.2")
    s = make_settings()
    assert s.feast.online_store == "redis"
    assert s.data.max_bad_share == 0.2


def test_toml_file_is_read_and_env_wins(make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "custom.toml"
    cfg.write_text('[features]\nhistory_length = 7\n\n[data]\nmax_bad_share = 0.5\n')
    monkeypatch.setenv("RECFLOW_CONFIG", str(cfg))
    monkeypatch.setenv("RECFLOW_DATA__MAX_BAD_SHARE", "0.1")
    s = make_settings()
    assert s.features.history_length == 7
    assert s.data.max_bad_share == 0.1


def test_missing_config_file_is_a_clear_error(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFLOW_CONFIG", "/nonexistent/recflow.toml")
    with pytest.raises(FileNotFoundError, match="RECFLOW_CONFIG"):
        make_settings()


def test_invalid_value_names_the_field(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFLOW_DATA__MAX_BAD_SHARE", "1.5")
    with pytest.raises(ValueError, match="max_bad_share"):
        make_settings()


def test_feast_definitions_are_a_function_of_settings(make_settings, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import runpy

    from recflow.feature_definitions import build_definitions
    from recflow.feature_store import feature_repo_path

    mine = make_settings(home=tmp_path / "other", feast={"user_ttl_days": 7, "serving_service": "serve_v9"})
    defs = build_definitions(mine)
    assert defs.user_activity_source.path == str(mine.paths.feature_table("user_activity"))
    assert defs.user_activity.ttl.days == 7 and defs.serving.name == "serve_v9"
    assert build_definitions(make_settings()).user_activity_source.path != defs.user_activity_source.path
    # the plain Feast CLI's view (feature_repo/definitions.py) is the same objects, from the environment
    monkeypatch.setenv("RECFLOW_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("RECFLOW_FEAST__USER_TTL_DAYS", "7")
    monkeypatch.setenv("RECFLOW_FEAST__SERVING_SERVICE", "serve_v9")
    cli = runpy.run_path(str(feature_repo_path() / "definitions.py"))
    for obj in defs.objects():
        twin = next(v for v in cli.values() if type(v) is type(obj) and getattr(v, "name", None) == obj.name)
        assert twin == obj, obj.name
    assert isinstance(load_settings(), Settings)


def test_workers_default_to_the_usable_cores(monkeypatch) -> None:  # noqa: ANN001
    import os

    from recflow.settings import ServingSettings

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert ServingSettings().workers == 0 and ServingSettings().worker_count() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    assert ServingSettings().worker_count() == 4  # one core per worker, at most 4
    assert ServingSettings(workers=3).worker_count() == 3



def test_flow_settings_merge_overrides_over_the_environment(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import pytest

    from recflow.settings import flow_settings

    monkeypatch.setenv("RECFLOW_TRAINING__EPOCHS", "1")
    monkeypatch.setenv("RECFLOW_TRAINING__TRAIN_WEEKS", "9")
    s = flow_settings(str(tmp_path), {"training": {"train_weeks": 3}, "data": {"until": "2017-10-01T00:00:00Z"}})
    assert s.home == tmp_path
    assert s.training.train_weeks == 3  # the override wins over the environment
    assert s.training.epochs == 1  # the rest of the section still comes from the environment
    assert s.data.until is not None and s.data.until.isoformat().startswith("2017-10-01T00:00:00")
    with pytest.raises(ValueError, match="unknown settings sections \\['trainin'\\]"):
        flow_settings(None, {"trainin": {"epochs": 2}})
