"""The on-call page: ``index.html`` listing every monitor run, newest first.

Plain static HTML with inline CSS (no script, no CDN), rebuilt from each run's ``summary.json``.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
REPORT_NAMES = ("feature_drift", "prediction_drift", "recommendation_quality")
KEY_METRICS = ("feature_drift_share", "prediction_drift_share", "ndcg_at_k", "recall_at_k", "hit_rate_at_k")

_CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:24px;color:#111827;background:#f9fafb}
h1{margin:0 0 4px 0}.sub{color:#6b7280;margin-bottom:20px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #e5e7eb;padding:8px 10px;vertical-align:top;text-align:left;font-size:14px}
th{background:#f3f4f6}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;font-size:13px;color:#fff}
.drift{background:#dc2626}.ok{background:#16a34a}.insufficient_data{background:#6b7280}.error{background:#9333ea}
.small{font-size:11px;padding:0 6px;font-weight:500}
ul{margin:0;padding-left:18px}td.num{white-space:nowrap}a{color:#1d4ed8}
.latest{padding:12px 16px;background:#fff;border:1px solid #e5e7eb;margin-bottom:20px}
"""

_LABEL = {"drift": "DRIFT: consider retraining", "ok": "OK", "insufficient_data": "NO DECISION (too little data)",
          "error": "UNREADABLE"}


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _load_runs(reports_dir: Path) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for run_dir in sorted(p for p in reports_dir.iterdir() if p.is_dir()):
        summary_path = run_dir / SUMMARY_FILE
        if not summary_path.is_file():
            continue
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            summary = {"decision": {"verdict": "error", "reasons": [f"cannot read summary.json: {exc}"]}}
        runs.append({"dir": run_dir, "summary": summary,
                     "sort_key": str(summary.get("window", {}).get("end") or run_dir.name)})
    runs.sort(key=lambda r: (r["sort_key"], r["dir"].name), reverse=True)
    return runs


def _links(run_dir: Path, reports_dir: Path, summary: dict[str, Any]) -> str:
    rel = run_dir.relative_to(reports_dir).as_posix()
    entries = summary.get("reports") or {n: {"html": f"{n}.html", "json": f"{n}.json"} for n in REPORT_NAMES}
    parts = []
    for name, files in entries.items():
        links = [f'<a href="{_esc(rel + "/" + files[kind])}">{kind}</a>' for kind in ("html", "json")
                 if isinstance(files, dict) and files.get(kind) and (run_dir / files[kind]).is_file()]
        if links:
            parts.append(f"{_esc(name.replace('_', ' '))}: " + " · ".join(links))
    parts.append(f'<a href="{_esc(rel + "/" + SUMMARY_FILE)}">summary.json</a>')
    return "<br>".join(parts)


def _key_numbers(summary: dict[str, Any]) -> str:
    by_name = {m.get("metric"): m for m in summary.get("metrics", []) if isinstance(m, dict)}
    rows = []
    for name in KEY_METRICS:
        m = by_name.get(name)
        if not m:
            continue
        ref = f" (ref {_fmt(m.get('reference'))})" if m.get("reference") is not None else ""
        verdict = str(m.get("verdict", ""))
        rows.append(f"<li><span class='badge small {_esc(verdict)}'>{_esc(verdict.replace('_', ' '))}</span> "
                    f"{_esc(name)}: <b>{_esc(_fmt(m.get('value')))}</b>{_esc(ref)}"
                    f" · threshold {_esc(_fmt(m.get('threshold')))}</li>")
    samples = summary.get("samples", {})
    if samples:
        rows.append(f"<li>requests: {_esc(samples.get('current_requests', '–'))} current, "
                    f"{_esc(samples.get('reference_requests', '–'))} reference</li>")
        fb = samples.get("quality_users_with_feedback")
        if isinstance(fb, dict):
            rows.append(f"<li>users with feedback: {_esc(fb.get('current', '–'))} current, "
                        f"{_esc(fb.get('reference', '–'))} reference</li>")
    if summary.get("sampling"):
        rows.append(f"<li>{_esc(summary['sampling'])}</li>")
    return "<ul>" + "".join(rows) + "</ul>" if rows else "–"


_SKEW_LABEL = {"ok": "NO SKEW", "skew": "PIPELINE FAULT", "no_data": "NOT CHECKED", "off": "OFF"}


def _skew(summary: dict[str, Any]) -> str:
    """The skew verdict, apart from drift: a pipeline fault (served features disagree with the
    offline truth) is not a change in shoppers, and retraining does not fix it."""
    skew = summary.get("skew")
    if not isinstance(skew, dict) or skew.get("verdict") not in _SKEW_LABEL:
        return "–"
    v = str(skew["verdict"])
    css = {"ok": "ok", "skew": "error"}.get(v, "insufficient_data")
    lines = [f"<span class='badge small {css}'>{_esc(_SKEW_LABEL[v])}</span> {_esc(skew.get('reason', ''))}"]
    if v == "skew":
        per = skew.get("per_feature") or {}
        for name in skew.get("features_mismatched", []):
            f = per.get(name, {})
            lines.append(f"{_esc(name)}: {_esc(_fmt(f.get('share_mismatched')))} of requests differ, "
                         f"max |diff| {_esc(_fmt(f.get('max_abs_diff')))}")
    return "<br>".join(lines)


def _verdict(summary: dict[str, Any]) -> str:
    decision = summary.get("decision", {})
    verdict = decision.get("verdict")
    if verdict not in _LABEL:
        drift = decision.get("drift")
        verdict = "insufficient_data" if drift is None else ("drift" if drift else "ok")
    return verdict


def render_index(reports_dir: Path) -> str:
    """The index page as an HTML string (see :func:`write_index`)."""
    runs = _load_runs(reports_dir) if reports_dir.is_dir() else []
    rows = []
    for run in runs:
        summary, run_dir = run["summary"], run["dir"]
        verdict = _verdict(summary)
        window = summary.get("window", {})
        when = (f"{_esc(window.get('start', '?'))}<br>→ {_esc(window.get('end', '?'))}" if window
                else _esc(run_dir.name))
        reasons = summary.get("decision", {}).get("reasons", [])
        reasons_html = "<ul>" + "".join(f"<li>{_esc(r)}</li>" for r in reasons) + "</ul>" if reasons else "–"
        rows.append(
            f"<tr><td class='num'><b>{_esc(run_dir.name)}</b><br><small>{when}</small></td>"
            f"<td><span class='badge {verdict}'>{_esc(_LABEL[verdict])}</span></td>"
            f"<td>{reasons_html}</td><td>{_skew(summary)}</td><td>{_key_numbers(summary)}</td>"
            f"<td>{_links(run_dir, reports_dir, summary)}</td></tr>"
        )
    if runs:
        latest = runs[0]
        v = _verdict(latest["summary"])
        head = (f"<div class='latest'>Latest run <b>{_esc(latest['dir'].name)}</b>: "
                f"<span class='badge {v}'>{_esc(_LABEL[v])}</span></div>")
    else:
        head = "<div class='latest'>No monitor run yet. Run <code>recflow reports</code> or the monitor flow.</div>"
    table = (
        "<table><thead><tr><th>Run (window, UTC)</th><th>Verdict</th><th>Reasons</th>"
        "<th>Skew (served vs offline features)</th><th>Key numbers</th>"
        "<th>Reports</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    ) if rows else ""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>recflow monitoring</title><style>{_CSS}</style></head><body>"
        "<h1>recflow monitoring</h1><div class='sub'>Drift and recommendation-quality runs, newest first. "
        "DRIFT means a gating metric crossed its threshold (see reasons): the world changed; advisory lines do not "
        "trigger retraining. Skew is apart: PIPELINE FAULT means the service was served features that disagree "
        "with the offline truth for the same user and time, which retraining does not fix.</div>"
        "<div class='sub'><a href='dashboard'>Trend dashboard</a> (the Evidently workspace: drift share, skew, "
        "quality, coverage, novelty, fallback and degraded rates and pending feedback over the monitor runs; "
        "served by <code>recflow reports --serve</code>).</div>"
        f"{head}{table}</body></html>"
    )


def write_index(reports_dir: Path) -> Path:
    """Write ``reports_dir/index.html`` listing every run folder holding a ``summary.json``.

    Runs are sorted by window end, newest first; each shows its verdict, reasons, key numbers and
    links to the report files that exist. The file is replaced atomically. Returns its path.
    """
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    target = reports_dir / "index.html"
    tmp = reports_dir / f".index.html.{os.getpid()}.tmp"
    tmp.write_text(render_index(reports_dir), encoding="utf-8")
    tmp.replace(target)
    return target
