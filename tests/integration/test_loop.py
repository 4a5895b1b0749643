"""The closed loop end to end on a small synthetic shop: ``recflow demo``'s code path.

features -> train (Ray Tune, 1 trial) -> deploy (bento) -> serve (a real service process) -> replay a
week through /recommend and /feedback -> monitor (Evidently) -> drift -> incremental retrain with
the gate -> promotion and /reload -> next-week evaluation. Then: a retrain whose gate cannot be met
is rejected and leaves the champion alone, and ``recflow rollback`` restores the first model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def synthetic_shop_files(tmp_path: Path) -> dict[str, Path]:
    from training.synthetic import synthetic_shop

    events, items = synthetic_shop(n_users=60, n_items=120, days=84, seed=0, start="2024-01-01")
    folder = tmp_path / "shop"
    folder.mkdir()
    paths = {"interactions": folder / "interactions.csv", "items": folder / "items.csv"}
    events.rename(columns={"event_timestamp": "timestamp"}).to_csv(paths["interactions"], index=False)
    items[["item_id", "title"]].assign(category=[f"c{i % 5}" for i in range(len(items))]).to_csv(paths["items"], index=False)
    return paths


def test_closed_loop(make_settings, synthetic_shop_files, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: ANN001
    from demo.closed_loop import run_demo
    from flows.retrain import retrain
    from recflow import registry
    from recflow.cli import app

    env = {
        "RECFLOW_DATA__SOURCE": "generic",
        "RECFLOW_DATA__INTERACTIONS_PATH": str(synthetic_shop_files["interactions"]),
        "RECFLOW_DATA__ITEMS_PATH": str(synthetic_shop_files["items"]),
        "RECFLOW_DATA__NOW": "2024-04-01T00:00:00Z",
        "RECFLOW_DEMO__REPLAY_FROM": "2024-03-04",
        "RECFLOW_DEMO__REPLAY_DAYS": "7",
        "RECFLOW_DEMO__TRAIN_WEEKS": "4",
        "RECFLOW_DEMO__TRIALS": "1",
        "RECFLOW_DEMO__MAX_MINUTES": "3",
        "RECFLOW_TRAINING__EPOCHS": "1",
        "RECFLOW_MONITORING__MIN_SAMPLES": "10",
    }
    settings = make_settings()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import os

    environ_before = dict(os.environ)
    from recflow.settings import load_settings

    settings = load_settings(home=settings.home)
    out = tmp_path / "demo.json"
    summary = run_demo(settings, out=out, say=lambda m: None)
    # the demo hands its settings to the flows as overrides, never through the environment
    assert {k: v for k, v in os.environ.items() if k.startswith("RECFLOW_")} == {
        k: v for k, v in environ_before.items() if k.startswith("RECFLOW_")}

    assert json.loads(out.read_text())["wall_s"] == summary["wall_s"]
    for key in ("wall_s", "drift_detected_on", "ndcg_next_week_before", "ndcg_next_week_after", "promoted"):
        assert key in summary
    replay = summary["replay"]
    assert replay["days"] == 7 and replay["feedback_events"] > 100 and replay["recommend_calls"] > 50
    assert replay["errors"] == 0
    assert len(summary["monitor_runs"]) == 1
    # The control: the monitor on the quiet week before the replay (the champion's answers through the
    # serving core) says no drift on this stationary shop.
    control = summary["control"]
    assert control["window"] == "2024-02-26..2024-03-04", control
    assert control["drift_detected"] is False and control["verdict"] == "ok", control
    control_summary = json.loads((Path(control["run_dir"]) / "summary.json").read_text())
    assert control_summary["samples"]["current_requests"] > 20
    # The daily item refresh: the champion's item side moved on with every replayed day.
    from recflow import item_refresh

    refresh = summary["item_refresh"]
    assert refresh["days"] == 7 and 0 < refresh["compute_per_day_s"] <= refresh["per_day_s"], refresh
    last = item_refresh.current(settings, summary["models"]["first_champion"])  # refreshed before any retrain
    assert last is not None and last[1]["as_of"].startswith("2024-03-11"), last
    assert all("item_refresh_s" in day for day in replay["per_day"])
    week = summary["next_week"]
    assert 0 < week["personal_top_frequency"]["ndcg@10"] <= 1
    vs = week["minus_personal_top_frequency"]["final_champion"]
    assert vs["ci95_lo"] <= vs["mean_diff"] <= vs["ci95_hi"]
    run_dir = Path(summary["monitor_runs"][0]["run_dir"])
    assert (run_dir / "summary.json").is_file() and list(run_dir.glob("*.html"))
    assert Path(summary["reports_index"]).is_file()
    # Skew: the monitor recomputed the served ranker features offline (two-stage champion) -- none differ.
    first_has_ranker = (registry.model_path(settings, summary["models"]["first_champion"]) / registry.RANKER_DIR).is_dir()
    assert first_has_ranker  # the train flow's default model is two-stage
    skew = summary["skew"]
    assert skew["runs_checked"] == 1 and skew["requests_compared"] > 20, skew
    assert skew["features_mismatched"] == [] and skew["max_abs_diff"] == 0.0, summary["monitor_runs"][0]["skew"]
    # The served feedback reached the event log and, through the rebuilt features, the training data.
    from recflow.event_log import EventLog

    assert EventLog(settings.paths.event_log).stats()["logged"] == replay["feedback_events"]
    if summary["drift_detected_on"]:
        (r,) = summary["retrains"]
        assert r["mode"] == "incremental" and r["gate"]["metric"] == "ndcg@10"
        champion = registry.get_champion(settings)
        expected = r["challenger"] if r["promoted"] else summary["models"]["first_champion"]
        assert champion["tag"] == expected == summary["models"]["final_champion"]
    for value in (summary["ndcg_next_week_before"], summary["ndcg_next_week_after"]):
        assert 0.0 < value <= 1.0
    # Every gate decision is checked against the week after it, with a paired bootstrap interval.
    assert len(summary["gate_decisions"]) == len(summary["retrains"])
    for g in summary["gate_decisions"]:
        if g["correct"] is None:  # a challenger that passed the gate on the last day: its canary had no verdict yet
            assert "canary had no verdict" in g["note"] and not g["promoted"]
            continue
        assert g["ci95_lo"] <= g["next_week_diff"] <= g["ci95_hi"] and isinstance(g["correct"], bool)
        assert g["correct"] == (g["next_week_diff"] > 0 if g["promoted"] else not g["ci95_lo"] > 0)
    judged = [g["correct"] for g in summary["gate_decisions"]]
    assert summary["gate_correct"] == (all(judged) if judged and None not in judged else None)
    assert summary["canary"]["share"] == 0.2
    imp = summary["improvement"]
    assert summary["improvement_ci95_lo"] == imp["ci95_lo"] <= imp["mean_diff"] <= imp["ci95_hi"]
    if not summary["promoted"]:
        assert imp["mean_diff"] == 0.0  # the final champion is the first

    # A gate that cannot be met: the challenger is registered but rejected; the champion stays.
    before = registry.get_champion(settings)["tag"]
    monkeypatch.setenv("RECFLOW_TRAINING__PROMOTION_MARGIN", "100")
    rejected = retrain(refresh_features=False, reason="test", home=str(settings.home))
    assert rejected["promoted"] is False and "misses" in rejected["gate"]["reason"]
    # the gate scores what /recommend serves: the two-stage model when the champion has a ranker
    has_ranker = (registry.model_path(settings, before) / registry.RANKER_DIR).is_dir()
    assert rejected["gate_model"] == ("two-stage" if has_ranker else "two-tower")
    assert registry.get_champion(settings)["tag"] == before
    assert any(m["tag"] == rejected["challenger"] for m in registry.list_models(settings))

    # With canary.share > 0 a challenger that passes the gate (forced to here) becomes the canary, not the
    # champion; the monitor flow's canary step finds no answers of it yet and lets it run; the CLI ends it.
    import dataclasses

    import training.incremental as incremental
    from flows.monitor import monitor
    from recflow import canary

    passing = incremental.gate
    monkeypatch.setattr(incremental, "gate", lambda *a, **kw: dataclasses.replace(passing(*a, **kw), promote=True))
    monkeypatch.setenv("RECFLOW_CANARY__SHARE", "0.3")
    staged = retrain(refresh_features=False, reason="test canary", home=str(settings.home))
    assert staged["promoted"] is False and staged["canary"]["tag"] == staged["challenger"], staged
    assert staged["champion_after"] == before == registry.get_champion(settings)["tag"]
    assert canary.get(settings)["share"] == 0.3 and canary.get(settings)["champion"] == before
    watched = monitor(end="2024-03-11", days=7, home=str(settings.home), emit=False)
    assert watched["canary"]["canary"] == staged["challenger"] and watched["canary"]["action"] == "wait", watched["canary"]
    shown = CliRunner().invoke(app, ["--home", str(settings.home), "canary"])
    assert shown.exit_code == 0 and "wait" in shown.output and staged["challenger"] in shown.output, shown.output
    ended = CliRunner().invoke(app, ["--home", str(settings.home), "canary", "--end", "rollback", "--reason", "test"])
    assert ended.exit_code == 0, ended.output
    assert canary.get(settings) is None and registry.get_champion(settings)["tag"] == before
    assert canary.history(settings)[-1]["tag"] == staged["challenger"]
    monkeypatch.setenv("RECFLOW_CANARY__SHARE", "0")

    # Rollback through the CLI restores the previous champion (when there was a promotion).
    result = CliRunner().invoke(app, ["--home", str(settings.home), "rollback", "--reason", "test"])
    if summary["promoted"]:
        assert result.exit_code == 0, result.output
        assert registry.get_champion(settings)["tag"] == summary["models"]["first_champion"]
    else:
        assert result.exit_code != 0 and "no previous champion" in result.output
