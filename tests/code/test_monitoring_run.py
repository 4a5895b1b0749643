"""run_monitor end to end on small synthetic logs written where serving would write them."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from monitoring.monitor_run import run_monitor
from monitoring.synthetic import synthetic_items, synthetic_log, synthetic_purchases
from recflow.privacy import pseudonym_key, pseudonymise_frame
from recflow.schemas import EVENTS_SCHEMA, REQUEST_LOG_SCHEMA, conform
from recflow.settings import Settings, load_settings

START, END = pd.Timestamp("2017-10-01", tz="UTC"), pd.Timestamp("2017-10-08", tz="UTC")


def _world(home, *, shift: float, n: int = 1200, hit_rate: float = 0.5) -> tuple[Settings, pd.DataFrame]:
    """Reference predictions + two weeks of served requests and purchases under ``home``."""
    settings = load_settings(home=home)
    items = synthetic_items(n_items=150)
    reference = synthetic_log(n, 300, "2017-09-01", 1, items=items, seed=1)
    previous = synthetic_log(n, 300, START - pd.Timedelta(days=7), 7, items=items, seed=2, shift=shift,
                             pop_shift=shift)
    current = synthetic_log(n, 300, START, 7, items=items, seed=3, shift=shift, pop_shift=shift)
    events = pd.concat([
        synthetic_purchases(reference, hit_rate=0.5, items=items, seed=1),
        synthetic_purchases(previous, hit_rate=hit_rate, items=items, seed=2),
        synthetic_purchases(current, hit_rate=hit_rate, items=items, seed=3),
    ], ignore_index=True)
    # Served rows hold keyed pseudonyms of the user ids, as the service and the reference builder write them.
    key = pseudonym_key(settings)
    reference, previous, current = (pseudonymise_frame(f, key) for f in (reference, previous, current))
    paths = settings.paths
    paths.request_log.mkdir(parents=True)
    paths.event_log.mkdir(parents=True)
    paths.canonical.mkdir(parents=True)
    pq.write_table(conform(previous, REQUEST_LOG_SCHEMA, name="log"), paths.request_log / "2017-09-24.parquet")
    pq.write_table(conform(current, REQUEST_LOG_SCHEMA, name="log"), paths.request_log / "2017-10-01.parquet")
    pq.write_table(conform(events, EVENTS_SCHEMA, name="events"), paths.event_log / "feedback.parquet")
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), paths.items)
    return settings, reference


def test_monitor_without_drift_writes_everything(tmp_path) -> None:
    settings, reference = _world(tmp_path, shift=0.0)
    result = run_monitor(settings, reference=reference, start=START, end=END)
    assert result.run_dir == settings.paths.reports / "2017-10-08T000000Z"
    assert result.decision.drift is False, result.decision.reasons
    for files in result.reports.values():
        assert files.html.stat().st_size > 100_000 and files.json.is_file()
    summary = json.loads(result.summary_path.read_text())
    assert summary["decision"]["verdict"] == "ok"
    metrics = {m["metric"]: m for m in summary["metrics"]}
    assert {"feature_drift_share", "prediction_drift_share", "ndcg_at_k", "recall_at_k", "hit_rate_at_k",
            "novelty", "popularity_arp", "coverage", "popularity_gini", "personalization"} <= set(metrics)
    for m in metrics.values():
        assert set(m) >= {"metric", "value", "threshold", "verdict"}
        assert m["verdict"] in {"ok", "drift", "insufficient_data"}
    assert metrics["ndcg_at_k"]["reference"] > 0 and metrics["ndcg_at_k"]["verdict"] == "ok"
    assert summary["samples"]["current_requests"] == 1200
    assert summary["quality_window"]["end"].startswith("2017-10-01")  # lagged by the 7-day horizon
    assert "user_id" in summary["features"]["skipped"]
    assert summary["predictions"]["mix_groups"]  # department mix monitored from the catalogue
    index = result.index_path.read_text()
    assert "2017-10-08T000000Z/feature_drift.html" in index
    # no two-stage champion here: the skew report says so, apart from the drift verdict
    assert summary["skew"]["verdict"] == "no_data" and "NOT CHECKED" in index and "PIPELINE FAULT" in index


def test_monitor_detects_injected_drift_and_quality_drop(tmp_path) -> None:
    settings, reference = _world(tmp_path, shift=1.0, hit_rate=0.15)
    result = run_monitor(settings, reference=reference, start=START, end=END)
    assert result.decision.drift is True
    verdicts = {m.metric: m.verdict for m in result.decision.metrics}
    assert verdicts["feature_drift_share"] == "drift"
    assert verdicts["prediction_drift_share"] == "drift"
    assert verdicts["hit_rate_at_k"] == "drift"
    assert any(r.startswith("hit_rate_at_k") for r in result.decision.reasons)


def test_monitor_with_too_few_requests_decides_nothing(tmp_path) -> None:
    settings, reference = _world(tmp_path, shift=1.0, n=120)  # < min_samples (200)
    result = run_monitor(settings, reference=reference, start=START, end=END)
    assert result.decision.drift is None
    summary = json.loads(result.summary_path.read_text())
    assert summary["decision"]["verdict"] == "insufficient_data"
    assert "too few requests" in summary["decision"]["reasons"][0]
    assert "NO DECISION" in result.index_path.read_text()


def test_monitor_samples_above_the_cap_and_says_so(tmp_path) -> None:
    settings, reference = _world(tmp_path, shift=0.0)
    settings = settings.model_copy(update={"monitoring": settings.monitoring.model_copy(update={"max_rows": 500})})
    result = run_monitor(settings, reference=reference, start=START, end=END)
    assert result.summary["samples"]["current_sampled"] == 500
    assert "current requests sampled: 500 of 1200" in result.summary["sampling"]


def test_reference_must_be_request_log_shaped(tmp_path) -> None:
    settings = load_settings(home=tmp_path)
    with pytest.raises(ValueError, match=r"reference: missing column\(s\) \['features', 'item_ids'"):
        run_monitor(settings, reference=pd.DataFrame({"user_id": ["u"], "ts": [START], "scores": [[1.0]]}),
                    start=START, end=END)
    with pytest.raises(ValueError, match="window is empty"):
        run_monitor(settings, reference=pd.DataFrame(), start=END, end=START)


def test_package_import_is_side_effect_free(tmp_path) -> None:
    code = ("import sys, monitoring; assert 'evidently' not in sys.modules; "
            "assert callable(monitoring.run_monitor); assert 'evidently' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60,
                   env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2])})
    assert not any(tmp_path.iterdir())


def test_missing_served_features_surface_as_a_warning(tmp_path) -> None:
    settings, reference = _world(tmp_path, shift=0.0, n=400)
    current = synthetic_log(400, 300, START, 7, items=synthetic_items(n_items=150), seed=9)
    current["features"] = '{"purchases_7d": 1}'
    result = run_monitor(settings, reference=reference, current=current, start=START, end=END)
    warning = next(r for r in result.decision.reasons if r.startswith("warning: feature schema changed"))
    assert "spend_30d" in warning
    assert result.summary["features"]["only_reference"] and "spend_30d" in result.summary["features"]["only_reference"]


def test_workspace_records_each_run_once_and_follows_report_retention(tmp_path) -> None:
    import shutil

    from monitoring.workspace import open_project, recorded_runs, run_card

    settings, reference = _world(tmp_path, shift=0.0)
    first = run_monitor(settings, reference=reference, start=START - pd.Timedelta(days=7), end=START)
    second = run_monitor(settings, reference=reference, start=START, end=END)
    folder = settings.paths.workspace
    assert recorded_runs(folder) == [first.run_dir.name, second.run_dir.name]
    assert second.summary["workspace"]["recorded"] and second.summary["workspace"]["snapshots_added"] == 4
    card = run_card(second.summary)
    metrics = {m["metric"]: m["value"] for m in second.summary["metrics"]}
    assert card["feature_drift_share"] == metrics["feature_drift_share"] and card["drift_verdict"] == 0.0
    assert card["ndcg_at_k"] == metrics["ndcg_at_k"] > 0 and card["pending_feedback"] == 0
    assert {"fallback_rate", "coverage", "novelty", "prediction_drift_share"} <= set(card)
    ws, project = open_project(folder)
    # Each run: its card and its detailed reports (the first window's quality report had no lists to score).
    assert first.summary["workspace"]["snapshots_added"] == 3 and len(ws.list_runs(project.id)) == 7
    # The same window again replaces its snapshots; a run removed by retention leaves the workspace.
    run_monitor(settings, reference=reference, start=START, end=END)
    assert len(ws.list_runs(project.id)) == 7 and recorded_runs(folder) == [first.run_dir.name, second.run_dir.name]
    shutil.rmtree(first.run_dir)
    again = run_monitor(settings, reference=reference, start=START, end=END)
    assert again.summary["workspace"]["pruned_runs"] == [first.run_dir.name]
    assert recorded_runs(folder) == [second.run_dir.name] and len(ws.list_runs(project.id)) == 4
