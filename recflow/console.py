"""What the command line shows: recflow's progress bars and results, not the libraries' chatter.

:func:`quiet_libraries` is called once by the CLI (``recflow --verbose`` skips it). It acts at
each library's own switch, and only where the user has not set that switch:

- Prefect: its console handler shows warnings and errors only (``PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL``;
  flow and task logs still go to the Prefect API and UI in full), and the temporary server sends no
  telemetry (``PREFECT_SERVER_ANALYTICS_ENABLED``: on a machine without internet access it logs an
  error per run);
- Feast, Ray, BentoML, transformers, Optuna, httpx: their loggers at WARNING;
- warnings that ask nothing of the user, dropped by message (:data:`NOTICES`): Ray's "token
  authentication is enabled" notice at every local ``ray.init`` (its "disabled" warning, which
  asks for action, still shows);
- deprecation and future warnings of third-party code: ignored.

These are library switches set before the libraries are imported, not recflow settings: recflow's
own settings never travel through the environment.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("feast", "ray", "bentoml", "transformers", "optuna", "httpx", "urllib3", "filelock", "evidently")
NOTICES: dict[str, tuple[str, ...]] = {
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
}
LIBRARY_SWITCHES = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


class _DropNotices(logging.Filter):
    """Drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_libraries() -> None:
    """Quiet the libraries' console output (see the module docstring); a user's own setting wins."""
    for name, value in LIBRARY_SWITCHES.items():
        os.environ.setdefault(name, value)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, starts in NOTICES.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in target.filters):
            target.addFilter(_DropNotices(starts))
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Some libraries reset or bypass the filters while they run (pathspec's deprecation notices still
    # reached the console during `recflow train`), so the display function drops them too.
    show = warnings.showwarning
    if not getattr(show, "_recflow_quiet", False):
        def quiet_show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
            if not issubclass(category, DeprecationWarning | FutureWarning):
                show(message, category, filename, lineno, file, line)

        quiet_show._recflow_quiet = True  # type: ignore[attr-defined]
        warnings.showwarning = quiet_show
