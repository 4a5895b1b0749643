"""Progress reporting that works through Prefect tasks: library code reports, the CLI displays.

Library code calls :func:`report`; it does nothing unless a caller installed a sink with
:func:`reporting` (the CLI installs a rich progress bar). The sink is process-wide (not a
context variable) because Prefect may run tasks on worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Sink = Callable[[str, float | None, float | None, str], None]
_lock = threading.Lock()
_sink: Sink | None = None


@contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Send every :func:`report` call made inside the block to ``sink(stage, completed, total, message)``."""
    global _sink
    with _lock:
        previous, _sink = _sink, sink
    try:
        yield
    finally:
        with _lock:
            _sink = previous


def report(stage: str, completed: float | None = None, total: float | None = None, message: str = "") -> None:
    """Report progress of ``stage``: ``completed`` out of ``total`` units (either may be None)."""
    sink = _sink
    if sink is not None:
        sink(stage, completed, total, message)
