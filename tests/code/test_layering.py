"""Import layering: each top-level package imports only the layers below it.

``recflow/`` is the shared core (settings, schemas, datasets, features, feature-store and registry
adapters); ``training``, ``serving`` and ``monitoring`` build on it side by side and never on each
other; ``flows`` orchestrates them all; the CLI (``recflow/cli.py``) is the one top that reaches
everything. Every import counts, also the ones inside functions (they are how layers leak).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("recflow", "training", "serving", "monitoring", "flows", "demo")
# package -> the top-level packages of this repo it must not import
FORBIDDEN: dict[str, set[str]] = {
    "recflow": {"training", "serving", "monitoring", "flows", "demo"},
    "training": {"serving", "monitoring", "flows", "demo"},
    "serving": {"training", "monitoring", "flows", "demo"},
    "monitoring": {"training", "serving", "flows", "demo"},
    "flows": {"demo"},  # the demo calls the flows, never the other way
}
EXEMPT = {"recflow/cli.py"}  # the command table: the top of the house
FLOW_TOPS = {"flows.deployments"}  # only this may import other flows' modules freely


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_the_layers_below(package: str) -> None:
    bad = []
    for f in _files(package):
        rel = f.relative_to(ROOT).as_posix()
        if rel in EXEMPT:
            continue
        for line, module in _imports(f):
            if module.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{rel}:{line} imports {module}")
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_flows_do_not_import_the_deployment_table() -> None:
    """Flows import each other's modules only downwards: the deployment table sits on top."""
    bad = []
    for f in _files("flows"):
        me = f.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        if me in FLOW_TOPS:
            continue
        bad += [f"{me}:{line} imports {m}" for line, m in _imports(f) if m in FLOW_TOPS]
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from serving.features import x\n    import flows.train\n")
    assert [m for _, m in _imports(f)] == ["serving.features", "flows.train"]
