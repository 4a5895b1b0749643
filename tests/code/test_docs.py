"""Docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from recflow.settings_doc import render_into

ROOT = Path(__file__).resolve().parents[2]


def test_settings_reference_in_operations_guide_is_current() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert render_into(doc) == doc, "docs/operations.md is stale: run `python -m recflow.settings_doc`"
    assert "RECFLOW_FEAST__ONLINE_STORE" in doc


def test_every_relative_link_and_anchor_of_the_docs_resolves() -> None:
    import runpy

    check = runpy.run_path(str(ROOT / "docs" / "check_links.py"))["check"]
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) > 5
    assert check(files) == [], "broken links in README.md or docs/"
