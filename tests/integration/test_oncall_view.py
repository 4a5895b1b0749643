"""The on-call view as `recflow reports --serve` serves it: the index page, and the Evidently
workspace's trend dashboard rendered by headless Chromium with every panel and its trend lines."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from monitoring.index import write_index
from monitoring.oncall import serve_oncall
from monitoring.workspace import CARD, PANELS, record_run, recorded_runs
from recflow.settings import load_settings


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is missing: CI installs Debian's chromium package (see .ci/run)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def _summary(run_id: str, end: str, drift: float, ndcg: float, verdict: str) -> dict:
    return {
        "run_id": run_id, "window": {"start": "2017-10-01T00:00:00+00:00", "end": end},
        "decision": {"drift": verdict == "drift", "verdict": verdict, "reasons": [f"feature drift share {drift}"]},
        "metrics": [{"metric": "feature_drift_share", "value": drift}, {"metric": "prediction_drift_share", "value": 0.1},
                    {"metric": "ndcg_at_k", "value": ndcg}, {"metric": "recall_at_k", "value": ndcg / 2},
                    {"metric": "hit_rate_at_k", "value": 0.5}, {"metric": "coverage", "value": 0.2},
                    {"metric": "novelty", "value": 9.5}],
        "skew": {"verdict": "ok", "max_abs_diff": 0.0, "per_feature": {"u_n_lines": {"share_mismatched": 0.0}}},
        "serving": {"fallback_rate": 0.05, "degraded_rate": 0.0, "pending_feedback": 3},
    }


def _render(chromium: str, url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=20000", "--window-size=1400,1800",
         *args, url],
        capture_output=True, text=True, timeout=120,
    )


def test_reports_serve_shows_the_index_and_a_trend_dashboard_with_every_panel(tmp_path: Path) -> None:
    chromium = _chromium()
    settings = load_settings(home=tmp_path / "home")
    for run_id, end, drift, ndcg, verdict in (("2017-10-08T000000Z", "2017-10-08T00:00:00+00:00", 0.1, 0.30, "ok"),
                                              ("2017-10-15T000000Z", "2017-10-15T00:00:00+00:00", 0.6, 0.24, "drift")):
        run_dir = settings.paths.reports / run_id
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")
        record_run(settings.paths.workspace, _summary(run_id, end, drift, ndcg, verdict), run_dir)
    assert recorded_runs(settings.paths.workspace) == ["2017-10-08T000000Z", "2017-10-15T000000Z"]
    write_index(settings.paths.reports)

    with serve_oncall(settings) as urls:
        assert urls["dashboard"], urls["dashboard_error"]
        index = httpx.get(urls["index"], timeout=10)
        assert index.status_code == 200 and "href='dashboard'" in index.text
        hop = httpx.get(urls["index"].replace("index.html", "dashboard"), timeout=10)
        assert hop.status_code == 302 and hop.headers["location"] == urls["dashboard"]
        dom = _render(chromium, urls["dashboard"], tmp_path, "--dump-dom")
        shot = tmp_path / "dashboard.png"
        _render(chromium, urls["dashboard"], tmp_path, f"--screenshot={shot}")

    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for title, _, _ in PANELS:
        assert title in page, f"panel {title!r} not rendered"
    legends = dict(CARD)
    assert legends["feature_drift_share"] in page and legends["pending_feedback"] in page, "no trend line drawn"
    assert page.count("2017-10-") >= 2, "the time axis should span the two runs"
    assert shot.stat().st_size > 30_000  # a drawn page, not a blank one
    keep = os.environ.get("RECFLOW_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
