"""Pseudonyms, retention and erasure of users.

- :func:`pseudonym` / :func:`pseudonymise` turn a user id into ``u_`` + 32 hex characters of
  HMAC-SHA256 under the home's key (``<home>/secrets/pseudonym_key``, created 0600 on first use).
  The request log stores only these; monitoring pseudonymises the event side of its joins with the
  same function, so the joins still work and nobody without the key can map a row back to a user.
- :func:`apply_retention` deletes request-log files and report runs older than
  ``privacy.request_log_days`` / ``privacy.report_days``.
- :func:`forget` erases one user from the event log, the request log, the canonical and feature
  tables, the quarantine, the monitoring references and the online store, and records the user's
  pseudonym in ``<home>/secrets/forgotten_users`` so that later ingests leave the user out.

Nothing happens at import time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recflow.durable import replace_durably
from recflow.security import PSEUDONYM_KEY_FILE, secret_file, secrets_dir
from recflow.settings import Settings

log = logging.getLogger("recflow.privacy")
PREFIX = "u_"
FORGOTTEN_FILE = "forgotten_users"


def pseudonym_key(settings: Settings) -> bytes:
    """The home's pseudonym key (created 0600 on first use). Rotating it breaks joins with older logs
    and the erasure register, so it is never rotated automatically."""
    value, _, _ = secret_file(settings, PSEUDONYM_KEY_FILE)
    assert value is not None
    return value.encode()


def pseudonym(user_id: str, key: bytes) -> str:
    """The keyed pseudonym of one user id: ``u_`` + the first 128 bits of HMAC-SHA256, in hex."""
    return PREFIX + hmac.new(key, str(user_id).encode(), hashlib.sha256).hexdigest()[:32]


def pseudonymise(user_ids: pd.Series, key: bytes) -> pd.Series:
    """:func:`pseudonym` of every value (nulls stay null), computed once per distinct id."""
    distinct = user_ids.dropna().astype(str).unique()
    lookup = {u: pseudonym(u, key) for u in distinct}
    return user_ids.map(lambda u: lookup.get(str(u)) if pd.notna(u) else None)


def pseudonymise_frame(df: pd.DataFrame, key: bytes, column: str = "user_id") -> pd.DataFrame:
    """A copy of ``df`` with ``column`` pseudonymised (unchanged when the column is absent)."""
    if column not in df.columns or df.empty:
        return df
    return df.assign(**{column: pseudonymise(df[column], key).astype(object)})


# --- retention ---------------------------------------------------------------------------------

def _age_days(path: Path, now: float) -> float:
    newest = max([p.stat().st_mtime for p in path.rglob("*") if p.is_file()] + [path.stat().st_mtime])
    return (now - newest) / 86_400


def apply_retention(
    settings: Settings, now: datetime | None = None, on_reports_removed: Callable[[Path], object] | None = None,
) -> dict[str, list[str]]:
    """Delete request-log files and report runs past their retention; returns what was removed
    (paths relative to the home). A day folder of the request log is kept until its last day is
    ``privacy.request_log_days`` old; a report run until its ``summary.json`` (or, without one, its
    newest file) is ``privacy.report_days`` old. ``None`` keeps forever."""
    p = settings.privacy
    now_dt = (now or datetime.now(UTC)).astimezone(UTC)
    now_s = now_dt.timestamp()
    removed: dict[str, list[str]] = {"request_log": [], "reports": []}
    folder = settings.paths.request_log
    if p.request_log_days is not None and folder.is_dir():
        cutoff = (now_dt - timedelta(days=p.request_log_days)).date()
        for entry in sorted(folder.iterdir()):
            try:
                day = datetime.strptime(entry.name, "%Y-%m-%d").date() if entry.is_dir() else None
            except ValueError:
                day = None
            old = day < cutoff if day is not None else _age_days(entry, now_s) > p.request_log_days
            if old and not any(entry.rglob("*.inprogress")):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed["request_log"].append(str(entry.relative_to(settings.home)))
    reports = settings.paths.reports
    if p.report_days is not None and reports.is_dir():
        for run in sorted(reports.iterdir()):
            summary = run / "summary.json"
            if not (run.is_dir() and summary.is_file()):
                continue  # not a dated run (e.g. the reference cache)
            try:
                created = datetime.fromisoformat(json.loads(summary.read_text())["created_at"]).timestamp()
                age = (now_s - created) / 86_400
            except (KeyError, ValueError, TypeError):
                age = _age_days(run, now_s)
            if age > p.report_days:
                shutil.rmtree(run)
                removed["reports"].append(str(run.relative_to(settings.home)))
    if removed["reports"] and on_reports_removed is not None:
        on_reports_removed(reports)  # e.g. rebuild the reports index (the monitor passes monitoring.index.write_index)
    for kind, paths in removed.items():
        if paths:
            log.info("retention: removed %d %s entr(y/ies) older than the configured days", len(paths), kind)
    return removed


# --- erasure -----------------------------------------------------------------------------------

@dataclass
class ForgetReport:
    """What :func:`forget` removed, per place (row counts), and what it could not reach."""

    user_pseudonym: str
    removed: dict[str, int] = field(default_factory=dict)
    files_rewritten: int = 0
    not_erased: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{place}: {n:,} row(s) removed" for place, n in self.removed.items()]
        out.append(f"{self.files_rewritten} file(s) rewritten")
        return out + [f"not erased: {note}" for note in self.not_erased]


def forgotten(settings: Settings) -> set[str]:
    """Pseudonyms of erased users (the register later ingests consult)."""
    path = settings.paths.secrets / FORGOTTEN_FILE
    return set(path.read_text().split()) if path.is_file() else set()


def _remember(settings: Settings, pseudo: str) -> None:
    path = secrets_dir(settings) / FORGOTTEN_FILE
    if pseudo in forgotten(settings):
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(pseudo + "\n")
        out.flush()
        os.fsync(out.fileno())


def drop_forgotten(settings: Settings, df: pd.DataFrame, column: str = "user_id") -> tuple[pd.DataFrame, int]:
    """``df`` without the rows of erased users, and how many were dropped (ingest calls this)."""
    gone = forgotten(settings)
    if not gone or column not in df.columns or df.empty:
        return df, 0
    mask = pseudonymise(df[column], pseudonym_key(settings)).isin(gone).to_numpy()
    return (df[~mask], int(mask.sum())) if mask.any() else (df, 0)


def _rewrite_parquet(path: Path, values: Iterable[str], column: str = "user_id") -> int:
    """Rewrite ``path`` without the rows whose ``column`` is one of ``values``; returns rows removed."""
    schema = pq.read_schema(path)
    if column not in schema.names:
        return 0
    table = pq.read_table(path)
    hit = pc.is_in(table[column].cast(pa.string()), value_set=pa.array(list(values), pa.string()))
    n = int(pc.sum(pc.fill_null(hit, False)).as_py() or 0)
    if n:
        kept = table.filter(pc.invert(pc.fill_null(hit, False)))
        tmp = path.with_name(path.name + ".forget.tmp")
        pq.write_table(kept, tmp, compression="zstd")
        replace_durably(tmp, path)
    return n


def forget(settings: Settings, user_id: str) -> ForgetReport:
    """Erase ``user_id`` everywhere recflow keeps user data in the home (see the module docstring)."""
    from recflow import feature_store as fs
    from recflow.event_log import EventLog

    key = pseudonym_key(settings)
    pseudo = pseudonym(user_id, key)
    report = ForgetReport(user_pseudonym=pseudo)
    _remember(settings, pseudo)  # first: an ingest running meanwhile already leaves the user out
    paths = settings.paths

    elog = EventLog(paths.event_log)
    journal, segments, files = elog.forget(user_id)
    report.removed["event log journal"] = journal
    report.removed["event log segments"] = segments
    report.files_rewritten += files

    groups: list[tuple[str, list[Path], list[str]]] = [
        ("request log", sorted(paths.request_log.rglob("*.parquet")) if paths.request_log.is_dir() else [],
         [pseudo, user_id]),  # logs written before pseudonyms held the raw id
        ("canonical tables", [p for p in (paths.events, paths.users, paths.holdout_events) if p.is_file()], [user_id]),
        ("feature tables", sorted(paths.features.glob("*.parquet")) if paths.features.is_dir() else [], [user_id]),
        ("quarantine", sorted(paths.quarantine.rglob("*.parquet")) if paths.quarantine.is_dir() else [], [user_id]),
        ("training sets", sorted(paths.training_sets.rglob("*.parquet")) if paths.training_sets.is_dir() else [],
         [user_id]),
        ("monitoring references", sorted((paths.reports / "reference").glob("*.parquet"))
         if (paths.reports / "reference").is_dir() else [], [pseudo, user_id]),
    ]
    for place, files_, values in groups:
        total = 0
        for path in files_:
            n = _rewrite_parquet(path, values)
            total += n
            report.files_rewritten += bool(n)
        report.removed[place] = total
    if paths.request_log.is_dir():
        busy = list(paths.request_log.rglob("*.inprogress"))
        if busy:
            report.not_erased.append(
                f"{len(busy)} request-log file(s) still being written by a running service: run "
                "`recflow forget` again once it has rotated them (serving.request_log_rotate_s)")
    started = time.perf_counter()
    try:
        report.removed["online store"] = fs.forget_user(settings, user_id)
    except Exception as exc:  # noqa: BLE001 - say what is left, do not hide the rest of the report
        report.not_erased.append(f"online store ({type(exc).__name__}: {str(exc)[:200]}): run `recflow forget` "
                                 "again when the store answers")
    log.info("forget: online store done in %.2f s", time.perf_counter() - started)
    report.removed["ranker neighbour snapshots"] = _forget_in_rankers(settings, user_id, report)
    report.not_erased.append("a running service keeps the neighbour snapshot it loaded until its next model load "
                             "(`recflow rollback`/`/reload`, or a restart); models still hold aggregates over all "
                             "users (item statistics, co-purchase counts, trained weights) until a retrain")
    return report


def _forget_in_rankers(settings: Settings, user_id: str, report: ForgetReport) -> int:
    """The user's row out of every registered model's two-stage neighbour snapshot."""
    from recflow.ranker.model import forget_user
    from recflow.registry import RANKER_DIR

    total = 0
    for root in (settings.paths.bentoml_home / "models", settings.paths.models):
        for folder in sorted(root.rglob(RANKER_DIR)) if root.is_dir() else []:
            if folder.is_dir() and (folder / "ranker.json").is_file():
                n = forget_user(folder, user_id)
                total += n
                report.files_rewritten += 2 * bool(n)
    return total


def report_dict(report: ForgetReport) -> dict[str, Any]:
    """The report as JSON-ready data."""
    return {"pseudonym": report.user_pseudonym, "removed": report.removed,
            "files_rewritten": report.files_rewritten, "not_erased": report.not_erased}
