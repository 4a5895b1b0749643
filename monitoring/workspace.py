"""The on-call trend view: every monitor run recorded in an Evidently workspace, with a dashboard.

Each run adds to the project ``recflow monitor`` of the workspace at ``settings.paths.workspace``:

- a **run card**: an Evidently report with one ``MeanValue`` per key number of the run's summary (drift
  shares, skew, quality at k, coverage, novelty, fallback and degraded rates, pending feedback, the
  verdict), stamped with the window's end, so the dashboard's line panels trend them over monitored time;
- the run's three detailed reports (feature drift, prediction drift, quality), under the same stamp.

The dashboard is declared here (:data:`PANELS`) and rewritten on every record, so an upgrade's
panels replace the old ones. A run recorded again (the same window) replaces its earlier snapshots,
and runs whose report folder is gone (retention, ``privacy.report_days``) are dropped from the
workspace too. ``recflow reports --serve`` serves it with Evidently's UI (``evidently ui``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from monitoring.reports import finite_number

log = logging.getLogger(__name__)

PROJECT = "recflow monitor"
CARD_TAG = "run-card"
TAB = "Trends"

# Run-card values and their legends (short: Evidently's legend column is narrow).
CARD: tuple[tuple[str, str], ...] = (
    ("feature_drift_share", "features"),
    ("prediction_drift_share", "predictions"),
    ("drift_verdict", "verdict (1 = drift)"),
    ("skew_max_abs_diff", "max abs diff"),
    ("skew_share_mismatched", "share mismatched"),
    ("ndcg_at_k", "NDCG@k"),
    ("recall_at_k", "recall@k"),
    ("hit_rate_at_k", "hit rate@k"),
    ("coverage", "coverage"),
    ("novelty", "novelty"),
    ("fallback_rate", "fallback"),
    ("degraded_rate", "degraded"),
    ("pending_feedback", "pending events"),
)
# (title, description, values): values on one panel share a scale.
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Drift share", "Share of served features and of prediction descriptors drifted; the policy's verdict.",
     ("feature_drift_share", "prediction_drift_share", "drift_verdict")),
    ("Skew: served vs offline features", "Not drift: any value above 0 is a pipeline fault.",
     ("skew_max_abs_diff", "skew_share_mismatched")),
    ("Quality at k", "Served lists against the purchases that followed.", ("ndcg_at_k", "recall_at_k", "hit_rate_at_k")),
    ("Catalogue coverage", "Share of the training window's items in some served top-k list.", ("coverage",)),
    ("Novelty", "Mean -log2 of the recommended items' buyer share (higher: less popular).", ("novelty",)),
    ("Fallback and degraded rates", "Popularity for unknown users; degraded answers after a failure.",
     ("fallback_rate", "degraded_rate")),
    ("Pending feedback", "Accepted events not yet pushed online when the monitor ran.", ("pending_feedback",)),
)


def run_card(summary: dict[str, Any]) -> dict[str, float]:
    """The run's key numbers (see :data:`CARD`) from its ``summary.json``; a number the run could not
    compute is left out (the panel shows a gap, not a zero)."""
    metrics = {m.get("metric"): m.get("value") for m in summary.get("metrics", [])}
    extra = summary.get("extra_metrics", {}).get("current", {})
    skew = summary.get("skew") or {}
    per = skew.get("per_feature") or {}
    serving = summary.get("serving") or {}
    verdict = (summary.get("decision") or {}).get("verdict")
    values: dict[str, Any] = {
        "feature_drift_share": metrics.get("feature_drift_share"),
        "prediction_drift_share": metrics.get("prediction_drift_share"),
        "drift_verdict": {"drift": 1.0, "ok": 0.0}.get(str(verdict)),
        "skew_max_abs_diff": skew.get("max_abs_diff"),
        "skew_share_mismatched": max((f.get("share_mismatched", 0.0) for f in per.values()), default=None),
        "fallback_rate": serving.get("fallback_rate"),
        "degraded_rate": serving.get("degraded_rate"),
        "pending_feedback": serving.get("pending_feedback"),
    }
    for name in ("ndcg_at_k", "recall_at_k", "hit_rate_at_k", "coverage", "novelty"):
        values[name] = metrics.get(name, extra.get(name))
    return {k: v for k, v in ((k, finite_number(values.get(k))) for k, _ in CARD) if v is not None}


def _dashboard() -> Any:
    from evidently.sdk.models import DashboardModel, DashboardTabModel, PanelMetric
    from evidently.sdk.panels import line_plot_panel, text_panel

    legend = dict(CARD)
    panels = [text_panel("recflow monitor: one point per monitor run, at the end of its window",
                         "Open a run's detailed reports under Reports, or the dated report index "
                         "(`recflow reports --serve`) for the decision and its reasons.")]
    for title, description, names in PANELS:
        values = [PanelMetric(metric="MeanValue", metric_labels={"column": n}, tags=[CARD_TAG], legend=legend[n])
                  for n in names]
        panels.append(line_plot_panel(title, values, description=description, size="half"))
    # Built whole and saved once: Evidently 0.7.23's add_panel lists a panel twice in an existing tab.
    return DashboardModel(tabs=[DashboardTabModel(title=TAB, panels=[p.id for p in panels])], panels=panels)


def open_project(folder: Path) -> tuple[Any, Any]:
    """The workspace at ``folder`` and its ``recflow monitor`` project (created with its dashboard)."""
    from evidently.ui.workspace import Workspace

    folder.mkdir(parents=True, exist_ok=True)
    ws = Workspace(str(folder))
    found = [p for p in ws.list_projects() if p.name == PROJECT]
    project = found[0] if found else ws.create_project(
        PROJECT, description="Every recflow monitor run: drift, skew, quality and serving trends")
    return ws, project


def _runs(ws: Any, project_id: Any) -> list[tuple[Any, dict[str, Any]]]:
    out = []
    for sid in ws.list_runs(project_id):
        model = ws.get_run(project_id, sid)
        if model is not None:
            out.append((sid, dict(model.metadata or {})))
    return out


def recorded_runs(folder: Path) -> list[str]:
    """Run ids with a run card in the workspace at ``folder``, oldest window first."""
    if not folder.is_dir():
        return []
    ws, project = open_project(folder)
    cards = [(str(m.get("window_end")), str(m.get("run_id"))) for _, m in _runs(ws, project.id)
             if m.get("kind") == CARD_TAG]
    return [run_id for _, run_id in sorted(cards)]


def record_run(folder: Path, summary: dict[str, Any], run_dir: Path,
               reports: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Add the run of ``summary`` (its folder ``run_dir``) to the workspace at ``folder``, with its
    detailed Evidently snapshots ``reports`` (name -> Snapshot; None for a report that could not run).

    Returns what was done: the run card's values, the snapshots added and the runs pruned.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.core.report import Snapshot
    from evidently.metrics import MeanValue

    ws, project = open_project(folder)
    ws.save_dashboard(project.id, _dashboard())
    run_id = str(summary.get("run_id") or run_dir.name)
    end = window_end(summary)
    reports_dir = run_dir.parent
    pruned = []
    for sid, meta in _runs(ws, project.id):
        gone = meta.get("run_id") and not (reports_dir / str(meta["run_id"])).is_dir()
        if meta.get("run_id") == run_id or gone:
            ws.delete_run(project.id, sid)
            if gone and meta.get("kind") == CARD_TAG:
                pruned.append(str(meta["run_id"]))
    verdict = str((summary.get("decision") or {}).get("verdict"))
    meta = {"run_id": run_id, "window_end": end.isoformat(), "verdict": verdict}
    card = run_card(summary)
    added = 0
    if card:
        frame = pd.DataFrame([card])
        report = Report([MeanValue(column=c) for c in card], metadata={**meta, "kind": CARD_TAG},
                        tags=[CARD_TAG, verdict])
        snapshot = report.run(Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(card))),
                              None, timestamp=end, name=f"monitor {run_id}: {verdict}")
        ws.add_run(project.id, snapshot)
        added += 1
    for name, detailed in (reports or {}).items():
        if detailed is None:  # a placeholder: the report could not run
            continue
        # Stamped with the window's end and the run's metadata, like the run card (through the public dump).
        data = detailed.dump_dict()
        data.update(timestamp=end, metadata={**meta, "kind": name}, name=f"{name.replace('_', ' ')} {run_id}",
                    tags=[name, verdict])
        ws.add_run(project.id, Snapshot.load_dict(data))
        added += 1
    return {"workspace": str(folder), "project_id": str(project.id), "values": card, "snapshots_added": added,
            "pruned_runs": pruned}


def evidently_ui_command() -> list[str]:
    """The ``evidently`` command of this environment (its console script next to Python)."""
    script = Path(sys.executable).with_name("evidently")
    return [str(script)] if script.exists() else [shutil.which("evidently") or "evidently"]


@contextlib.contextmanager
def serve_ui(folder: Path, port: int = 0, wait_s: float = 60.0) -> Iterator[str]:
    """Run Evidently's UI over the workspace at ``folder`` on 127.0.0.1 (``port`` 0: a free one);
    yields the dashboard's URL and stops the UI on exit."""
    from recflow.local_services import free_port, stop_process, wait_for_port

    _, project = open_project(folder)
    port = port or free_port()
    env = {**os.environ, "DO_NOT_TRACK": "1"}  # Evidently's usage telemetry off (no internet here)
    ui_log = tempfile.NamedTemporaryFile(prefix="evidently-ui-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([*evidently_ui_command(), "ui", "--workspace", str(folder), "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=ui_log, stderr=subprocess.STDOUT)
    try:
        try:  # uvicorn listens once the app has started
            wait_for_port(port, timeout=wait_s, proc=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"evidently ui: {exc}: {Path(ui_log.name).read_text(errors='replace')[-2000:]}") from exc
        yield f"http://127.0.0.1:{port}/projects/{project.id}"
    finally:
        stop_process(proc)
        ui_log.close()
        Path(ui_log.name).unlink(missing_ok=True)


def window_end(summary: dict[str, Any]) -> datetime:
    """The window end of a summary, as a naive UTC datetime (Evidently's snapshot timestamps)."""
    from recflow.timeutil import to_utc

    return to_utc(summary["window"]["end"]).tz_localize(None).to_pydatetime()
