#!/usr/bin/env bash
# Regenerate constraints.txt: install the project into a clean virtual environment and freeze it.
# torch is pinned without its local "+cpu" label so pip picks the CPU build where one is offered
# (this machine's find-links) and the PyPI build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q -U pip
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q -e ".[dev]"
{
  echo "# Exact versions of every dependency, tested together. Regenerate with scripts/lock.sh."
  echo "# Install: pip install -c constraints.txt -e \".[dev]\""
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' | grep -v '^-e '
} > constraints.txt
rm -rf "$(dirname "$venv")"
wc -l constraints.txt
