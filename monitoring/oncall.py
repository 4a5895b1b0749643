"""``recflow reports --serve``: the on-call view on 127.0.0.1, the dated reports and the trend dashboard.

One HTTP server serves the reports folder (``index.html``: every run's verdict, reasons, skew and
reports). Its ``/dashboard`` redirects to Evidently's UI over the monitor workspace
(:mod:`monitoring.workspace`), which runs beside it for as long as the view is served.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from typing import Any

from recflow.settings import Settings


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static reports, with ``/dashboard`` sent on to the Evidently UI (or a page saying why not)."""

    dashboard: str | None = None
    dashboard_error: str = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.rstrip("/") in ("/dashboard", "/dashboard.html"):
            if self.dashboard:
                self.send_response(302)
                self.send_header("Location", self.dashboard)
                self.end_headers()
                return
            body = (f"The trend dashboard is not available: {self.dashboard_error}").encode()
            self.send_response(503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: no request lines on the console
        return


@contextlib.contextmanager
def serve_oncall(settings: Settings, *, port: int = 0, dashboard_port: int = 0) -> Iterator[dict[str, Any]]:
    """Serve the reports folder and the trend dashboard on 127.0.0.1 until the block exits.

    Yields ``{"index", "dashboard", "dashboard_error"}``: the index page's URL, the dashboard's URL
    (None when Evidently's UI could not start, and then the reason).
    """
    from monitoring.workspace import serve_ui

    folder = settings.paths.reports
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        dashboard, error = None, ""
        try:
            dashboard = stack.enter_context(serve_ui(settings.paths.workspace, port=dashboard_port))
        except (OSError, RuntimeError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        handler = type("OncallHandler", (_Handler,), {"dashboard": dashboard, "dashboard_error": error})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=str(folder)))
        stack.callback(server.server_close)
        thread = threading.Thread(target=server.serve_forever, name="recflow-oncall", daemon=True)
        thread.start()
        stack.callback(server.shutdown)
        yield {"index": f"http://127.0.0.1:{server.server_address[1]}/index.html", "dashboard": dashboard,
               "dashboard_error": error}
