"""The shipped Prometheus alert rules and Grafana dashboard: valid, tested by promtool, and only over
metrics the service exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "alerts"
DASHBOARD = ROOT / "monitoring" / "grafana" / "recflow-service.json"
METRIC = re.compile(r"\brecflow_[a-z_]+\b")


def _exported() -> set[str]:
    """Every series name the service's metrics can expose (counters with ``_total``, histograms' parts)."""
    from serving.metrics import metrics

    names = set()
    for m in metrics().values():
        base = m._name  # prometheus_client strips a counter's _total here
        names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def _rules() -> list[dict]:
    doc = yaml.safe_load((ALERTS / "recflow.rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: CI installs Debian's prometheus package (see .ci/run)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return tool


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    exported = _exported()
    for expr in [r["expr"] for r in _rules()] + _dashboard_exprs():
        used = set(METRIC.findall(expr))
        assert used, f"no recflow metric in {expr!r}"
        assert used <= exported, f"{sorted(used - exported)} in {expr!r} is not a metric of serving/metrics.py"


def test_every_alert_has_severity_summary_and_a_runbook_that_exists() -> None:
    import runpy

    anchors = runpy.run_path(str(ROOT / "docs" / "check_links.py"))["anchors"]
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 10
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        doc, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert anchor in anchors(ROOT / doc), f"{rule['alert']}: no heading #{anchor} in {doc}"
    tested = (ALERTS / "recflow.rules.test.yml").read_text()
    for name in names:  # each alert is seen firing in the promtool tests, not only quiet
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tested), f"{name} never fires in a test"


def test_promtool_checks_and_unit_tests_pass(tmp_path: Path) -> None:
    tool = _promtool()
    for args in (["check", "rules", "recflow.rules.yml"], ["test", "rules", "recflow.rules.test.yml"]):
        done = subprocess.run([tool, *args], cwd=ALERTS, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        assert "SUCCESS" in done.stdout


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query parses (checked by promtool as a recording rule, Grafana's interval variable
    replaced), and the dashboard covers every metric the alerts watch."""
    tool = _promtool()
    exprs = [e.replace("$__rate_interval", "5m") for e in _dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"recflow:panel_{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    watched = {m for r in _rules() for m in METRIC.findall(r["expr"])}
    shown = {m for e in exprs for m in METRIC.findall(e)}
    assert watched <= shown, f"alerted but not on the dashboard: {sorted(watched - shown)}"
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["pluginId"] == "prometheus" and dash["uid"] == "recflow-service"
