"""On-call index page: runs newest first, verdicts, reasons, links only to files that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from monitoring.index import write_index


def _run(reports: Path, run_id: str, end: str, drift: bool | None, reasons: list[str],
         files: tuple[str, ...] = ("feature_drift",)) -> Path:
    run_dir = reports / run_id
    run_dir.mkdir(parents=True)
    verdict = "insufficient_data" if drift is None else ("drift" if drift else "ok")
    summary = {
        "run_id": run_id, "window": {"start": "2017-01-01T00:00:00+00:00", "end": end},
        "decision": {"drift": drift, "verdict": verdict, "reasons": reasons},
        "metrics": [{"metric": "feature_drift_share", "value": 0.5 if drift else 0.1, "reference": None,
                     "threshold": 0.3, "verdict": verdict}],
        "samples": {"current_requests": 1234, "reference_requests": 999},
        "reports": {n: {"html": f"{n}.html", "json": f"{n}.json"}
                    for n in ("feature_drift", "prediction_drift", "recommendation_quality")},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for name in files:
        (run_dir / f"{name}.html").write_text("<html></html>")
        (run_dir / f"{name}.json").write_text("{}")
    return run_dir


def test_index_lists_runs_newest_first_with_verdicts(tmp_path) -> None:
    reports = tmp_path / "reports"
    # folder names deliberately sort differently from the window ends
    _run(reports, "b-old", "2017-10-08T00:00:00+00:00", False, ["no gating metric crossed its threshold"])
    _run(reports, "a-new", "2017-10-22T00:00:00+00:00", True, ["feature_drift_share = 0.500; > threshold 0.3"])
    _run(reports, "c-mid", "2017-10-15T00:00:00+00:00", None, ["too few requests to decide"])
    (reports / "not-a-run").mkdir()
    page = write_index(reports).read_text()
    order = [m.group(1) for m in re.finditer(r"<td class='num'><b>([^<]+)</b>", page)]
    assert order == ["a-new", "c-mid", "b-old"]
    assert "not-a-run" not in page
    assert "Latest run <b>a-new</b>" in page
    assert "DRIFT: consider retraining" in page and "NO DECISION" in page and ">OK<" in page
    assert "feature_drift_share = 0.500; &gt; threshold 0.3" in page
    assert "1234" in page


def test_index_links_only_existing_files(tmp_path) -> None:
    reports = tmp_path / "reports"
    _run(reports, "r1", "2017-10-08T00:00:00+00:00", False, [], files=("feature_drift",))
    page = write_index(reports).read_text()
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert "r1/feature_drift.html" in hrefs and "r1/feature_drift.json" in hrefs and "r1/summary.json" in hrefs
    assert not any("prediction_drift" in h or "recommendation_quality" in h for h in hrefs)
    for href in hrefs:
        assert (reports / href).is_file(), href
    assert "http" not in page.replace("http-equiv", "")  # static page, nothing from the network


def test_index_escapes_text_and_survives_a_broken_summary(tmp_path) -> None:
    reports = tmp_path / "reports"
    _run(reports, "r1", "2017-10-08T00:00:00+00:00", True, ["<script>alert(1)</script>"])
    broken = reports / "r0"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    page = write_index(reports).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "UNREADABLE" in page and "cannot read summary.json" in page


def test_index_without_runs_says_so(tmp_path) -> None:
    page = write_index(tmp_path / "reports").read_text()
    assert "No monitor run yet" in page
