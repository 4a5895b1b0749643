"""recflow monitoring: Evidently drift and quality reports, the drift policy, the on-call index page.

Entry point: :func:`monitoring.run_monitor` (see :mod:`monitoring.monitor_run`). Importing this package
does nothing else: names are resolved lazily, and Evidently is imported only when a report runs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitoring.index import write_index
    from monitoring.monitor_run import MonitorResult, run_monitor
    from monitoring.policy import Decision, DriftPolicy, decide

_LAZY = {
    "run_monitor": "monitoring.monitor_run",
    "MonitorResult": "monitoring.monitor_run",
    "write_index": "monitoring.index",
    "decide": "monitoring.policy",
    "Decision": "monitoring.policy",
    "DriftPolicy": "monitoring.policy",
}
__all__ = ["Decision", "DriftPolicy", "MonitorResult", "decide", "run_monitor", "write_index"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monitoring' has no attribute {name!r}")
