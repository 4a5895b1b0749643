"""The served-request log: rows of ``recflow.schemas.REQUEST_LOG_SCHEMA`` written as parquet.

Requests call :meth:`RequestLogWriter.log` (a list append under a lock: nothing slow on the
request path). A background thread writes the buffered rows every ``flush_s`` seconds as a row
group of the current file, ``<folder>/<UTC date>/requests-<start>-<pid>-<n>.parquet.inprogress``,
and rotates it (closes it and renames it to ``.parquet``) once it is ``rotate_s`` old, holds
``max_rows`` rows or about ``max_bytes`` bytes, and at shutdown. Readers (``monitoring``) read every
``*.parquet`` under the folder, so they only ever see complete files; a crash loses at most the
file in progress (reported at the next start).

Privacy: rows hold the keyed pseudonym of the user id (``recflow.privacy.pseudonym``), never the
raw id, plus item ids, numbers and activity features (profile attributes only with
``privacy.log_profile``); ``/search`` rows log the query's length, never its text. Files past
``privacy.request_log_days`` are deleted by the monitor (``recflow.privacy.apply_retention``).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recflow.schemas import REQUEST_LOG_SCHEMA

log = logging.getLogger("recflow.serving.request_log")
IN_PROGRESS = ".inprogress"
MAX_BUFFER = 1_000_000


class RequestIds:
    """Unique request ids without a system call per request: a random 64-bit prefix per process
    and a counter (32 hex characters, like ``uuid4().hex``)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


class RequestLogWriter:
    """Buffered, rotated parquet writer for the request log (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        flush_s: float = 1.0,
        rotate_s: float = 300.0,
        max_rows: int = 100_000,
        max_bytes: int = 64 * 2**20,
    ) -> None:
        self.folder = Path(folder)
        self.flush_s = flush_s
        self.rotate_s = rotate_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._rows_in_file = 0
        self._files = 0
        self.dropped = 0
        self.written = 0

    def start(self) -> None:
        """Start the flushing thread (idempotent); reports files left in progress by a crash."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stale = [p for p in self.folder.rglob(f"*.parquet{IN_PROGRESS}") if p.is_file() and not _writer_alive(p)]
        if stale:
            log.warning("request log: %d file(s) left in progress by an earlier crash (unreadable): %s",
                        len(stale), ", ".join(str(p) for p in stale[:3]))
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="recflow-request-log", daemon=True)
        self._thread.start()

    def log(self, row: dict[str, Any]) -> None:
        """Queue one row (REQUEST_LOG_SCHEMA columns; missing columns are null)."""
        with self._lock:
            if len(self._buffer) >= MAX_BUFFER:
                self.dropped += 1
                if self.dropped in (1, 1000) or self.dropped % 100_000 == 0:
                    log.error("request log: buffer full, %d row(s) dropped (is %s writable?)", self.dropped, self.folder)
                return
            self._buffer.append(row)

    def flush(self, rotate: bool = False) -> int:
        """Write buffered rows now (and close the current file if ``rotate``); returns rows written."""
        with self._lock:
            rows, self._buffer = self._buffer, []
        with self._io_lock:
            if rows:
                table = pa.Table.from_pylist(rows, schema=REQUEST_LOG_SCHEMA)
                if self._writer is None:
                    self._open()
                assert self._writer is not None
                self._writer.write_table(table)
                self._rows_in_file += len(rows)
                self.written += len(rows)
            if self._writer is not None and (rotate or self._due()):
                self._close()
        return len(rows)

    def close(self) -> None:
        """Stop the thread, write what is buffered and close the current file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush(rotate=True)

    # --- internals -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep logging; the error is reported
                log.exception("request log: write failed (rows stay buffered up to %d)", MAX_BUFFER)

    def _due(self) -> bool:
        if self._rows_in_file >= self.max_rows or time.monotonic() - self._opened >= self.rotate_s:
            return True
        try:
            return self._path is not None and self._path.stat().st_size >= self.max_bytes
        except OSError:
            return False

    def _open(self) -> None:
        now = datetime.now(UTC)
        day = self.folder / f"{now:%Y-%m-%d}"
        day.mkdir(parents=True, exist_ok=True)
        self._files += 1
        self._path = day / f"requests-{now:%Y%m%dT%H%M%S%f}Z-{os.getpid()}-{self._files}.parquet{IN_PROGRESS}"
        self._writer = pq.ParquetWriter(self._path, REQUEST_LOG_SCHEMA, compression="zstd")
        self._opened = time.monotonic()
        self._rows_in_file = 0

    def _close(self) -> None:
        assert self._writer is not None and self._path is not None
        self._writer.close()
        final = self._path.with_name(self._path.name.removesuffix(IN_PROGRESS))
        os.replace(self._path, final)
        self._writer, self._path = None, None


def _writer_alive(path: Path) -> bool:
    """Whether the process named in an in-progress file's name (``requests-<start>-<pid>-<n>``) still
    runs: another worker's open file is not a crash leftover."""
    try:
        pid = int(path.name.split("-")[2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
